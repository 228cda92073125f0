"""`bin/eval --workers N`: N eval worker processes on one queue, each pinned to its device.

    bin/eval --config config/sft_config.yaml --workers 4 'evaluation.devices=[cuda:1,cuda:2]'
    # workers 0 and 2 on cuda:1, 1 and 3 on cuda:2 (two per GPU: lower evaluation.gpu_memory_utilization)

Worker i is `python -m eval_daemon` with the same --config, overrides and --once, plus
evaluation.worker_id=<id>-<i> and evaluation.device=devices[i % len(devices)] (every worker on
evaluation.device when devices is empty). The workers share nothing but the results directory
(leases and the store, eval_daemon/lease.py), exactly like N separate `bin/eval` invocations on one
or several hosts. This process only starts them, passes SIGTERM and SIGINT on, and waits; it exits
0 when every worker exited 0, otherwise with the first non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys

from common.config import Config

logger = logging.getLogger(__name__)


def worker_commands(args: argparse.Namespace, config: Config, base_id: str) -> list[list[str]]:
    """The command line of each worker (later overrides win over earlier ones)."""
    e = config.evaluation
    devices = e.devices or [e.device]
    common = [sys.executable, "-m", "eval_daemon", *(["--config", args.config] if args.config else []),
              *(["--once"] if args.once else []), *args.overrides]
    return [[*common, f"evaluation.worker_id={base_id}-{i}", f"evaluation.device={devices[i % len(devices)]}"]
            for i in range(args.workers)]


def run_fleet(args: argparse.Namespace, config: Config) -> int:
    base_id = config.evaluation.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    commands = worker_commands(args, config, base_id)
    workers = [subprocess.Popen(command) for command in commands]
    for command, worker in zip(commands, workers):
        logger.info("started eval worker %s (pid %d) on %s", command[-2].split("=", 1)[1], worker.pid,
                    command[-1].split("=", 1)[1])

    def forward(signum: int, frame) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    codes = [worker.wait() for worker in workers]
    for command, code in zip(commands, codes):
        if code != 0:
            logger.error("eval worker %s exited with code %d", command[-2].split("=", 1)[1], code)
    return next((code for code in codes if code != 0), 0)
