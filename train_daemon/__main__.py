"""The trainer daemon: SFT on MATH, publishing a checkpoint every training.eval_every steps.

    bin/train --config config/sft_config.yaml [section.key=value ...]
    bin/train --config config/sft_config.yaml training.run_id=<id>     # resume that run
    bin/train --nproc 4 --config config/sft_config.yaml                # 4 GPUs: torchrun + FSDP2

Reads top to bottom: setup (parse and validate -> load -> resume) -> train loop -> finish. Start-up
problems (config, dataset, model path, resume state) exit 2 with one line on stderr,
`train: error: <what>; <fix>`. SIGTERM and Ctrl-C finish the current step, save resume state and
wait for the in-flight publish (exit 0). A background write that fails is one ERROR line; on a full
disk the trainer stops after the current step; either way it exits 1 naming what was not saved.
Filesystem contract: common/contract.py; run directory layout: train_daemon/run.py. This module
parses; train_daemon/trainer.py (imported after parsing, it brings torch) does the work.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import cli
from common.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        return cli.print_config("train", args)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _exec_torchrun(args)
    cli.setup_logging()
    # Imported after parsing: torch takes seconds to import, --help and --print-config need none of it.
    from common.data import DatasetError
    from train_daemon.resume import ResumeError
    from train_daemon.shutdown import StopRequest
    from train_daemon.trainer import finish, setup, train_loop

    try:
        trainer = setup(args.config, args.overrides)
    except (ConfigError, DatasetError, ResumeError) as exc:
        return cli.fail("train", exc)
    stop = StopRequest()
    stop.install()
    train_loop(trainer, stop)
    code = finish(trainer, args.config)
    stop.restore()
    return code


EXAMPLES = """examples:
  bin/train --config config/sft_config.yaml data.train_source=/data/MATH
  bin/train --config config/sft_config.yaml training.max_steps=200 training.eval_every=20
  bin/train --config config/sft_config.yaml --print-config      # the resolved config, then exit

resume: after a crash, Ctrl-C or kill -9, run the same command with training.run_id=<id> (the id is
logged at start, "run <id>: starting ...", and names results/runs/<id>/): weights, optimizer,
scheduler, RNG and data position continue from the last saved step (training.save_resume_every).

""" + cli.CONFIG_HELP


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ToolParser("train", description=__doc__.splitlines()[0], epilog=EXAMPLES)
    cli.add_config_arguments(parser, example="training.learning_rate=1e-5")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train on N GPUs of this host: runs torchrun --standalone --nproc_per_node N "
                             "-m train_daemon with the other arguments (FSDP2; README: Training on several GPUs)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.nproc < 1:
        parser.error(f"--nproc {args.nproc}: give a number of processes >= 1")
    return args


def _exec_torchrun(args: argparse.Namespace) -> int:
    """Replace this process with torchrun (a kill of it reaches the ranks as of torchrun itself)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "train_daemon", *(["--config", args.config] if args.config else []), *args.overrides]
    os.execv(sys.executable, command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
