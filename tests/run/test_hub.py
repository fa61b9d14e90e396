"""Hub ids (run/hub.py): `org/name[@revision]` resolved from a local Hugging Face cache built here,
never downloaded; a run over hub ids runs and resumes, and a resume against another revision is
refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cqd_mpi import faults
from cqd_mpi.cli import main
from cqd_mpi.errors import ConfigError
from cqd_mpi.run import config as config_mod
from tests.conftest import probe_config, write_config

FIRST, SECOND = "1" * 40, "2" * 40


def cache_model(cache: Path, repo: str, source: Path, revisions: dict[str, str]) -> None:
    """`source` as huggingface_hub's cache lays a download out: snapshots/<commit>/ and refs/<name>."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    for ref, commit in revisions.items():
        if not (folder / "snapshots" / commit).exists():
            shutil.copytree(source, folder / "snapshots" / commit)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tiny_family, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache_model(cache, "cqd/tiny-base", tiny_family["base"], {"main": FIRST, "v2": SECOND})
    snapshot = cache / "models--cqd--tiny-base" / "snapshots" / FIRST
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the tiny base\n")
    for name, path in list(tiny_family["experts"].items())[:2]:
        cache_model(cache, f"cqd/expert-{name}", path, {"main": FIRST})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def hub_config(tiny_family, tmp_path, base="cqd/tiny-base") -> Path:
    experts = {name: f"cqd/expert-{name}" for name in list(tiny_family["experts"])[:2]}
    config = probe_config({"base": base, "experts": experts}, tmp_path / "run",
                          **{"qd.generations": 2, "qd.n_bins": 3})
    for task in config["tasks"]:
        task["settings"]["n_items"] = 8
    return write_config(tmp_path / "config.yaml", config)


def test_hub_ids_resolve_to_their_snapshot_in_the_local_cache(hub, tiny_family, tmp_path):
    config = config_mod.load(hub_config(tiny_family, tmp_path))
    assert config.base == str(hub / "models--cqd--tiny-base" / "snapshots" / FIRST)
    assert config.expert_path("alpha") == str(hub / "models--cqd--expert-alpha" / "snapshots" / FIRST)
    for revision in ("v2", SECOND):
        config = config_mod.load(hub_config(tiny_family, tmp_path, base=f"cqd/tiny-base@{revision}"))
        assert config.base == str(hub / "models--cqd--tiny-base" / "snapshots" / SECOND)


@pytest.mark.parametrize("base, fetch", [("cqd/absent", "huggingface-cli download cqd/absent"),
                                         ("cqd/tiny-base@v9", "huggingface-cli download cqd/tiny-base --revision v9")])
def test_a_model_absent_from_the_cache_is_one_line_saying_how_to_fetch_it(hub, tiny_family, tmp_path, base, fetch):
    with pytest.raises(ConfigError) as error:
        config_mod.load(hub_config(tiny_family, tmp_path, base=base))
    message = str(error.value)
    assert "\n" not in message and f"base: {base} is neither a directory nor a model in the local Hugging Face " \
        f"cache {hub}" in message
    assert f"fetch it on a login node with `{fetch}`" in message


def test_a_run_over_hub_ids_runs_and_resumes_and_another_revision_is_refused(hub, tiny_family, tmp_path, capsys,
                                                                             monkeypatch):
    config = hub_config(tiny_family, tmp_path)
    monkeypatch.setenv("CQD_MPI_FAULT", "checkpoint:raise:3")
    monkeypatch.setattr(faults, "_hits", {})
    with pytest.raises(faults.InjectedFault):
        main(["run", str(config)])
    monkeypatch.delenv("CQD_MPI_FAULT")
    assert main(["run", str(config)]) == 0
    assert "resuming" in capsys.readouterr().out
    frozen = (tmp_path / "run" / "config.yaml").read_text()
    assert f"snapshots/{FIRST}" in frozen
    assert main(["run", str(hub_config(tiny_family, tmp_path, base=f"cqd/tiny-base@{SECOND}"))]) == 2
    err = capsys.readouterr().err
    assert "base" in err and SECOND in err and "Traceback" not in err

    from huggingface_hub import ModelCard

    experts = [f"cqd/expert-{name}" for name in list(tiny_family["experts"])[:2]]
    for out in (tmp_path / "run" / "final", tmp_path / "elite"):
        if out.name == "elite":
            assert main(["export", str(tmp_path / "run"), "--elite", "alpha", str(out)]) == 0
        card = ModelCard.load(out / "README.md")
        assert card.data.base_model == ["cqd/tiny-base", *experts] and card.data.license == "apache-2.0"
        assert card.data.tags[:2] == ["merge", "cycleqd"] and card.data.base_model_relation == "merge"
        for section in ("## Recipe", "## Lineage", "## Test scores (%)", "| base |", "- alpha: `cqd/expert-alpha`"):
            assert section in card.text, (out, section)
    assert "CycleQD aggregate" in ModelCard.load(tmp_path / "run" / "final" / "README.md").text
