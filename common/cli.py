"""What every command-line tool shares: one error format, the config arguments, --print-config, logging.

    <tool>: error: <what>; <fix>        one line on stderr; usage and start-up errors exit 2

Used by bin/train, bin/eval, bin/query, bin/plot and bin/demo. It imports nothing heavy (no torch),
so `--help`, `--print-config` and a bad config answer at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

import yaml
from tqdm import tqdm

from common.config import (
    CONFIG_ERROR_EXIT_CODE,
    Config,
    ConfigError,
    load_config,
    to_dict,
)

USAGE_EXIT_CODE = CONFIG_ERROR_EXIT_CODE  # usage and start-up errors (bad config, missing input), every tool

CONFIG_HELP = ("Config keys: README.md 'Configuration reference' (and common/config.py); "
               "--print-config prints every key with its resolved value.")


def error_line(tool: str, message: str) -> str:
    return f"{tool}: error: {message}"


def print_error(tool: str, message: object) -> None:
    """One line on stderr in the shared format; the message should end with the fix (`...; set X`)."""
    print(error_line(tool, " ".join(str(message).split())), file=sys.stderr)


class ToolParser(argparse.ArgumentParser):
    """argparse with examples kept as written and usage errors as one line (argparse's own are two)."""

    def __init__(self, tool: str, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=f"bin/{tool}", **kwargs)
        self.tool = tool

    def error(self, message: str) -> NoReturn:
        print_error(self.tool, f"{message}; see {self.prog} --help")
        sys.exit(USAGE_EXIT_CODE)


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """`--config FILE`, `--print-config` and the `section.key=value` overrides every daemon takes."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML file in config/ (the defaults in common/config.py when omitted)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides) as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help=f"dotted overrides, e.g. {example}")


def print_config(tool: str, args: argparse.Namespace) -> int:
    """--print-config: the resolved config as YAML on stdout (exit 0), or the config error (exit 2)."""
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return fail(tool, exc)
    print(dump_config(config), end="")
    return 0


def dump_config(config: Config) -> str:
    """The resolved config as YAML that --config reads back."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


class _TqdmHandler(logging.StreamHandler):
    """Writes log records through tqdm, which clears its bars first: a log line never lands inside a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 -- logging's own contract: report the failure, never raise
            self.handleError(record)


def setup_logging(level: int = logging.INFO, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """The entry points' logging: stderr, through tqdm so that progress bars and log lines never mix."""
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def fail(tool: str, message: object, code: int = USAGE_EXIT_CODE) -> int:
    """Print the one-line error and return the exit code (for `return fail(...)` in a main())."""
    print_error(tool, message)
    return code

