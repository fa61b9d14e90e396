"""Command-line entry point: `python -m cqd_mpi [COMMAND] ...`; no command runs the demo."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cqd_mpi import __version__
from cqd_mpi.commands import COMMANDS
from cqd_mpi.errors import CqdError, storage_error


def _load(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cqd_mpi",
        description="CycleQD: quality-diversity merging of expert LLMs. "
        "With no command, runs the embedded demo on the CPU.",
    )
    parser.add_argument("--version", action="version", version=f"cqd_mpi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, add_help=False)
            continue
        module = _load(name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        build_parser(only="").error(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    if command is None and not any(a in ("-h", "--help", "--version") for a in argv):
        argv = [*argv, "demo"]
        command = "demo"
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(_load(args.command).run(args) or 0)
    except CqdError as exc:
        print(f"cqd_mpi: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        error = storage_error(exc)
        if error is None:
            raise
        logging.getLogger("cqd_mpi").debug("the file system refused", exc_info=True)
        print(f"cqd_mpi: error: {error}", file=sys.stderr)
        return 2
