"""Publish checkpoints without stalling training for the disk write.

Used by `bin/train`. `publish()` copies the weights to host memory (train_daemon.background),
then a background writer writes a complete Hugging Face model directory with
common.contract.publish_checkpoint (temp dir, fsync, rename, manifest) and applies retention.
At most one write is in flight: a publish that finds the previous one still writing waits for it,
and logs how long training stalled.

A failed write (disk full, permissions, any exception) reaches the training thread, is logged as
one ERROR line and recorded in `failures`; the temporary directory is removed and published
checkpoints are untouched.

Test hooks (tests only): MATHSFT_TEST_PUBLISH_DELAY_S=<seconds> makes the writer sleep after the
model files are written and before the rename into place, so tests can kill -9 the trainer
mid-publish; MATHSFT_TEST_PUBLISH_DELAY_FROM_STEP=<step> limits the delay to steps >= step.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from common.contract import ManifestError, Sidecar, apply_retention, publish_checkpoint
from train_daemon.background import BackgroundWriter, host_bytes, inject_test_fault
from train_daemon.weights import unique_state_dict

logger = logging.getLogger(__name__)

TEST_DELAY_ENV = "MATHSFT_TEST_PUBLISH_DELAY_S"
TEST_DELAY_FROM_STEP_ENV = "MATHSFT_TEST_PUBLISH_DELAY_FROM_STEP"


class CheckpointPublisher:
    def __init__(self, run_dir: Path, run_id: str, model, tokenizer, save_dtype: torch.dtype, keep_last: int):
        self.run_dir, self.run_id = Path(run_dir), run_id
        self.tokenizer, self.save_dtype, self.keep_last = tokenizer, save_dtype, keep_last
        # Copied once now: the writer thread must not read objects the training loop may touch.
        self.model_config = copy.deepcopy(model.config)
        self.model_config.dtype = save_dtype
        self.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
        self.writer = BackgroundWriter("checkpoint", self.run_dir)
        self._buffers: dict[str, torch.Tensor] = {}  # pinned host copies, reused across publishes

    def publish(self, model, step: int, sidecar: Sidecar, metrics: dict[str, Any],
                weights: dict[str, torch.Tensor] | None = None) -> None:
        """Snapshot the weights now; write them in the background. `weights`: the model's full
        weights when it is sharded (train_daemon.distributed.full_state_dict), else read from it."""
        stalled = self.wait()
        if stalled > 0.1:
            logger.warning("step %d: training waited %.1f s for the previous checkpoint write", step, stalled)
        start = time.monotonic()
        weights = self.writer.snapshot(unique_state_dict(model) if weights is None else weights, self._buffers,
                                       self._dtype)
        snapshot_seconds = time.monotonic() - start
        self.writer.submit(step, host_bytes(weights), self._write, step, weights, sidecar, metrics, snapshot_seconds)

    def wait(self) -> float:
        """Block until the in-flight write (if any) is done; returns the seconds waited."""
        return self.writer.wait()

    @property
    def failed_steps(self) -> list[int]:
        return [failure.step for failure in self.writer.failures]

    def _dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.save_dtype if tensor.is_floating_point() else tensor.dtype

    def _write(self, step: int, weights: dict[str, torch.Tensor], sidecar: Sidecar, metrics: dict[str, Any],
               snapshot_seconds: float) -> None:
        def write_model(directory: Path) -> None:
            inject_test_fault(step, directory)
            save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
            self.model_config.save_pretrained(directory)
            if self.generation_config is not None:
                self.generation_config.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)
            _test_delay(step)

        start = time.monotonic()
        # Any exception goes to the training thread through the writer's future.
        final = publish_checkpoint(self.run_dir, self.run_id, step, write_model, sidecar, metrics)
        logger.info("published step %d to %s (training paused %.2f s for the snapshot; write %.1f s in the background)",
                    step, final, snapshot_seconds, time.monotonic() - start)
        try:
            deleted = apply_retention(self.run_dir, self.keep_last)
        except (OSError, ManifestError) as exc:  # retention is housekeeping: never fatal
            logger.error("retention after step %d failed: %s; old checkpoints stay on disk", step, exc)
            return
        if deleted:
            logger.info("retention: deleted evaluated checkpoints %s", deleted)


def _test_delay(step: int) -> None:
    """The test hook of the module docstring; does nothing unless the variable is set."""
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
    if delay and step >= int(os.environ.get(TEST_DELAY_FROM_STEP_ENV) or 0):
        time.sleep(delay)
