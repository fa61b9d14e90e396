from pathlib import Path

import pytest
import yaml

from cqd_mpi.errors import ConfigError
from cqd_mpi.qd.params import SearchParams
from cqd_mpi.run import config as config_mod
from cqd_mpi.run import frozen as frozen_mod
from tests.conftest import probe_config, write_config

A_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "mbpp" / "MbppPlus-fixture.jsonl"


@pytest.fixture
def good(tiny_family, tmp_path):
    return probe_config(tiny_family, tmp_path / "run")


def load_dict(data, tmp_path):
    return config_mod.load(write_config(tmp_path / "c.yaml", data))


def test_valid_config_loads_with_defaults(good, tmp_path):
    config = load_dict(good, tmp_path)
    assert config.task_names == ["alpha", "beta", "gamma"]
    assert config.qd.crossover.mu == 1.0 and config.qd.crossover.sigma == 0.03
    assert config.qd.alpha_low == 0.5 and config.qd.alpha_high == 0.8
    assert config.qd.mutation.rank == 4 and config.qd.mutation.basis == "child"
    assert config.runtime.transport == "mpi" and config.runtime.pipeline_depth == 0
    assert config.tasks[0].bins == "auto"


def test_the_search_parameters_are_read_whole_from_the_config(good, tmp_path):
    good["qd"].update(alpha_low=0, crossover={"mu": 0.9, "sigma": 0.05}, bc_upper_factor=1.2)
    good["runtime"].update(pipeline_depth=2)
    params = load_dict(good, tmp_path).search_params()
    assert params == SearchParams(generations=6, seed=3, sampling="elite", alpha_low=0.0, alpha_high=0.8,
                                  crossover_mu=0.9, crossover_sigma=0.05, pipeline_depth=2, n_bins=4,
                                  bc_lower_factor=0.85, bc_upper_factor=1.2)
    assert type(params.alpha_low) is float


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["qd"].update(generatons=3), r"qd: unknown key 'generatons'; expected keys: generations"),
    (lambda c: c["qd"]["mutation"].update(w_max="big"), r"qd.mutation.w_max: expected a number, got 'big'"),
    (lambda c: c["qd"]["mutation"].update(rank="half"), r"qd.mutation.rank: expected an integer or 'full'"),
    (lambda c: c["qd"]["mutation"].update(kind="dropout"), r"qd.mutation.kind: expected one of 'svd' \| 'gaussian' \| 'none'"),
    (lambda c: c["qd"].update(generations=True), r"qd.generations: expected an integer, got True"),
    (lambda c: c["runtime"].update(pipeline_depth=-1), r"runtime.pipeline_depth: expected an integer >= 0"),
    (lambda c: c["runtime"].update(max_shard_size="lots"), r"runtime.max_shard_size: expected a size"),
    (lambda c: c["runtime"].update(eval_deadline=0), r"runtime.eval_deadline: expected 'auto' or a number of seconds > 0"),
    (lambda c: c["runtime"].update(eval_deadline="soon"), r"runtime.eval_deadline: expected 'auto' or a number, got 'soon'"),
    (lambda c: c.pop("runtime"), r"runtime: required key is missing"),
    (lambda c: c["tasks"][1].update(settings={"n_itemz": 3}), r"tasks\[1\].settings: unknown key 'n_itemz'"),
    (lambda c: c["tasks"][0].update(kind="nonsense"), r"tasks\[0\].kind: unknown task kind 'nonsense'"),
    (lambda c: c["tasks"][0].update(bins={"lower": 0.5, "upper": 0.2}), r"tasks\[0\].bins: expected upper > lower"),
    (lambda c: c["experts"][0].update(task="delta"), r"experts\[0\].task: expected one of the task names"),
    (lambda c: c["experts"].pop(), r"experts: expected an expert for every task, none given for gamma"),
    (lambda c: c.update(base="/does/not/exist"), r"base: expected a Hugging Face model directory, but /does/not/exist does not exist"),
    (lambda c: c["experts"][1].update(path=str(A_FILE)),
     r"experts\[1\].path: expected a Hugging Face model directory, but .*MbppPlus-fixture.jsonl is a file, not a directory"),
    (lambda c: c["tasks"][0].update(data="missing.jsonl"), r"tasks\[0\].data: file .*missing.jsonl does not exist"),
    (lambda c: c["qd"]["mutation"].update(exclude=["("]), r"qd.mutation.exclude\[0\]: invalid regular expression"),
    (lambda c: c["qd"]["mutation"].update(sketch_dtype="float16"),
     r"qd.mutation.sketch_dtype: expected one of 'float32' \| 'bfloat16', got 'float16'"),
    (lambda c: c["qd"]["mutation"].update(niter=-1), r"qd.mutation.niter: expected an integer >= 0, got -1"),
    (lambda c: c["qd"].update(method="annealing"), r"qd.method: unknown search method kind 'annealing'"),
    (lambda c: c["qd"].update(alpha_low=-0.1), r"qd.alpha_low: expected a number >= 0, got -0.1"),
    (lambda c: c["qd"].update(coefficients={"population": 1}), r"qd.coefficients.population: expected an integer >= 2"),
    (lambda c: c["qd"].update(coefficients={"lower": 1.0, "upper": 0.5}), r"qd.coefficients: expected upper > lower"),
    (lambda c: c.update(tracking={"tensorbord": True}), r"tracking: unknown key 'tensorbord'"),
    (lambda c: c.update(tracking={"wandb_mode": "cloud"}), r"tracking.wandb_mode: expected one of 'offline'"),
    (lambda c: c.update(tracking={"maps_every": -1}), r"tracking.maps_every: expected an integer >= 0, got -1"),
])
def test_bad_config_names_the_key(good, tmp_path, edit, message):
    edit(good)
    with pytest.raises(ConfigError, match=message):
        load_dict(good, tmp_path)


def one_task(config: dict, method: str) -> dict:
    config["tasks"], config["experts"] = config["tasks"][:1], config["experts"][:1]
    config["qd"]["method"] = method
    return config


@pytest.mark.parametrize("method", ["cycleqd", "nsga2", "qd"])
def test_one_task_is_refused_by_the_methods_that_need_several_naming_those_that_do_not(good, tmp_path, method):
    with pytest.raises(ConfigError, match=rf"c.yaml: qd.method: {method} needs at least 2 tasks \(with fewer there is no "
                                          r"other task to cycle or trade off against\), got 1 \(alpha\); with 1 "
                                          r"task\(s\) use cma-es or policy-gradient$"):
        load_dict(one_task(good, method), tmp_path)


def test_one_task_loads_with_cma_es(good, tmp_path):
    assert load_dict(one_task(good, "cma-es"), tmp_path).task_names == ["alpha"]


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("qd: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML") as raised:
        config_mod.load(path)
    # one line, where and what (PyYAML's own message spans five, with a caret drawing)
    assert str(raised.value).endswith("not valid YAML: line 2, column 1: expected ',' or ']', but got "
                                      "'<stream end>' (while parsing a flow sequence)"), str(raised.value)
    with pytest.raises(ConfigError, match="does not exist"):
        config_mod.load(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_config_file(good, tmp_path):
    good["runtime"]["run_dir"] = "runs/x"
    config = load_dict(good, tmp_path)
    assert config.runtime.run_dir == str((tmp_path / "runs" / "x").resolve())


def test_differences_ignore_result_neutral_keys(good, tmp_path):
    a = load_dict(good, tmp_path).to_dict()
    b = yaml.safe_load(yaml.safe_dump(a))
    b["runtime"]["eval_groups"] = 4
    b["runtime"]["transport"] = "file"
    b["engine"]["device"] = "cuda"
    assert frozen_mod.differences(a, b) == []
    b["qd"]["mutation"]["w_max"] = 0.1
    b["tasks"][1]["settings"]["n_items"] = 7
    assert frozen_mod.differences(a, b) == [
        "qd.mutation.w_max: 0.3 -> 0.1", "tasks[1].settings.n_items: 24 -> 7"]


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("512MiB", 512 * 2**20), ("100", 100), (7, 7)])
def test_parse_size(text, size):
    assert config_mod.parse_size(text) == size


def test_parse_size_is_one_function_for_the_config_and_the_writer():
    from cqd_mpi import schema
    from cqd_mpi.merging import weights

    assert config_mod.parse_size is schema.parse_size is weights.parse_size
    with pytest.raises(ConfigError, match=r"max_shard_size: expected a size of at least 1 bytes, got 0"):
        schema.parse_size(0, "max_shard_size", minimum=1)
    with pytest.raises(ConfigError, match=r"runtime.retain_child_bytes: expected a size such as '5GB'"):
        schema.parse_size("lots", "runtime.retain_child_bytes")


MBPP_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mbpp" / "MbppPlus-fixture.jsonl"


def with_mbpp(config, **task):
    """The probe config with its last task an MBPP+ task over the fixture."""
    config["tasks"][2] = {"name": "gamma", "kind": "mbpp", "data": str(MBPP_FIXTURE), **task}
    return config


def test_protocols_are_resolved_into_the_frozen_task_settings(good, tmp_path):
    from cqd_mpi.tasks import protocols

    config = load_dict(with_mbpp(good, settings={"max_new_tokens": 64}), tmp_path)
    assert config.protocol == "paper" and [t.protocol for t in config.tasks] == [None, None, "paper"]
    assert config.tasks[2].settings == {**protocols.MBPP["paper"], "max_new_tokens": 64}
    assert config.tasks[0].settings == good["tasks"][0]["settings"]
    frozen = yaml.safe_load(config.to_yaml())
    assert frozen["tasks"][2]["protocol"] == "paper" and frozen["tasks"][2]["settings"]["sanitizer"] == "authors"
    assert config_mod.from_dict(frozen, check_files=False).to_dict() == config.to_dict()

    good["protocol"] = "reference"
    config = load_dict(good, tmp_path)
    assert config.tasks[2].protocol == "reference" and config.tasks[2].settings["tests"] == "base+plus"
    good["tasks"][2]["protocol"] = "paper"
    assert load_dict(good, tmp_path).tasks[2].settings["tests"] == "base"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(protocol="evalplus"), r"^.*c\.yaml: protocol: expected one of 'paper', 'reference', got 'evalplus'"),
    (lambda c: c["tasks"][2].update(protocol="agentbench"),
     r"tasks\[2\]\.protocol: expected one of 'paper', 'reference' for task kind 'mbpp', got 'agentbench'"),
    (lambda c: c["tasks"][0].update(protocol="paper"),
     r"tasks\[0\]\.protocol: task kind 'probe' has no protocol presets, got 'paper'; remove the key"),
    (lambda c: c["tasks"][2].update(settings={"sanitizer": "regex"}),
     r"tasks\[2\]\.settings\.sanitizer: expected one of 'authors' \| 'evalplus', got 'regex'"),
])
def test_bad_protocols_name_the_key(good, tmp_path, edit, message):
    config = with_mbpp(good)
    edit(config)
    with pytest.raises(ConfigError, match=message):
        load_dict(config, tmp_path)


def test_the_run_wide_protocol_is_compared_through_the_tasks_it_resolves(good, tmp_path):
    paper = load_dict(with_mbpp(good), tmp_path).to_dict()
    good["protocol"] = "reference"
    inherited = load_dict(good, tmp_path).to_dict()
    changed = frozen_mod.differences(paper, inherited)
    assert "tasks[2].protocol: 'paper' -> 'reference'" in changed
    assert "tasks[2].settings.sanitizer: 'authors' -> 'evalplus'" in changed
    assert not any(c.startswith("protocol:") for c in changed)
    good["tasks"][2]["protocol"] = "paper"
    assert frozen_mod.differences(paper, load_dict(good, tmp_path).to_dict()) == []


def test_configs_frozen_before_protocols_resume(good, tmp_path):
    """A run frozen before protocols existed: tasks without presets compare equal after the
    upgrade; a task whose kind has presets lists the preset's values, since its scores change."""
    new = load_dict(good, tmp_path).to_dict()
    old = yaml.safe_load(yaml.safe_dump(new))
    del old["protocol"]
    for task in old["tasks"]:
        del task["protocol"]
    assert frozen_mod.differences(frozen_mod.upgrade(old), new) == []

    new = load_dict(with_mbpp(good, settings={"max_new_tokens": 64}), tmp_path).to_dict()
    old = yaml.safe_load(yaml.safe_dump(new))
    del old["protocol"], old["tasks"][2]["protocol"]
    old["tasks"][2]["settings"] = {"max_new_tokens": 64}
    changed = frozen_mod.differences(frozen_mod.upgrade(old), new)
    assert changed[0] == "tasks[2].protocol: None -> 'paper'"
    assert "tasks[2].settings.version: None -> 'v0.1.0'" in changed and len(changed) == 13


def test_methods_and_tracking_default_and_resolve(good, tmp_path):
    config = load_dict(good, tmp_path)
    assert config.qd.method == "cycleqd" and config.qd.coefficients.population == 8
    assert not config.tracking.tensorboard and not config.tracking.wandb
    good["tracking"] = {"tensorboard": True, "log_dir": "tb"}
    good["qd"]["method"] = "nsga2"
    config = load_dict(good, tmp_path)
    assert config.tracking.log_dir == str((tmp_path / "tb").resolve()) and config.qd.method == "nsga2"


def test_a_config_frozen_before_methods_and_tracking_resumes(good, tmp_path):
    new = load_dict(good, tmp_path).to_dict()
    frozen = yaml.safe_load(yaml.safe_dump(new))
    del frozen["qd"]["method"], frozen["qd"]["coefficients"], frozen["tracking"]
    assert frozen_mod.differences(frozen_mod.upgrade(frozen), new) == []
    new["tracking"]["tensorboard"] = True
    assert frozen_mod.differences(frozen_mod.upgrade(frozen), new) == []
    new["qd"]["method"] = "cma-es"
    assert frozen_mod.differences(frozen_mod.upgrade(frozen), new) == ["qd.method: 'cycleqd' -> 'cma-es'"]


def test_a_vllm_config_frozen_before_engine_settings_bos_resumes(good, tmp_path):
    """`engine.settings.bos` came later; a frozen vLLM config without it read the old way ('once')."""
    good["engine"] = {"kind": "vllm", "device": "cpu"}
    new = load_dict(good, tmp_path).to_dict()
    frozen = yaml.safe_load(yaml.safe_dump(new))
    del frozen["engine"]["settings"]["bos"]
    assert frozen_mod.differences(frozen_mod.upgrade(frozen), new) == []
    new["engine"]["settings"]["bos"] = "always"
    assert frozen_mod.differences(frozen_mod.upgrade(frozen), new) == ["engine.settings.bos: 'once' -> 'always'"]
