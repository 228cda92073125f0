"""The results store (DuckDB) and its readers: schema, writer (the eval daemon), query, plots."""
