"""The paper's Table 5 set-up in miniature: two text skills and a textvqa skill, a tiny text base,
two text experts and a tiny LLaVA expert whose language model has extra vocabulary rows. One run
under `mpiexec -n 3` (two workers), killed (kill -9) and resumed, equals an uninterrupted run
with one worker;
every saved model is a LLaVA directory that from_pretrained loads and that answers an image
question; a vision-language expert whose language model is not the base's is refused at load."""

import shutil

import numpy as np
import pytest

from cqd_mpi.errors import ConfigError, WeightsError
from cqd_mpi.run import config as config_mod
from cqd_mpi.run.state import read_state
from tests.conftest import subprocess_env, write_config
from tests.runtime.helpers import assert_same_results, run_cli
from tests.tiny_llava import save_tiny_llava

pytestmark = pytest.mark.mpi
pytest.importorskip("PIL", reason="pip install 'cqd_mpi[vqa]'")
if shutil.which("mpiexec") is None:
    pytest.fail("mpiexec is not on PATH: install the test extra (pip install -e '.[test]'), which brings the mpich wheel",
                pytrace=False)


def vision_config(family, run_dir, **engine):
    probe = "tests.runtime.probe_task:ProbeTask"
    return {
        "base": str(family["base"]),
        "experts": [{"task": name, "path": str(path)} for name, path in family["experts"].items()],
        "tasks": [{"name": "alpha", "kind": probe, "settings": {"n_items": 6, "salt": "alpha"}, "batch_size": 4},
                  {"name": "beta", "kind": probe, "settings": {"n_items": 6, "salt": "beta"}, "batch_size": 4},
                  {"name": "vqa", "kind": "textvqa", "data": str(family["vqa_data"]),
                   "settings": {"max_new_tokens": 3, "max_items": 6}, "batch_size": 3}],
        "qd": {"generations": 3, "n_bins": 3, "mutation": {"kind": "svd", "rank": 4, "w_max": 0.3}},
        "runtime": {"run_dir": str(run_dir), "seed": 3, "threads": 1},
        "engine": {"kind": "llava", "device": "cpu", "settings": {"batch_size": 8}, **engine},
    }


@pytest.fixture(scope="module")
def runs(vl_family, tmp_path_factory):
    """One worker uninterrupted (in this process); two workers (mpiexec -n 3) killed during a merge,
    then resumed."""
    from cqd_mpi.runtime.launch import conduct, pin_threads

    root = tmp_path_factory.mktemp("vision-run")
    one = config_mod.load(write_config(root / "one.yaml", vision_config(vl_family, root / "one")))
    pin_threads(one)
    assert conduct(one, echo=lambda line: None) == "done"
    two = write_config(root / "two.yaml", vision_config(vl_family, root / "two"))
    killed = run_cli("run", two, mpi_ranks=3, env=subprocess_env(CQD_MPI_FAULT="merge@0:kill:6"), timeout=240)
    assert killed.returncode != 0
    assert read_state(root / "two" / "state.h5")["attrs"]["phase"] == "search"
    resumed = run_cli("run", two, mpi_ranks=3, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    return {"one": root / "one", "two": root / "two", "table": resumed.stdout}


def test_killed_two_worker_run_resumes_to_the_one_worker_state(runs):
    assert read_state(runs["two"] / "state.h5")["attrs"]["world_size"] == 3
    assert_same_results(runs["one"], runs["two"])
    assert "vqa" in runs["table"] and "expert vqa" in runs["table"]


def test_analyze_and_compare_show_the_vqa_column(runs):
    from cqd_mpi.analysis import compare
    from cqd_mpi.analysis.runstate import RunState, summary

    text = summary(RunState.load(runs["two"]))
    assert "alpha     beta      vqa     mean" in text
    markdown = compare.format_markdown(compare.table([compare.read_run(runs["two"])]), ["alpha", "beta", "vqa"])
    assert "| alpha | beta | vqa | Avg |" in markdown and "| expert vqa |" in markdown


def test_every_saved_model_is_a_llava_that_answers_an_image_question(runs, vl_family):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run = runs["two"]
    saved = [*sorted((run / "models").iterdir()), run / "final", *sorted((run / "lifted").iterdir())]
    assert len(saved) >= 5 and {p.name for p in (run / "lifted").iterdir()} == {"base", "expert-alpha", "expert-beta"}
    image = np.full((24, 24, 3), (220, 30, 30), dtype=np.uint8)
    for path in saved:
        processor = AutoProcessor.from_pretrained(path)
        model = LlavaForConditionalGeneration.from_pretrained(path)
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it"}]}],
            add_generation_prompt=True)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert output.shape[1] > inputs["input_ids"].shape[1] and isinstance(answer[0], str), path


def test_a_vlm_whose_language_model_is_not_the_base_is_refused_at_load(vl_family, tmp_path):
    other = save_tiny_llava(tmp_path / "wide", language_model=None, seed=2, hidden_size=48)
    family = {**vl_family, "experts": {**vl_family["experts"], "vqa": other}}
    with pytest.raises(WeightsError, match=r"^the language model of .*wide is not the base's: its tensor "
                                           r"'language_model\.lm_head\.weight' is \[50, 48\] F32"):
        config_mod.from_dict(vision_config(family, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"engine\.kind: the expert .* is a vision-language model, which the "
                                          r"engine TransformersEngine cannot hold"):
        text_only = vision_config(vl_family, tmp_path / "run", kind="transformers")
        text_only["tasks"][2] = {**text_only["tasks"][0], "name": "vqa"}
        config_mod.from_dict(text_only)
    config = vision_config(vl_family, tmp_path / "run")
    config["vision"] = {"expert": "alpha"}
    with pytest.raises(ConfigError, match=r"vision\.expert: expected the task of a vision-language expert"):
        config_mod.from_dict(config)
