"""SIGTERM and Ctrl-C (SIGINT) take one shutdown path in `bin/eval`.

The handler sets a flag, and inside an abortable section (loading a model, generating, grading,
scoring entropy) also raises Shutdown, so a long evaluation stops at once and is abandoned. That
asynchronous exception is only the fast path: Python discards an exception raised while a
`__del__` or a weakref callback runs, so the flag is checked as well (`check()`) at every phase
boundary of an evaluation and inside the engines' generation loops (per batch, per finished
request). Nothing of an evaluation is written until its recording phase, which is not abortable:
a signal during it lets the recording finish (well under a second) and stops afterwards.
Used by eval_daemon/__main__.py.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Iterator

logger = logging.getLogger(__name__)


class Shutdown(BaseException):
    """Raised inside an abortable section when a stop signal arrives (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""


class StopSignal:
    def __init__(self) -> None:
        self.requested = False
        self._abortable = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            logger.info("received %s again; already stopping", name)
            return
        self.requested = True
        logger.info("received %s; stopping", name)
        if self._abortable:
            self._abortable = False
            raise Shutdown(name)

    def check(self) -> None:
        """Raise Shutdown when a stop was requested (the flag path; see the module docstring)."""
        if self.requested:
            raise Shutdown("stop requested")

    def sleep(self, seconds: float) -> None:
        """Wait up to `seconds`, returning early (with Shutdown) when a stop is requested."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        self.check()

    @contextlib.contextmanager
    def abortable(self) -> Iterator[None]:
        """Code inside may be interrupted by Shutdown; raises at once if a stop was already requested."""
        if self.requested:
            raise Shutdown("stop requested")
        self._abortable = True
        try:
            yield
        finally:
            self._abortable = False
