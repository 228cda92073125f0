"""Write large state to disk without holding up training (used by the publisher and resume writer).

The pattern: copy the tensors to host memory now (pinned buffers, non-blocking copies, one sync
on CUDA: well under a second for a 1.5B model), then write them from a background thread while
training goes on. At most one write per writer is in flight; the host buffers are reused, which
is safe because a new snapshot waits for the previous write to finish.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch


class BackgroundWriter:
    def __init__(self, name: str):
        self.name = name
        self._thread: threading.Thread | None = None

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        """Run write(*args) in the background; call wait() first (the snapshot must not race it)."""
        assert self._thread is None, "wait() for the previous write before snapshotting"
        self._thread = threading.Thread(target=write, args=args, name=self.name)
        self._thread.start()

    def wait(self) -> float:
        """Block until the in-flight write (if any) is done; returns the seconds waited."""
        if self._thread is None:
            return 0.0
        start = time.monotonic()
        self._thread.join()
        self._thread = None
        return time.monotonic() - start


def copy_to_host(tensors: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 dtype: Callable[[torch.Tensor], torch.dtype] = lambda t: t.dtype) -> dict[str, torch.Tensor]:
    """Host copies of `tensors` (cast to dtype(t)), taken now; `buffers` holds reusable pinned
    memory for CUDA tensors and is filled on first use. CPU tensors are simply cloned."""
    copies, device = {}, None
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.device.type != "cuda":
            copies[name] = tensor.to(dtype(tensor), copy=True)
            continue
        device = tensor.device
        buffer = buffers.get(name)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != dtype(tensor):
            buffer = buffers[name] = torch.empty(tensor.shape, dtype=dtype(tensor), pin_memory=True)
        # Cast on the GPU first: for bf16 checkpoints half the bytes cross PCIe.
        buffer.copy_(tensor.to(dtype(tensor)), non_blocking=True)
        copies[name] = buffer
    if device is not None:
        torch.cuda.synchronize(device)
    return copies
