"""`python -m cqd_mpi evaluate RUN_DIR --suite suite.yaml`: the paper's Table 3 for a run.

Scores the run's final model, its experts and its base (and any `--model`: a saved model's
id or a Hugging Face dir) on a suite of tasks (lm-eval tasks or any task kind), every item
of each task, on ONE engine per rank built on the base whose weights each model replaces in
place. Under `mpiexec`/`srun` every rank holds an engine, each (model, task) pair's batches
are shared out round-robin and gathered on rank 0, which writes the results.
Results go to RUN_DIR/evaluations/<suite>.json after every (model, task) pair, each keyed by
the model's weights digest and the task's fingerprint (settings, data digest, --limit), so a
rerun skips the pairs already scored on the same weights and task, re-scores (and says so)
those whose model or task changed, and a preempted evaluation resumes; the table normalised
by the base model's scores is printed and written next to it as .md, .csv, .table.json and .png.

The suite file:

    name: table3            # the results' file name (default: the suite file's stem)
    tasks:                  # as a run config's tasks: name, kind, settings, batch_size
      - {name: gsm8k, kind: lm-eval, settings: {task: gsm8k}}
    models: [final, experts, base]   # optional, default all three
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

HELP = "score the run's final model, experts and base on a suite of tasks; print the table normalised by the base"
log = logging.getLogger("cqd_mpi.evaluate")


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="the run directory (its config.yaml names the base, experts and engine)")
    parser.add_argument("--suite", required=True, help="a YAML file: name, tasks (as in a run config), models")
    parser.add_argument("--model", action="append", default=[],
                        help="also score this saved model (its id in the run) or Hugging Face dir (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per task (smoke tests)")


def _suite(path: Path, run_config: dict) -> tuple[str, dict, list[str]]:
    import yaml

    from cqd_mpi.errors import ConfigError, yaml_problem

    if not path.is_file():
        raise ConfigError(f"--suite: file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty list under 'tasks'")
    unknown = sorted(set(data) - {"name", "tasks", "models"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {', '.join(map(repr, unknown))}; expected keys: name, tasks, models")
    name = str(data.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{path}: name: expected letters, digits, '_', '.' or '-', got {name!r}")
    models = data.get("models") or ["final", "experts", "base"]
    wrong = [m for m in models if m not in ("final", "experts", "base")]
    if wrong:
        raise ConfigError(f"{path}: models: expected some of final, experts, base, got {wrong}")
    names = [t.get("name") for t in data["tasks"] if isinstance(t, dict)]
    config = {**run_config, "tasks": data["tasks"],
              "experts": [{"task": n, "path": run_config["base"]} for n in names]}
    return name, config, models


def _models(run_dir: Path, run_config: dict, wanted: list[str], extra: list[str]) -> dict[str, Path]:
    from cqd_mpi.errors import ConfigError
    from cqd_mpi.run.rundir import RunDir

    rundir = RunDir(run_dir)
    models: dict[str, Path] = {}
    if "base" in wanted:
        models["base"] = Path(run_config["base"])
    if "experts" in wanted:
        for expert in run_config["experts"]:
            models[f"expert {expert['task']}"] = Path(expert["path"])
    if "final" in wanted:
        if not (rundir.final_dir / "config.json").is_file():
            raise ConfigError(f"{run_dir}: the run has no final model yet ({rundir.final_dir}); finish the run first")
        models["final"] = rundir.final_dir
    models.setdefault("base", Path(run_config["base"]))  # the table is normalised by it
    for item in extra:
        path = rundir.model_dir(int(item)) if item.isdigit() else Path(item).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {item}: expected a saved model id of this run or a Hugging Face dir, "
                              f"but {path} has no config.json")
        models[f"model {item}"] = path
    return models


def _task_fingerprint(task_config, task, limit: int | None) -> str:
    """sha256 of what a task's scores depend on: its kind, protocol, settings (as resolved),
    data path, --limit, and the digest of its data (Task.data_digest)."""
    import hashlib

    text = json.dumps({"kind": task_config.kind, "protocol": task_config.protocol, "settings": task_config.settings,
                       "data": task_config.data, "limit": limit, "data_digest": task.data_digest()},
                      sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _weights(path: Path, entry: dict) -> tuple[str, str]:
    """(the model's weights digest, its files' names and stat keys): the digest recorded
    in `entry` is reused while the files' stat keys are unchanged, else computed (run/integrity.py)."""
    from cqd_mpi.run.integrity import FileKeys, weights_digest

    files = json.dumps(FileKeys.of(path))
    if entry.get("files") == files and entry.get("weights"):
        return entry["weights"], files
    return weights_digest(path), files


def _left_to_score(label: str, path: Path, models: dict, tasks: dict[str, str]) -> list[str]:
    """The tasks `label` still needs: those not scored on these weights with these fingerprints.
    Stored scores of other weights, or of a task since changed, are dropped, and it says so."""
    entry = models.setdefault(label, {"path": str(path), "scores": {}})
    weights, files = _weights(path, entry)
    if entry.get("weights") != weights and entry["scores"]:
        was = entry.get("weights") or "not recorded"
        print(f"{label}: its weights ({path}) changed since it was scored ({was[:19]} -> {weights[:19]}); "
              "re-scoring every task")
        entry["scores"] = {}
    entry.update(path=str(path), weights=weights, files=files)
    todo = []
    for task_name, fingerprint in tasks.items():
        stored = entry["scores"].get(task_name)
        if stored is not None and stored.get("fingerprint") == fingerprint:
            continue
        if stored is not None:
            print(f"{label}: task {task_name} changed since it was scored (its settings, data or --limit); "
                  "re-scoring it")
            del entry["scores"][task_name]
        todo.append(task_name)
    return todo


def _score(worker, task, ids: list[str], comm) -> list:
    """Every item's result, in order: batches of the task's batch_size, under MPI shared out
    round-robin over the ranks and gathered on rank 0 (None elsewhere)."""
    from cqd_mpi.run.evaluation import isolated_results

    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    batches = [ids[start : start + task.batch_size] for start in range(0, len(ids), task.batch_size)]
    mine = {index: isolated_results(task, batch, lambda b: task.evaluate(worker.engine, b),
                                    where=f"task {task.name!r}")
            for index, batch in enumerate(batches) if index % size == rank}
    if comm is not None:
        gathered = comm.gather(mine, root=0)
        if rank != 0:
            return None
        mine = {index: results for part in gathered for index, results in part.items()}
    return [result for index in range(len(batches)) for result in mine[index]]


def run(args) -> int:
    from cqd_mpi.runtime import mpi

    comm = mpi.world()
    if comm is None:
        return _evaluate(args, None)
    return mpi.guarded(comm, lambda: _evaluate(args, comm))


def _evaluate(args, comm) -> int:
    """Every rank builds the engine and the tasks; rank 0 decides what is left, writes the results."""
    import yaml

    from cqd_mpi.analysis import generalization
    from cqd_mpi.errors import ConfigError
    from cqd_mpi.run import config as config_mod
    from cqd_mpi.run.rundir import RunDir, atomic_write_text
    from cqd_mpi.runtime.worker import Worker

    rank = comm.Get_rank() if comm is not None else 0
    run_dir = Path(args.run_dir).resolve()
    rundir = RunDir(run_dir)
    if not rundir.config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    run_config = yaml.safe_load(rundir.config_path.read_text())
    suite_path = Path(args.suite).resolve()
    name, suite_config, wanted = _suite(suite_path, run_config)
    suite_config["runtime"] = {**run_config.get("runtime", {}), "run_dir": str(run_dir)}
    config = config_mod.from_dict(suite_config, root=suite_path.parent, tasks_only=True)
    models = _models(run_dir, run_config, wanted, args.model)

    out_dir = run_dir / "evaluations"
    results_path = out_dir / f"{name}.json"
    worker = Worker(config, rank=rank, world_size=comm.Get_size() if comm is not None else 1)
    try:
        results, todo = None, None
        if rank == 0:
            out_dir.mkdir(exist_ok=True)
            results = json.loads(results_path.read_text()) if results_path.is_file() else {"suite": name, "models": {}}
            results["tasks"] = config.task_names
            tasks = {t.name: _task_fingerprint(t, worker.tasks[t.name], args.limit) for t in config.tasks}
            todo = {label: _left_to_score(label, path, results["models"], tasks) for label, path in models.items()}
        if comm is not None:
            todo = comm.bcast(todo, root=0)
        for label, path in models.items():
            if not todo[label]:
                if rank == 0:
                    print(f"{label}: every task already scored, skipped")
                continue
            worker.load_dir(path)  # in place: the engine is built once, on the base
            for task_name in todo[label]:
                task = worker.tasks[task_name]
                scored = _score(worker, task, task.item_ids()[: args.limit], comm)
                if rank != 0:
                    continue
                entry = results["models"][label]
                entry["scores"][task_name] = {"score": task.metric(scored), "items": len(scored),
                                              "errors": sum(r.error is not None for r in scored),
                                              "fingerprint": tasks[task_name]}
                atomic_write_text(results_path, json.dumps(results, indent=2))
                print(f"{label}: {task_name} {entry['scores'][task_name]['score']:.4f} ({len(scored)} items)")
    finally:
        worker.close()
    if rank != 0:
        return 0
    markdown = generalization.to_markdown(results)
    atomic_write_text(out_dir / f"{name}.md", markdown)
    atomic_write_text(out_dir / f"{name}.csv", generalization.to_csv(results))
    atomic_write_text(out_dir / f"{name}.table.json", generalization.to_json(results))
    generalization.plot(results, out_dir / f"{name}.png")
    print(markdown)
    print(f"results: {results_path} (table: {name}.md, .csv, .table.json, .png)")
    return 0
