"""bin/demo: the whole product (trainer + eval daemon + store + plots) on CPU with a tiny model."""
