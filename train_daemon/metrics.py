"""Training metrics over a logging window (logging.log_every optimizer steps), for `bin/train`.

Keys follow the W&B layout of the project: train/* for the optimisation, train_gpu/* for the
device (absent on CPU). Losses stay on the device until the window is read, and a window is read
one step late, after the next step's work has been queued: the read waits for the GPU to finish
the window's last step while the GPU already has the next one to run, so logging never leaves the
GPU idle. tokens_per_second is measured between those reads, i.e. between GPU completions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from common.tracking import gpu_stats
from train_daemon.step import StepResult


@dataclass
class _Window:
    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    learning_rate: float = 0.0
    step: int = 0  # the window's last step, and the data position and tokens seen after it
    epoch: float = 0.0
    tokens_seen: int = 0


class LogWindow:
    def __init__(self, device: torch.device):
        self.device = device
        self._open, self._closed = _Window(), None
        self._last_read = time.monotonic()

    def add(self, result: StepResult, step: int, close: bool, epoch: float, tokens_seen: int,
            last: bool = False) -> list[tuple[int, dict[str, float]]]:
        """Add a step (queued on the device, maybe still running); `close` ends the window at it.
        Returns (step, metrics) of the windows ready to read now: the one closed at the previous
        call, and with `last` (no step follows) this one too."""
        ready = self.drain()
        window = self._open
        window.losses.append(result.loss)
        window.grad_norms.append(result.grad_norm)
        window.tokens += result.num_tokens
        window.learning_rate = result.learning_rate
        if close:
            window.step, window.epoch, window.tokens_seen = step, epoch, tokens_seen
            self._open, self._closed = _Window(), window
        return ready + self.drain() if last else ready

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        """Read the closed window, if any (one device sync): its means and throughput."""
        window, self._closed = self._closed, None
        if window is None:
            return []
        losses = torch.stack(window.losses).float().tolist()  # waits for the window's last step
        grad_norms = torch.stack(window.grad_norms).float().tolist()
        now = time.monotonic()
        elapsed, self._last_read = max(now - self._last_read, 1e-9), now
        metrics = {
            "train/loss": sum(losses) / len(losses),
            "train/learning_rate": window.learning_rate,
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/tokens_per_second": window.tokens / elapsed,
            "train/epoch": window.epoch,
            "train/tokens_seen": window.tokens_seen,
        }
        metrics.update({f"train_gpu/{key}": value for key, value in gpu_stats(str(self.device)).items()})
        return [(window.step, metrics)]
