"""Command-line entry point: `python -m cqd_mpi [COMMAND] ...`; no command runs the demo."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
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


# Set (where unset) before anything imports huggingface_hub, which reads them at import: a
# compute node never downloads, and a job's log has no progress bars.
ENVIRONMENT_DEFAULTS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str] | None = None) -> int:
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
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
    out = sys.stdout = _Stdout(sys.stdout)
    try:
        status = int(_load(args.command).run(args) or 0)
        sys.stdout.flush()
        return status
    except CqdError as exc:
        print(f"cqd_mpi: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout(out)
        return 1
    except OSError as exc:
        error = storage_error(exc, stdout=out.failed)
        if error is None:
            raise
        logging.getLogger("cqd_mpi").debug("the file system refused", exc_info=True)
        print(f"cqd_mpi: error: {error}", file=sys.stderr)
        return 2
    finally:
        if out.failed:
            _silence_stdout(out)
        elif sys.stdout is out:
            sys.stdout = out.stream


class _Stdout:
    """sys.stdout while a command runs, noting whether writing it failed (a full disk, /dev/full, a
    closed pipe): such an OSError names no file, and the one-line error must say it was stdout."""

    def __init__(self, stream):
        self.stream, self.failed = stream, False

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError:
            self.failed = True
            raise

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            self.failed = True
            raise

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _silence_stdout(out: _Stdout) -> None:
    """Point the failed stdout at /dev/null, so that exiting does not fail on it a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        os.dup2(devnull, out.stream.fileno())
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout for the rest of this process
