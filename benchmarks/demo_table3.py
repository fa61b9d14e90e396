"""The generalization table (`evaluate`, the paper's Table 3) for a finished demo run, on local
lm-eval tasks built from the demo's skills with held-out inputs.

    python -m cqd_mpi demo llm --run-dir cqd-demo          # the run (minutes; reuses the model cache)
    python benchmarks/demo_table3.py cqd-demo [--docs 100] [--seed 1]

For each demo skill (reverse, sort, shift) it writes two lm-eval task YAMLs with a local JSONL
file into RUN_DIR/demo-lmeval-tasks/: `demo_<skill>_gen` (generate_until, exact match of the
greedy answer) and `demo_<skill>_mc` (multiple_choice: log-likelihood of the answer against
three near misses (`near_misses`), accuracy). Inputs come from cqd_mpi.tasks.skills with
another seed than the run's items (default 1; the run used 0), so these are held-out documents.
Then it runs `python -m cqd_mpi evaluate RUN_DIR --suite ...` (offline: HF_DATASETS_OFFLINE=1),
which prints the final model's, the experts' and the base's scores, each divided by the
base's, with their average; docs/lm-eval.md holds one such table. Not a test: the demo takes
minutes to train and run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cqd_mpi.tasks import skills  # noqa: E402

DEMO_SKILLS = ("reverse", "sort", "shift")


def near_misses(question: str, answer: str, skill: str, rng: np.random.Generator) -> list[str]:
    """Wrong answers close to the right one: the input left as it is, the answer with one symbol
    changed, with two neighbours swapped, and with its first symbol dropped."""
    text = question.split(":", 1)[1].removesuffix("=")
    alphabet = skills.SKILLS[skill].alphabet
    at = int(rng.integers(0, len(answer)))
    changed = answer[:at] + alphabet[(alphabet.index(answer[at]) + 1) % len(alphabet)] + answer[at + 1:]
    at = int(rng.integers(0, len(answer) - 1))
    swapped = answer[:at] + answer[at + 1] + answer[at] + answer[at + 2:]
    return [text, changed, swapped, answer[1:], answer + answer[-1]]


def write_tasks(out: Path, *, docs: int, seed: int, max_length: int = 12) -> list[dict]:
    """The task YAMLs and data of every skill in `out`; returns the suite's task entries."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for skill in DEMO_SKILLS:
        settings = skills.Settings(skill=skill, n_items=docs, seed=seed, max_length=max_length)
        pairs = list(skills.items(settings).values())
        rng = np.random.default_rng(seed)
        rows = []
        for index, (question, answer) in enumerate(pairs):
            others = [c for c in dict.fromkeys(near_misses(question, answer, skill, rng)) if c != answer][:3]
            label = int(rng.integers(0, 4))
            choices = [*others[:label], answer, *others[label:]]
            rows.append({"id": index, "question": question, "answer": answer, "choices": choices, "label": label})
        data = out / f"demo_{skill}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                  "test_split": "test", "doc_to_text": "{{question}}", "target_delimiter": ""}
        tasks = {
            f"demo_{skill}_gen": {**common, "output_type": "generate_until", "doc_to_target": "{{answer}}",
                                  "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_length + 1,
                                                        "do_sample": False},
                                  "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                                   "higher_is_better": True}]},
            f"demo_{skill}_mc": {**common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                                 "doc_to_target": "label",
                                 "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        }
        for name, body in tasks.items():
            (out / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **body}, sort_keys=False))
            entries.append({"name": name.removeprefix("demo_"), "kind": "lm-eval", "batch_size": 32,
                            "settings": {"task": name, "include_path": str(out)}})
    return entries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished demo run (python -m cqd_mpi demo llm --run-dir ...)")
    parser.add_argument("--docs", type=int, default=100, help="documents per skill (default 100)")
    parser.add_argument("--seed", type=int, default=1, help="the documents' seed (the run's items use 0)")
    args = parser.parse_args()
    run_dir = args.run_dir.resolve()
    out = run_dir / "demo-lmeval-tasks"
    suite = {"name": "demo_table3", "models": ["final", "experts", "base"],
             "tasks": write_tasks(out, docs=args.docs, seed=args.seed)}
    suite_path = out / "demo_table3.yaml"
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "cqd_mpi", "evaluate", str(run_dir), "--suite", str(suite_path)]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
