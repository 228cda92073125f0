"""The training daemon: SFT on MATH, publishing checkpoints for the eval daemon (`bin/train`)."""
