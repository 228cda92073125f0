"""Training metrics over a logging window (logging.log_every optimizer steps), for `bin/train`.

Keys follow the W&B layout of the project: train/* for the optimisation, train_gpu/* for the
device (absent on CPU). Losses stay on the device until the window is read, so logging every
N steps costs one device sync per N steps.
"""

from __future__ import annotations

import time

import torch

from common.tracking import gpu_stats
from train_daemon.step import StepResult


class LogWindow:
    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._grad_norms: list[torch.Tensor] = []
        self._tokens = 0
        self._start = time.monotonic()
        self._learning_rate = 0.0

    def add(self, result: StepResult) -> None:
        self._losses.append(result.loss)
        self._grad_norms.append(result.grad_norm)
        self._tokens += result.num_tokens
        self._learning_rate = result.learning_rate

    def flush(self, epoch: float, tokens_seen: int) -> dict[str, float]:
        """Metrics of the steps since the last flush (means over the window), then start a new window."""
        losses = torch.stack(self._losses).float().tolist()  # the one device sync of the window
        grad_norms = torch.stack(self._grad_norms).float().tolist()
        elapsed = max(time.monotonic() - self._start, 1e-9)
        metrics = {
            "train/loss": sum(losses) / len(losses),
            "train/learning_rate": self._learning_rate,
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/tokens_per_second": self._tokens / elapsed,
            "train/epoch": epoch,
            "train/tokens_seen": tokens_seen,
        }
        metrics.update({f"train_gpu/{key}": value for key, value in gpu_stats(str(self.device)).items()})
        self._reset()
        return metrics
