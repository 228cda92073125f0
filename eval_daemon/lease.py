"""The eval worker's side of a lease: claim the first free piece of work, keep the lease alive while
evaluating it (a heartbeat thread), and let it go afterwards.

Several `bin/eval` processes (a fleet: `bin/eval --workers N`, or N separate invocations, on one or
several hosts sharing the results filesystem) work one queue. Each computes the same ordered list of
pending work and claims the first item that no live lease holds (common/contract.py `claim_lease`:
an exclusive create, so two workers never both win). While it evaluates, a heartbeat renews the
lease every lease_s/3; a worker that dies (kill -9, a lost host) stops renewing, and after lease_s
another worker takes the checkpoint over. Exactly-once recording does not rest on the lease: the
store refuses a second row for one (run_id, step, eval_key) inside its write transaction, so a
worker that was too slow and lost its lease cannot add one. Used by eval_daemon/__main__.py.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterable, TypeVar

from common.contract import Lease, claim_lease, release_lease, remove_leases, renew_lease

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


def claim_first(leases_root: Path, items: Iterable[tuple[Item, str, int, str]], worker_id: str,
                lease_s: float) -> tuple[Item, Lease] | None:
    """The first of (item, run_id, step, eval_key) that this worker could claim, with its lease."""
    for item, run_id, step, key in items:
        lease = claim_lease(leases_root, run_id, step, key, worker_id, lease_s)
        if lease is not None:
            if lease.generation > 1:
                logger.info("took over run %s step %d (%s) from an expired lease (generation %d)", run_id, step,
                            key, lease.generation)
            return item, lease
    return None


def finish_lease(leases_root: Path, lease: Lease, recorded: bool) -> None:
    """Remove the lease once the checkpoint is recorded (by this worker or another); otherwise
    release it, so another worker may claim it at once."""
    if recorded:
        remove_leases(leases_root, lease.run_id, lease.step, lease.eval_key)
    else:
        release_lease(leases_root, lease)


class Heartbeat:
    """Renews a lease every lease_s/3 in a background thread, for the duration of a `with` block.

    `lost` is set when the lease was taken over (it had expired: this process stalled) or removed;
    the evaluation goes on, and the store decides whether its record is still the first. A failure
    to write the renewal (disk full, a network filesystem hiccup) is logged and retried at the next
    beat; any other error is re-raised in the owning thread when the block ends."""

    def __init__(self, leases_root: Path, lease: Lease) -> None:
        self.leases_root = leases_root
        self.lease = lease
        self.lost = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.step}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None and exc is None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.lease.lease_s / 3):
                if not self._beat():
                    return
        except BaseException as exc:  # handed to the owning thread in __exit__, not lost in a thread traceback
            self.error = exc

    def _beat(self) -> bool:
        try:
            renewed = renew_lease(self.leases_root, self.lease)
        except OSError as exc:  # transient (disk full, NFS): the next beat tries again before expiry
            logger.warning("could not renew the lease on run %s step %d (%s); retrying", self.lease.run_id,
                           self.lease.step, exc)
            return True
        if not renewed:
            logger.warning("lost the lease on run %s step %d (%s) to another worker; its evaluation goes on, and "
                           "only the first record of it is stored", self.lease.run_id, self.lease.step,
                           self.lease.eval_key)
            self.lost.set()
        return renewed
