"""The CLI's one-line errors: every subcommand with an output it cannot write prints one line and
exits 2; a read-only run directory; a disk that fills while a model or the state is saved (and the
run then resumes)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from cqd_mpi import faults
from cqd_mpi.cli import main
from cqd_mpi.commands import COMMANDS
from tests.analysis.runs import finished_run
from tests.conftest import probe_config, subprocess_env, write_config

STDOUT = "the standard output"


def error_lines(err: str) -> list[str]:
    """stderr's lines less the progress bars transformers draws while loading: the error must be
    the one line left, with no traceback."""
    assert "Traceback" not in err, err
    return [line for line in err.strip().splitlines() if "it/s]" not in line]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_family):
    return finished_run(tmp_path_factory, tiny_family, 3)


@pytest.fixture
def blocker(tmp_path):
    """A regular file: any path under it cannot be created, whoever runs the test (root included)."""
    path = tmp_path / "a-file"
    path.write_text("not a directory\n")
    return path


def two_task_config(tiny_family, run_dir, **overrides) -> dict:
    experts = dict(list(tiny_family["experts"].items())[:2])
    config = probe_config({"base": tiny_family["base"], "experts": experts}, run_dir,
                          **{"qd.generations": 2, "qd.n_bins": 3, **overrides})
    for task in config["tasks"]:
        task["settings"]["n_items"] = 8
    return config


def sweep_cases(family, run, blocker, tmp_path) -> dict[str, tuple[list[str], str]]:
    """Each subcommand's arguments with an unwritable output, and what the error line must name."""
    config = write_config(tmp_path / "config.yaml", two_task_config(family, blocker / "run"))
    base, (a, b, *_) = str(family["base"]), [str(p) for p in family["experts"].values()]
    return {
        "run": (["run", str(config)], str(blocker)),
        "demo": (["demo", "--run-dir", str(blocker / "demo"), "--cache-dir", str(blocker / "cache")], str(blocker)),
        "merge": (["merge", "--base", base, "--parents", a, b, "--seed", "0", "--out", str(blocker / "child")], str(blocker)),
        "analyze": (["analyze", str(run), "--out", str(blocker / "plots")], str(blocker / "plots")),
        "export": (["export", str(run), "--aggregate", str(blocker / "agg")], str(blocker)),
        "compare": (["compare", str(run), "--chart", str(blocker / "chart.png")], str(blocker)),
        "trials": (["trials", str(config), "--out", str(blocker / "trials")], str(blocker / "trials")),
        "similarity": (["similarity", a, b, "--base", base], STDOUT),
        "doctor": (["doctor"], STDOUT),
        "check-tasks": (["check-tasks", str(config), "--limit", "2"], STDOUT),
        "evaluate": (["evaluate", str(run), "--suite", str(probe_suite(tmp_path)), "--limit", "2"], STDOUT),
    }


def probe_suite(tmp_path):
    """A suite of one probe task scored on the base only: evaluate's output then is its table."""
    task = {"name": "alpha", "kind": "tests.runtime.probe_task:ProbeTask", "settings": {"n_items": 4, "salt": "a"}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "sweep", "tasks": [task], "models": ["base"]}))
    return path


def test_the_sweep_covers_every_subcommand(tiny_family, tmp_path):
    assert set(sweep_cases(tiny_family, tmp_path, tmp_path / "f", tmp_path)) == set(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_with_an_unwritable_output_prints_one_line_and_exits_2(
        command, tiny_family, run_dir, blocker, tmp_path, capsys, monkeypatch):
    argv, named = sweep_cases(tiny_family, run_dir, blocker, tmp_path)[command]
    with contextlib.ExitStack() as stack:
        if named == STDOUT:
            monkeypatch.setattr(sys, "stdout", stack.enter_context(open("/dev/full", "w")))
        assert main(argv) == 2
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"cqd_mpi: error: cannot use {named}"), lines[0]
    assert lines[0].endswith(("(ENOTDIR); a part of the path is a file, not a directory",
                              "(EEXIST); a file is where a directory was to be made",
                              "(ENOSPC); redirect it elsewhere")), lines[0]
    if command == "compare":
        assert "Test-split scores" in captured.out and "| base |" in captured.out


def test_a_full_stdout_in_a_real_process_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, "-m", "cqd_mpi", "doctor"], env=subprocess_env(),
                          stdout=open("/dev/full", "w"), stderr=subprocess.PIPE, text=True, timeout=120)  # noqa: SIM115
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"cqd_mpi: error: cannot use {STDOUT}: No space left on device (ENOSPC); "
                                        "redirect it elsewhere"]


@contextlib.contextmanager
def read_only(path):
    """`path` read-only as a user meets it: a read-only bind mount as root (whom permissions do not
    stop), the write bits cleared otherwise."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield "EACCES"
        finally:
            path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root here cannot make a read-only bind mount ({mounted.stderr.strip()}); "
                    "run as a non-root user or with CAP_SYS_ADMIN")
    try:
        yield "EROFS"
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_run_dir_is_one_line_for_run_and_analyze(run_dir, tmp_path, tiny_family, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    frozen = (copy / "config.yaml").read_text().replace(str(run_dir), str(copy))
    config = write_config(tmp_path / "config.yaml", yaml.safe_load(frozen))
    with read_only(copy) as code:
        assert main(["analyze", str(copy), "--no-plots"]) == 0
        capsys.readouterr()
        for argv in (["analyze", str(copy)], ["run", str(config)]):
            assert main(argv) == 2
            err = error_lines(capsys.readouterr().err)
            assert len(err) == 1 and err[0].startswith(f"cqd_mpi: error: cannot use {copy}/"), err
            assert f"({code})" in err[0]


def test_a_disk_filling_while_a_model_or_the_state_is_saved_is_one_line_and_the_run_resumes(
        tiny_family, tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "config.yaml", two_task_config(tiny_family, tmp_path / "run"))
    for fault, named in (("save-model:enospc", r"/run/models/\d+\.tmp-\w+/model.safetensors"),
                         ("checkpoint:enospc:2", r"/run/state.h5.tmp-\d+")):
        monkeypatch.setenv("CQD_MPI_FAULT", fault)
        monkeypatch.setattr(faults, "_hits", {})
        assert main(["run", str(config)]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1, err
        assert re.fullmatch(
            rf"cqd_mpi: error: cannot use {tmp_path}{named}: No space left on device \(ENOSPC\); the disk is full: "
            r"free space \(or point the output elsewhere\) and rerun; a run resumes from its last checkpoint", err[0])
        assert (tmp_path / "run" / "state.h5").exists()
        assert not list((tmp_path / "run").glob("state.h5.tmp-*"))
        assert not list((tmp_path / "run" / "models").glob("*.tmp-*"))
    monkeypatch.delenv("CQD_MPI_FAULT")
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "CycleQD aggregate" in out
    from cqd_mpi.analysis.runstate import RunState

    assert RunState.load(tmp_path / "run").phase == "done"
