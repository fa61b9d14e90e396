"""The model card of a merged model: README.md with the YAML front matter the Hugging Face Hub
reads (base_model, the merged models, tags, the base's license) and the method, the recipe, the
lineage and the test scores, as mergekit writes one for its merges. `export` and a run's `final`
write it; huggingface_hub's ModelCard loads it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from cqd_mpi.qd.search import Search

LINEAGE_LINES = 40
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[0-9a-f]+/?$")


def model_name(path: str | Path) -> str:
    """A model's hub id when its directory is a Hugging Face cache snapshot, else its path."""
    found = _SNAPSHOT.search(str(path))
    return f"{found.group('org')}/{found.group('name')}" if found else str(path)


def base_license(base: str | Path) -> str | None:
    """The `license` of the base's own card (README.md front matter), if it has one."""
    readme = Path(base) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        data = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return None
    value = data.get("license") if isinstance(data, dict) else None
    return str(value) if value else None


def lineage(core: Search, roots: Sequence[int]) -> list[str]:
    """The recipe tree under `roots`, one model a line, each model expanded once."""
    lines: list[str] = []
    seen: set[int] = set()

    def walk(model_id: int, depth: int) -> None:
        if len(lines) >= LINEAGE_LINES:
            return
        record, recipe = core.models[model_id], core.recipe(model_id)
        label = f"#{model_id} {record.kind}"
        if record.kind == "expert":
            label += f" {core.task_names[core.expert_ids.index(model_id)]}"
        if record.kind == "child":
            label += (f" (generation {record.generation}, active task {core.task_names[recipe.active_task]}: "
                      f"crossover of #{recipe.parents[0]} x {recipe.weights[0]:.4g} and #{recipe.parents[1]} x "
                      f"{recipe.weights[1]:.4g}, mutation seed {recipe.mutation_seed})")
        elif recipe.members:
            label += " (" + ", ".join(f"#{m} x {b:.4g}" for m, b in zip(recipe.members, recipe.betas)) + ")"
        if model_id in seen:
            lines.append("  " * depth + f"- {label} (above)")
            return
        seen.add(model_id)
        lines.append("  " * depth + f"- {label}")
        for parent in (*[p for p in recipe.parents if p >= 0], *recipe.members):
            walk(parent, depth + 1)

    for root in roots:
        walk(root, 0)
    return lines


def _score(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def model_card(*, core: Search, title: str, recipe: str, roots: Sequence[int] = (),
               scores: Mapping[int, str] | None = None) -> str:
    """README.md text. The base and the experts are the run's (their directories as the core
    records them); `roots`: the models whose lineage is shown; `scores`: model id -> row label of
    the test-score table (the merged model first)."""
    base = core.models[core.base_id].source
    experts = {task: core.models[e].source for task, e in zip(core.task_names, core.expert_ids)}
    names = [model_name(p) for p in experts.values()]
    front: dict = {"base_model": [model_name(base), *names], "base_model_relation": "merge",
                   "tags": ["merge", "cycleqd", core.method], "library_name": "transformers"}
    license_ = base_license(base)
    if license_:
        front["license"] = license_
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             f"Merged with cqd_mpi by {core.label} (`qd.method: {core.method}`, "
             f"{core.generations_done} of {core.generations} generations) from the base "
             f"`{model_name(base)}` and one expert per task:", ""]
    lines += [f"- {task}: `{name}`" for task, name in zip(experts, names)]
    lines += ["", "## Recipe", "", recipe, ""]
    if roots:
        lines += ["## Lineage", "", *lineage(core, roots), ""]
    if scores:
        lines += ["## Test scores (%)", "", "| model | " + " | ".join(core.task_names) + " | mean |",
                  "|---" * (len(core.task_names) + 2) + "|"]
        for model_id, label in scores.items():
            values = list(core.models[model_id].test_scores)
            finite = [v for v in values if not math.isnan(v)]
            mean = sum(finite) / len(finite) if len(finite) == len(values) and values else math.nan
            lines.append(f"| {label} | " + " | ".join(_score(v) for v in values) + f" | {_score(mean)} |")
        lines.append("")
    return "\n".join(lines)


def write_card(out_dir: str | Path, **card) -> Path:
    """Write `model_card(**card)` as out_dir/README.md."""
    path = Path(out_dir) / "README.md"
    path.write_text(model_card(**card), encoding="utf-8")
    return path


def score_rows(core: Search, model_id: int, label: str) -> dict[int, str]:
    """The merged model, then the base and the experts, for the card's score table."""
    rows = {model_id: label, core.base_id: "base"}
    rows.update({e: f"expert {t}" for t, e in zip(core.task_names, core.expert_ids)})
    return rows


def final_card(core: Search, model_id: int) -> dict:
    """The card arguments of a run's final model (RUN_DIR/final, `export --model` of it)."""
    recipe = core.recipe(model_id)
    members = ", ".join(f"#{m} ({t}) x {b:.6g}" for m, t, b in zip(recipe.members, core.task_names, recipe.betas))
    return {"core": core, "title": f"{core.final_label} of {', '.join(core.task_names)}",
            "recipe": f"{core.final_label}: the base plus the task vectors of the archives' elites, "
                      f"weighted {members}." if members else f"{core.final_label} (model #{model_id}).",
            "roots": [model_id], "scores": score_rows(core, model_id, core.final_label)}
