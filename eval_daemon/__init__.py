"""bin/eval: the evaluation daemon (see eval_daemon/__main__.py)."""
