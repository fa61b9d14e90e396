"""The paper's Table 3 for a run: each model's scores on a suite of held-out tasks,
normalised by the base model's, with their average, as markdown, CSV, JSON and a PNG.

The input is RUN_DIR/evaluations/<suite>.json as `evaluate` writes it:
``{"suite": name, "tasks": [...], "models": {label: {"path": ..., "scores": {task: {"score": s,
"items": n, "errors": e}}}}}``. A normalised score is score / base score (NaN where the base
scores 0 or either is missing); the average is over the tasks with a normalised score.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path

BASE = "base"


def table(results: Mapping) -> list[dict]:
    """One row per model, base first: label, raw scores, normalised scores and their average."""
    tasks = list(results["tasks"])
    models = results["models"]
    base = models.get(BASE, {}).get("scores", {})
    rows = []
    for label in sorted(models, key=lambda m: (m != BASE, not m.startswith("expert"), m)):
        scores = models[label].get("scores", {})
        raw = {t: scores[t]["score"] if t in scores else math.nan for t in tasks}
        norm = {}
        for t in tasks:
            reference = base[t]["score"] if t in base else math.nan
            norm[t] = raw[t] / reference if reference and not math.isnan(reference) and not math.isnan(raw[t]) \
                else math.nan
        finite = [v for v in norm.values() if not math.isnan(v)]
        rows.append({"model": label, "raw": raw, "normalised": norm,
                     "average": sum(finite) / len(finite) if finite else math.nan})
    return rows


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def to_markdown(results: Mapping) -> str:
    tasks = list(results["tasks"])
    lines = [f"| model | {' | '.join(tasks)} | average |", "|---" * (len(tasks) + 2) + "|"]
    for row in table(results):
        cells = [f"{_cell(row['normalised'][t])} ({_cell(row['raw'][t])})" for t in tasks]
        lines.append(f"| {row['model']} | {' | '.join(cells)} | {_cell(row['average'])} |")
    return "\n".join(lines) + "\n\nEach cell: the score normalised by the base model's (the raw score).\n"


def to_csv(results: Mapping) -> str:
    tasks = list(results["tasks"])
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["model", *[f"{t} (normalised)" for t in tasks], "average", *[f"{t} (raw)" for t in tasks]])
    for row in table(results):
        writer.writerow([row["model"], *[row["normalised"][t] for t in tasks], row["average"],
                         *[row["raw"][t] for t in tasks]])
    return out.getvalue()


def to_json(results: Mapping) -> str:
    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    rows = [{"model": r["model"], "average": clean(r["average"]),
             "normalised": {t: clean(v) for t, v in r["normalised"].items()},
             "raw": {t: clean(v) for t, v in r["raw"].items()}} for r in table(results)]
    return json.dumps({"suite": results.get("suite"), "tasks": list(results["tasks"]), "rows": rows}, indent=2)


def plot(results: Mapping, path: Path) -> Path:
    """Grouped bars: each model's normalised score per task and its average (1.0 = the base)."""
    from cqd_mpi.analysis.plots import new_figure

    rows = table(results)
    columns = [*results["tasks"], "average"]
    figure = new_figure(max(6.0, 1.2 * len(columns) + 2), 4.0)
    axes = figure.add_subplot()
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        values = [row["normalised"][t] for t in results["tasks"]] + [row["average"]]
        values = [0.0 if math.isnan(v) else v for v in values]
        axes.bar([c + i * width for c in range(len(columns))], values, width=width, label=row["model"])
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks([c + width * (len(rows) - 1) / 2 for c in range(len(columns))], columns, rotation=20)
    axes.set_ylabel("score / base model's")
    axes.set_title(f"suite {results.get('suite')}: normalised by the base model")
    axes.legend(fontsize=7)
    from cqd_mpi.analysis.plots import save_figure

    return save_figure(figure, path, dpi=100)
