"""SIGTERM and Ctrl-C (SIGINT) take one shutdown path in `bin/eval`.

The handler only sets a flag, except inside an abortable section (loading a model, generating,
grading, scoring entropy): there it raises Shutdown, so a long evaluation stops at once and is
abandoned. Nothing of an evaluation is written until its recording phase, which is not abortable:
a signal during it lets the recording finish (well under a second) and stops afterwards.
Used by eval_daemon/__main__.py.
"""

from __future__ import annotations

import contextlib
import logging
import signal
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
