"""What both daemons share: config, data, grading, the filesystem contract, durable writes, tracking."""
