"""bin/demo: trains and evaluates a tiny model on CPU (common/demo/run.py reads top to bottom)."""
