"""The textvqa task: the VQA accuracy against values computed by hand from its definition,
TextVQA's JSON and a jsonl manifest load, bad entries are named at load, answers are scored."""

import json

import numpy as np
import pytest

from cqd_mpi import schema
from cqd_mpi.engines.base import VisualQuestionAnswering
from cqd_mpi.errors import ConfigError, TaskError
from cqd_mpi.tasks import task_class
from cqd_mpi.tasks.base import TaskContext
from cqd_mpi.tasks.textvqa import LLAVA_PROMPT, Settings, TextVQATask
from cqd_mpi.tasks.vqa_accuracy import normalize, vqa_accuracy
from tests.vqa_data import COLOURS, manifest, textvqa

pytest.importorskip("PIL", reason="pip install 'cqd_mpi[vqa]'")


def by_hand(n: int) -> float:
    """n of 10 answers match: n leave-one-out subsets hold n-1 matches, 10-n hold n."""
    return (n * min((n - 1) / 3, 1) + (10 - n) * min(n / 3, 1)) / 10


@pytest.mark.parametrize("prediction, answers, expected", [
    ("two", ["2"] * 3 + ["4"] * 7, 0.9),                        # a number word against digits, 3 matches
    ("Two", ["two", "2"] + ["three"] * 8, 0.6),                  # both written forms count
    ("the dog", ["dog"] * 2 + ["cat"] * 8, 0.6),                 # the article dropped
    ("a cat", ["dog"] * 2 + ["cat"] * 8, 1.0),                   # 8 matches: every subset holds >= 3
    ("Hello!", ["hello"] + ["bye"] * 9, 0.3),                    # punctuation, a single match
    ("coca-cola", ["coca cola"] * 2 + ["pepsi"] * 8, 0.6),       # a hyphen inside a word is a space
    ("yes.", ["yes"] * 4 + ["no"] * 6, 1.0),                     # a final period dropped, 4 matches
    ("3.5", ["35"] * 10, 0.0),                                   # a decimal point is kept
    ("1,000", ["1000"] * 3 + ["10"] * 7, 0.9),                   # commas dropped
    ("dont", ["don't"] * 3 + ["do"] * 7, 0.9),                   # contractions get their apostrophe
    ("none", ["0"] + ["no"] * 9, 0.3),
    ("red", ["blue"] * 10, 0.0),
    ("red", ["red"], 1.0),                                       # one answer: its exact match
])
def test_accuracy_matches_the_definition(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_leave_one_out_average_for_every_match_count():
    assert [round(by_hand(n), 10) for n in range(5)] == [0.0, 0.3, 0.6, 0.9, 1.0]
    for n in range(11):
        assert vqa_accuracy("x", ["x"] * n + ["y"] * (10 - n)) == pytest.approx(by_hand(n), abs=1e-12)
    assert normalize("The Three  Dogs!") == "3 dogs"
    assert normalize("a") == normalize("the") == ""


class ColourReader(VisualQuestionAnswering):
    """Names the colour nearest the image's mean: a deterministic stand-in with the capability."""

    def __init__(self):
        self.questions = []

    def answer(self, images, questions, *, max_new_tokens, stop=()):
        self.questions.extend(questions)
        names = list(COLOURS)
        means = [np.asarray(image, dtype=float).reshape(-1, 3).mean(0) for image in images]
        return [names[int(np.argmin([np.abs(mean - COLOURS[c]).sum() for c in names]))] for mean in means]


def make(data, **settings):
    return TextVQATask(name="vqa", data=str(data), settings=schema.build(Settings, settings, "settings"),
                       context=TaskContext())


def test_textvqa_json_and_manifest_score_answers(tmp_path):
    assert task_class("textvqa") is TextVQATask
    task = make(textvqa(tmp_path / "tv", n=6))
    assert task.item_ids() == [str(34602 + i) for i in range(6)]
    reader = ColourReader()
    results = task.evaluate(reader, task.item_ids())
    # 7 plain + "a red" + "RED" normalise to the answer: 9 of 10 match
    assert [r.score for r in results] == [1.0] * 6
    assert reader.questions[0] == LLAVA_PROMPT.format(question="what colour is it?")
    assert [r.score for r in task.reference_results(task.item_ids())] == [1.0] * 6

    task = make(manifest(tmp_path / "mf", n=4), prompt="Q: {question} A:", max_items=3)
    reader = ColourReader()
    assert [r.item_id for r in task.evaluate(reader, task.item_ids())] == ["q0", "q1", "q2"]
    assert reader.questions == ["Q: colour? A:"] * 3


def test_bad_entries_are_named_at_load(tmp_path):
    path = textvqa(tmp_path, n=4)
    content = json.loads(path.read_text())
    content["data"][1]["answers"] = []
    (tmp_path / "train_images" / f"{content['data'][2]['image_id']}.jpg").unlink()
    (tmp_path / "train_images" / f"{content['data'][3]['image_id']}.jpg").write_bytes(b"\xff\xd8not a jpeg")
    path.write_text(json.dumps(content))
    with pytest.raises(TaskError) as caught:
        make(path)
    message = str(caught.value)
    assert "\n" not in message and "3 bad entries" in message
    assert "data[1] (id 34603): expected a non-empty list of answers, got []" in message
    assert "data[2] (id 34604): its image" in message and "does not exist" in message
    assert "data[3] (id 34605): its image" in message and "is unreadable" in message

    lines = manifest(tmp_path / "m", n=3)
    lines.write_text(lines.read_text() + json.dumps({"id": "q9", "image": "img/q0.png", "question": "?"}) + "\n")
    with pytest.raises(TaskError, match=r"line 4 \(id q9\): expected a non-empty list of answers, got None"):
        make(lines)
    with pytest.raises(ConfigError, match=r"settings.prompt: expected a format with \{question\}"):
        schema.build(Settings, {"prompt": "no field"}, "settings")
