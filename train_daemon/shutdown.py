"""SIGTERM and Ctrl-C take the same path in `bin/train`: finish the current optimizer step, write
the resume state, wait for the in-flight publish, exit 0. A second signal quits at once (as safe
as kill -9: nothing published is damaged; the next start cleans up and resumes)."""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            logger.warning("%s again: quitting now; the next start resumes from the last resume state", name)
            os._exit(128 + signum)
        self.requested = True
        logger.warning("%s: finishing the current step, saving resume state, then exiting "
                       "(send it again to quit at once)", name)
