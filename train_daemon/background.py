"""Write large state to disk without holding up training (used by the publisher and resume writer).

The pattern: queue copies of the tensors into pinned host buffers on a side CUDA stream (the
training thread does not wait for them: the next optimizer step waits on the GPU, in `fence()`,
before it changes the weights), then write them on a single-worker
`concurrent.futures.ThreadPoolExecutor`, whose thread first waits for the copies, while training
goes on. At most one write per writer is in
flight; the host buffers are reused, which is safe because a new snapshot waits for the previous
write to finish. Whatever the write raises (an OSError, safetensors' SafetensorError or
torch.save's RuntimeError on a full disk, a bug) is held by its future and re-raised in the
training thread by `poll()` / `wait()`, which turn it into one `WriteFailure` and one ERROR line.

Test hook (tests only): MATHSFT_TEST_WRITE_FAULT=enospc|error makes every write of both writers
fail at its first file (`enospc`: OSError ENOSPC, as a full disk; `error`: a RuntimeError, as
torch.save raises on a full disk); MATHSFT_TEST_WRITE_FAULT_FROM_STEP=<step> limits it to steps >= step.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import first_line

logger = logging.getLogger(__name__)

TEST_FAULT_ENV = "MATHSFT_TEST_WRITE_FAULT"
TEST_FAULT_FROM_STEP_ENV = "MATHSFT_TEST_WRITE_FAULT_FROM_STEP"
DISK_FULL_FIX = "free space or lower training.keep_last_checkpoints"


@dataclass
class WriteFailure:
    what: str  # "checkpoint" | "resume state"
    step: int
    cause: str  # one line: what happened and the fix
    disk_full: bool


class BackgroundWriter:
    """One write in flight on its own worker thread; its outcome is collected by the caller's thread."""

    def __init__(self, what: str, directory: Path):
        self.what, self.directory = what, Path(directory)
        self.failures: list[WriteFailure] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=what.replace(" ", "-"))
        self._future: Future | None = None
        self._step, self._bytes = 0, 0
        self._stream: torch.cuda.Stream | None = None  # the side stream of the snapshot copies
        self._copied: torch.cuda.Event | None = None  # recorded after the latest snapshot's copies

    def snapshot(self, tensors: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 dtype: Callable[[torch.Tensor], torch.dtype] = lambda t: t.dtype) -> dict[str, torch.Tensor]:
        """Host copies of `tensors` as they are after the work queued so far (see copy_to_host); on
        CUDA the copies are still in flight when this returns: fence() before changing the originals."""
        device = next((t.device for t in tensors.values() if t.device.type == "cuda"), None)
        if device is None:
            return copy_to_host(tensors, buffers, dtype)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        copies = copy_to_host(tensors, buffers, dtype, self._stream)
        self._copied = torch.cuda.Event()
        self._copied.record(self._stream)
        return copies

    def fence(self) -> None:
        """Make the current CUDA stream wait (on the GPU, the host goes on) for the snapshot copies."""
        if self._copied is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._copied)
            self._copied = None

    def submit(self, step: int, nbytes: int, write: Callable[..., Any], *args: Any) -> None:
        """Run write(*args) in the background; wait() first (the snapshot must not race the last write)."""
        assert self._future is None, "wait() for the previous write before snapshotting"
        if self.disk_full:  # never write into a disk known to be full
            self.failures.append(WriteFailure(self.what, step, "not attempted: the disk is full", True))
            return
        self._step, self._bytes = step, nbytes
        self._future = self._executor.submit(_after, self._copied, write, *args)

    def run_here(self, step: int, nbytes: int, write: Callable[..., Any], *args: Any) -> Any:
        """Run write(*args) in the calling thread (a write all ranks take part in: its collectives
        belong to the training thread); its outcome is collected as a background write's."""
        assert self._future is None, "wait() for the previous write first"
        if self.disk_full:
            self.failures.append(WriteFailure(self.what, step, "not attempted: the disk is full", True))
            return None
        self._step, self._bytes = step, nbytes
        self._future = Future()
        try:
            self._future.set_result(write(*args))
        except Exception as exc:  # noqa: BLE001 (every failure of the write is collected below, as a background one's)
            self._future.set_exception(exc)
        result = None if self._future.exception() else self._future.result()
        self._collect()
        return result

    def poll(self) -> None:
        """Collect the in-flight write if it has finished (never blocks)."""
        if self._future is not None and self._future.done():
            self._collect()

    def wait(self) -> float:
        """Block until the in-flight write (if any) is done and collect it; returns the seconds waited."""
        if self._future is None:
            return 0.0
        start = time.monotonic()
        self._future.exception()  # blocks until done, raises nothing
        waited = time.monotonic() - start
        self._collect()
        return waited

    @property
    def disk_full(self) -> bool:
        return any(failure.disk_full for failure in self.failures)

    def close(self) -> None:
        self.wait()
        self._executor.shutdown()

    def _collect(self) -> None:
        future, self._future = self._future, None
        try:
            future.result()
        # Every exception of the write lands here, whatever its type: the write is lost, the
        # training thread records it and decides (main() stops on a full disk).
        except BaseException as exc:  # noqa: BLE001
            full = is_disk_full(exc, self.directory, self._bytes)
            cause = (f"no space left on {filesystem_of(self.directory)}: {DISK_FULL_FIX}" if full
                     else f"{type(exc).__name__}: {first_line(exc, 'no message')}")
            self.failures.append(WriteFailure(self.what, self._step, cause, full))
            logger.error("step %d: %s not saved: %s", self._step, self.what, cause)


def _after(copied: torch.cuda.Event | None, write: Callable[..., Any], *args: Any) -> Any:
    if copied is not None:
        copied.synchronize()  # the host copies are complete (this thread waits, not training)
    return write(*args)


def is_disk_full(exc: BaseException, directory: Path, needed_bytes: int) -> bool:
    """Did this write fail for lack of space? OSError says so by errno and safetensors in its message;
    torch.save's RuntimeError says neither, so the free space left is the last word."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        return True
    try:
        return shutil.disk_usage(_existing_parent(directory)).free < needed_bytes
    except OSError:  # the directory is gone or unreadable: not evidence of a full disk
        return False


def filesystem_of(directory: Path) -> str:
    """'<mount point> (<device>)' of the filesystem holding directory, for the disk-full message."""
    path = _existing_parent(directory).resolve()
    mount = path
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open("/proc/self/mounts") as mounts:
            sources = {fields[1]: fields[0] for fields in (line.split() for line in mounts) if len(fields) > 1}
    except OSError:  # not Linux: the mount point alone
        return str(mount)
    return f"{mount} ({sources[str(mount)]})" if str(mount) in sources else str(mount)


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def inject_test_fault(step: int, path: Path) -> None:
    """The test hook of the module docstring; does nothing unless the variable is set."""
    fault = os.environ.get(TEST_FAULT_ENV)
    if not fault or step < int(os.environ.get(TEST_FAULT_FROM_STEP_ENV) or 0):
        return
    if fault == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    raise RuntimeError(f"[test hook {TEST_FAULT_ENV}={fault}] PytorchStreamWriter failed writing file")


def host_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def copy_to_host(tensors: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 dtype: Callable[[torch.Tensor], torch.dtype] = lambda t: t.dtype,
                 stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
    """Host copies of `tensors` (cast to dtype(t)); `buffers` holds reusable pinned memory for CUDA
    tensors (filled on first use, or ahead by pinned_buffers). CPU tensors are simply cloned.
    Without `stream` the copies are complete on return (one sync); with it they are queued on that
    stream after the work already queued on the current one, and the function returns at once."""
    copies = {}
    cuda = [t for t in tensors.values() if t.device.type == "cuda"]
    if cuda and stream is not None:
        stream.wait_stream(torch.cuda.current_stream(cuda[0].device))
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for name, tensor in tensors.items():
            tensor = tensor.detach()
            if tensor.device.type != "cuda":
                copies[name] = tensor.to(dtype(tensor), copy=True)
                continue
            buffer = buffers.get(name)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != dtype(tensor):
                buffer = buffers[name] = torch.empty(tensor.shape, dtype=dtype(tensor), pin_memory=True)
            # Cast on the GPU first: for bf16 checkpoints half the bytes cross PCIe.
            buffer.copy_(tensor.to(dtype(tensor)), non_blocking=True)
            copies[name] = buffer
    if cuda and stream is None:
        torch.cuda.synchronize(cuda[0].device)
    return copies


def pinned_buffers(specs: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Pinned host buffers for copy_to_host, allocated now: pinning ~18 GB takes seconds, and done on
    first use inside the training loop it stalled training for ~10 s."""
    return {name: torch.empty(shape, dtype=dtype, pin_memory=True) for name, (shape, dtype) in specs.items()}
