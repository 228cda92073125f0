"""Learning-rate schedule: linear warmup, then cosine decay to `learning_rate * min_lr_ratio`.

Used by `bin/train` through a torch LambdaLR (so its state is part of the resume state).
"""

from __future__ import annotations

import math


def total_optimizer_steps(max_steps: int, epochs: float, num_examples: int, examples_per_step: int) -> int:
    """`max_steps` when set, else enough steps to show `epochs` passes over the data (rounded up)."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * num_examples / examples_per_step))


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (1-based).

    Neither end of the schedule wastes a step on a zero rate: warmup step 1 trains at
    1 / warmup_steps of the peak, and the cosine reaches the floor just after the last step.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps - 1) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """A LambdaLR whose `last_epoch` counts finished optimizer steps; the next step is last_epoch + 1."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: lr_multiplier(done + 1, warmup_steps, total_steps, min_lr_ratio)
    )
