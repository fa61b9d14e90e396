"""What the embedded demos share: deterministic CPU training, and cached builds that are
renamed into place only when complete.

A build trains into a private temporary dir ``.<name>.tmp-<pid>`` beside the final one and
renames it to ``<name>`` when done, so an interrupted build is never reused; temporary dirs
of processes that are gone are removed by the next build; two concurrent builds leave one
complete dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """One thread and deterministic kernels (same bytes on every rebuild); no save progress bars."""
    from transformers.utils import logging as hf_logging

    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)
        if bars:
            hf_logging.enable_progress_bar()


def build_cached(root: Path, name: str, *, complete: Callable[[Path], bool], train: Callable[[Path], None]) -> Path:
    """root/name, built by `train(work_dir)` unless `complete(root/name)` already holds."""
    final = root / name
    if complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(root, name.rpartition("-")[0] or name)
    work = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        train(work)
        if not complete(final):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
    except OSError:
        if not complete(final):
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def remove_dead_builds(root: Path, prefix: str) -> None:
    """Remove ``.<prefix>-*.tmp-<pid>`` dirs whose process is gone."""
    for leftover in root.glob(f".{prefix}-*.tmp-*"):
        pid = leftover.name.rpartition("-")[2]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recipe_version(recipe, *, recipe_format: int) -> str:
    """A training recipe's cache version: sha256 of its fields and its builder's format, 12 hex digits."""
    text = json.dumps({"format": recipe_format, **dataclasses.asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def recipe_stamp(recipe) -> dict[str, Any]:
    """What a build's recipe.json holds, as JSON reads it back."""
    return json.loads(json.dumps({"version": recipe.version, **dataclasses.asdict(recipe)}))


def write_stamp(directory: Path, recipe) -> None:
    (directory / "recipe.json").write_text(json.dumps(recipe_stamp(recipe), indent=1) + "\n")


def has_stamp(directory: Path, recipe) -> bool:
    """Whether `directory` holds recipe.json of exactly this recipe."""
    try:
        saved = json.loads((directory / "recipe.json").read_text())
    except (OSError, ValueError):
        return False
    return saved == recipe_stamp(recipe)
