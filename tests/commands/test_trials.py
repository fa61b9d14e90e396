"""`python -m cqd_mpi trials`: the configs of the paper's comparison runs (run/trials.py)."""

from pathlib import Path

import yaml

from cqd_mpi.cli import main
from cqd_mpi.run import config as config_mod
from cqd_mpi.run.trials import TRIALS
from tests.conftest import probe_config, write_config


def test_one_config_per_trial_and_seed_differing_only_in_the_trial(tiny_family, tmp_path, capsys):
    source = write_config(tmp_path / "config.yaml", probe_config(tiny_family, tmp_path / "run"))
    assert main(["trials", str(source), "--seeds", "0", "4", "--out", str(tmp_path / "ablation")]) == 0
    paths = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"{t}-seed{s}.yaml" for t in TRIALS for s in (0, 4)]
    original = config_mod.load(source).to_dict()
    seen = set()
    for path in paths:
        config = config_mod.load(path)
        data = yaml.safe_load(Path(path).read_text())
        trial, seed = path.rsplit("/", 1)[1].removesuffix(".yaml").rsplit("-seed", 1)
        assert config.runtime.seed == int(seed)
        assert config.runtime.run_dir == str(tmp_path / "ablation" / f"{trial}-seed{seed}")
        assert config.qd.generations == original["qd"]["generations"]
        assert config.qd.mutation.rank == original["qd"]["mutation"]["rank"]
        for key in ("base", "experts", "tasks", "engine"):
            assert data[key] == original[key]
        learnt = config.qd.method in ("cma-es", "nsga2", "policy-gradient")
        seen.add((config.qd.method, "-" if learnt else config.qd.mutation.kind, "-" if learnt else config.qd.sampling))
    assert seen == {("qd", "none", "random"), ("cycleqd", "none", "random"), ("cycleqd", "gaussian", "random"),
                    ("cycleqd", "svd", "random"), ("cycleqd", "svd", "elite"), ("cma-es", "-", "-"),
                    ("nsga2", "-", "-"), ("policy-gradient", "-", "-")}


def test_one_trial_and_a_bad_config(tiny_family, tmp_path, capsys):
    source = write_config(tmp_path / "config.yaml", probe_config(tiny_family, tmp_path / "run"))
    assert main(["trials", str(source), "--trial", "cma-es", "--seeds", "1", "--out", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "a" / "cma-es-seed1.yaml")]
    broken = probe_config(tiny_family, tmp_path / "run")
    broken["qd"]["method"] = "annealing"
    write_config(tmp_path / "broken.yaml", broken)
    assert main(["trials", str(tmp_path / "broken.yaml"), "--out", str(tmp_path / "b")]) == 2
    assert "qd.method: unknown search method kind 'annealing'" in capsys.readouterr().err
