"""The run config: one YAML file with the models, the tasks, the QD settings, runtime and engine.

Relative paths are resolved against the config file's directory. Every error names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from cqd_mpi import schema
from cqd_mpi.errors import ConfigError, yaml_problem
from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.qd.params import SearchParams
from cqd_mpi.qd.policy_gradient import PolicyGradientSettings
from cqd_mpi.schema import parse_size
from cqd_mpi.tasks import protocols

log = logging.getLogger("cqd_mpi.run.config")


@dataclasses.dataclass
class ExpertConfig:
    task: str
    path: str


@dataclasses.dataclass
class BinsConfig:
    """Explicit BC bins for one task (the default, `auto`, derives them from the experts)."""

    lower: float
    upper: float
    n_bins: int = 15

    def validate(self, where: str) -> None:
        if not self.upper > self.lower:
            raise ConfigError(f"{where}: expected upper > lower, got lower={self.lower}, upper={self.upper}")
        if self.n_bins < 1:
            raise ConfigError(f"{where}.n_bins: expected an integer >= 1, got {self.n_bins}")


@dataclasses.dataclass
class TaskConfig:
    """One task. `protocol` names a preset of the kind's settings (tasks/protocols.py; null: the
    config's `protocol`); loading resolves it into `settings`, as the frozen config records."""

    name: str
    kind: str
    data: str | None = None
    protocol: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    bins: Literal["auto"] | BinsConfig = "auto"
    batch_size: int = 16

    def validate(self, where: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"{where}.name: expected letters, digits, '_', '.' or '-', got {self.name!r}")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: expected an integer >= 1, got {self.batch_size}")


@dataclasses.dataclass
class CrossoverConfig:
    mu: float = SearchParams.crossover_mu
    sigma: float = SearchParams.crossover_sigma

    def validate(self, where: str) -> None:
        if self.sigma < 0:
            raise ConfigError(f"{where}.sigma: expected a number >= 0, got {self.sigma}")


@dataclasses.dataclass
class CoefficientsConfig:
    """The coefficient searches (qd.method cma-es, nsga2): candidates per population, CMA-ES's
    initial step size, and the box [lower, upper] of every coefficient c_k."""

    population: int = 8
    sigma0: float = 0.1
    lower: float = 0.0
    upper: float = 1.0

    def validate(self, where: str) -> None:
        if self.population < 2:
            raise ConfigError(f"{where}.population: expected an integer >= 2, got {self.population}")
        if not self.sigma0 > 0:
            raise ConfigError(f"{where}.sigma0: expected a number > 0, got {self.sigma0}")
        if not self.upper > self.lower:
            raise ConfigError(f"{where}: expected upper > lower, got lower={self.lower}, upper={self.upper}")


@dataclasses.dataclass
class PolicyGradientConfig:
    """qd.method policy-gradient: Adam's learning rate on the policy's mean and log standard
    deviation, and the decay of the REINFORCE baseline's moving average (qd/policy_gradient.py;
    its population, initial standard deviation and box are `qd.coefficients`')."""

    learning_rate: float = PolicyGradientSettings.learning_rate
    baseline_decay: float = PolicyGradientSettings.baseline_decay

    def validate(self, where: str) -> None:
        if not self.learning_rate > 0:
            raise ConfigError(f"{where}.learning_rate: expected a number > 0, got {self.learning_rate}")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ConfigError(f"{where}.baseline_decay: expected a number in [0, 1), got {self.baseline_decay}")


@dataclasses.dataclass
class QDConfig:
    """`generations` is the search budget: the models evaluated in the search phase, one
    child per generation for CycleQD and QD, one candidate each for CMA-ES and NSGA-II."""

    generations: int
    method: str = "cycleqd"
    sampling: Literal["elite", "random"] = SearchParams.sampling
    alpha_low: float = SearchParams.alpha_low
    alpha_high: float = SearchParams.alpha_high
    crossover: CrossoverConfig = dataclasses.field(default_factory=CrossoverConfig)
    mutation: MutationSpec = dataclasses.field(default_factory=MutationSpec)
    n_bins: int = SearchParams.n_bins
    bc_lower_factor: float = SearchParams.bc_lower_factor
    bc_upper_factor: float = SearchParams.bc_upper_factor
    search_fraction: float = 0.5
    coefficients: CoefficientsConfig = dataclasses.field(default_factory=CoefficientsConfig)
    policy_gradient: PolicyGradientConfig = dataclasses.field(default_factory=PolicyGradientConfig)

    def validate(self, where: str) -> None:
        from cqd_mpi.qd.methods import method_class

        method_class(self.method, f"{where}.method")
        if self.generations < 0:
            raise ConfigError(f"{where}.generations: expected an integer >= 0, got {self.generations}")
        if self.n_bins < 1:
            raise ConfigError(f"{where}.n_bins: expected an integer >= 1, got {self.n_bins}")
        if not self.alpha_low >= 0:
            raise ConfigError(f"{where}.alpha_low: expected a number >= 0, got {self.alpha_low}")
        if not 0.0 < self.search_fraction < 1.0:
            raise ConfigError(f"{where}.search_fraction: expected a number in (0, 1), got {self.search_fraction}")


@dataclasses.dataclass
class RuntimeConfig:
    run_dir: str
    seed: int = 0
    transport: Literal["mpi", "file"] = "mpi"
    staging_dir: str | None = None
    pipeline_depth: int = SearchParams.pipeline_depth
    eval_groups: int = 1
    max_shard_size: str = "5GB"
    basis_cache: str | None = None
    keep_backup: bool = True
    threads: int | None = None
    retain_child_bytes: str = "2GB"
    eval_deadline: Literal["auto"] | float = "auto"
    """Seconds one chunk of items may take on a worker before the job aborts, naming the rank,
    task and chunk (runtime/deadline.py); auto: sized from the chunk's items and their limits."""
    eval_grace: float = 60.0
    """Seconds a worker rank may take besides its chunks' deadlines (loading the model, sending
    the scores) before rank 0 ends the job naming it (runtime/mpi.py's `Overdue`): the watch that
    holds when the worker's own cannot run (the rank stopped, swapped out, hung in the kernel)."""
    model_store_bytes: str | None = None
    """Disk for models/ (run/store.py): beyond it archive members are kept as recipes and rebuilt
    bit for bit on demand; null keeps every member on disk."""
    model_store_depth: int = 2
    """With a budget, no needed model is more than this many chained merges from weights on disk."""
    test_every: int = SearchParams.test_every
    """Every N models evaluated, score the would-be final model on the test split (the points of
    `compare --budget-curve`; not counted in the budget); 0: never."""

    def validate(self, where: str) -> None:
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: expected an integer >= 0, got {self.seed}")
        if self.pipeline_depth < 0:
            raise ConfigError(f"{where}.pipeline_depth: expected an integer >= 0, got {self.pipeline_depth}")
        if self.eval_groups < 1:
            raise ConfigError(f"{where}.eval_groups: expected an integer >= 1, got {self.eval_groups}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{where}.threads: expected an integer >= 1 or null, got {self.threads}")
        parse_size(self.max_shard_size, f"{where}.max_shard_size", minimum=1)
        parse_size(self.retain_child_bytes, f"{where}.retain_child_bytes")
        if self.eval_deadline != "auto" and not self.eval_deadline > 0:
            raise ConfigError(f"{where}.eval_deadline: expected 'auto' or a number of seconds > 0, "
                              f"got {self.eval_deadline}")
        if not self.eval_grace > 0:
            raise ConfigError(f"{where}.eval_grace: expected a number of seconds > 0, got {self.eval_grace}")
        if self.model_store_bytes is not None:
            parse_size(self.model_store_bytes, f"{where}.model_store_bytes")
        if self.test_every < 0:
            raise ConfigError(f"{where}.test_every: expected an integer >= 0 (0: never), got {self.test_every}")
        if self.model_store_depth < 1:
            raise ConfigError(f"{where}.model_store_depth: expected an integer >= 1, got {self.model_store_depth}")


@dataclasses.dataclass
class EngineConfig:
    """The live model on every worker: an engine kind (engines/__init__.py: a built-in name or
    'module:Class'), the device and dtype, and the engine's own `settings` (its Settings
    dataclass; stored resolved, defaults included, in the frozen config)."""

    kind: str = "transformers"
    device: str = "auto"
    dtype: str = "auto"
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class VisionConfig:
    """Vision-language experts (docs/vqa.md): `expert`, the task whose expert's vision stack every
    model gets (default: the first VLM expert); `mapping`, {VLM name prefix: base prefix} (default: derived)."""

    expert: str | None = None
    mapping: dict[str, str] | None = None


@dataclasses.dataclass
class TrackingConfig:
    """Live curves where researchers look: TensorBoard event files (in `log_dir`, default
    RUN_DIR/tensorboard) and/or a Weights & Biases run (`wandb_mode` offline needs no
    network), the elite maps as images every `maps_every` generations (0: never)."""

    tensorboard: bool = False
    wandb: bool = False
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "cqd_mpi"
    log_dir: str | None = None
    maps_every: int = 25

    def validate(self, where: str) -> None:
        if self.maps_every < 0:
            raise ConfigError(f"{where}.maps_every: expected an integer >= 0, got {self.maps_every}")


@dataclasses.dataclass
class Config:
    base: str
    experts: list[ExpertConfig]
    tasks: list[TaskConfig]
    qd: QDConfig
    runtime: RuntimeConfig
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    protocol: str = protocols.DEFAULT
    """The evaluation protocol of tasks that name none: 'paper' or 'reference' (docs/protocols.md)."""
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)

    def validate(self, where: str) -> None:
        protocols.check_default(self.protocol)
        names = [t.name for t in self.tasks]
        if not names:
            raise ConfigError("tasks: expected at least one task, got none")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"tasks: task names must be unique, got {', '.join(duplicates)} more than once")
        expert_tasks = [e.task for e in self.experts]
        for i, task in enumerate(expert_tasks):
            if task not in names:
                raise ConfigError(f"experts[{i}].task: expected one of the task names {names}, got {task!r}")
            if expert_tasks.count(task) > 1:
                raise ConfigError(f"experts[{i}].task: expected one expert per task, got several for {task!r}")
        missing = [n for n in names if n not in expert_tasks]
        if missing:
            raise ConfigError(f"experts: expected an expert for every task, none given for {', '.join(missing)}")
        if self.vision.expert is not None and self.vision.expert not in names:
            raise ConfigError(f"vision.expert: expected one of the task names {names}, got {self.vision.expert!r}")
        if self.qd.alpha_high < self.qd.alpha_low:
            raise ConfigError(
                f"qd.alpha_high: expected >= alpha_low ({self.qd.alpha_low}), got {self.qd.alpha_high}"
            )

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def expert_path(self, task: str) -> str:
        return next(e.path for e in self.experts if e.task == task)

    def search_params(self) -> SearchParams:
        """The search parameters of this run: `qd` keys, else `runtime` keys (seed, pipeline_depth)."""
        return SearchParams.from_sections(dataclasses.asdict(self.runtime), dataclasses.asdict(self.qd))

    def to_dict(self) -> dict[str, Any]:
        return schema.to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _resolve(path: str | None, root: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def _model(value: str, root: Path, where: str, check: bool) -> str:
    """A model directory, or a hub id resolved in the local Hugging Face cache (run/hub.py)."""
    from cqd_mpi.run import hub

    return hub.resolve(value, where) if check and hub.is_hub_id(value, root) else _resolve(value, root)


def _check_model_dir(path: str, where: str) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{where}: expected a Hugging Face model directory, but {path} is a file, not a directory")
    if not p.is_dir():
        raise ConfigError(f"{where}: expected a Hugging Face model directory, but {path} does not exist")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{where}: {path} is not a Hugging Face model directory (no config.json)")


def from_dict(data: Any, *, root: Path | str = ".", check_files: bool = True, tasks_only: bool = False) -> Config:
    """Validate a config mapping; resolve paths against `root`; check each task's and the
    engine's settings, and that the engine has the capability every task calls.

    `tasks_only` is for commands that read only the tasks (check-tasks): `base`, `experts`,
    `qd` and `runtime` may be left out (what is given is checked as for a run, but the models
    need not exist), and runtime.run_dir defaults to `root`."""
    root = Path(root)
    data = moved_keys(data, warn=True)
    if tasks_only and isinstance(data, dict):
        named = [t["name"] for t in data.get("tasks") or [] if isinstance(t, dict) and isinstance(t.get("name"), str)]
        data = {"base": ".", "experts": [{"task": name, "path": "."} for name in named],
                "qd": {"generations": 0}, "runtime": {"run_dir": "."}, **data}
    config = schema.build(Config, data, "")
    config.base = _model(config.base, root, "base", check_files and not tasks_only)
    for i, expert in enumerate(config.experts):
        expert.path = _model(expert.path, root, f"experts[{i}].path", check_files and not tasks_only)
    config.runtime.run_dir = _resolve(config.runtime.run_dir, root)
    config.runtime.staging_dir = _resolve(config.runtime.staging_dir, root)
    config.runtime.basis_cache = _resolve(config.runtime.basis_cache, root)
    config.tracking.log_dir = _resolve(config.tracking.log_dir, root)
    engine = engine_class(config.engine)
    config.engine.settings = schema.to_dict(engine_settings(config.engine))
    for i, task in enumerate(config.tasks):
        task.data = _resolve(task.data, root)
        if check_files and task.data is not None and not Path(task.data).exists():
            raise ConfigError(f"tasks[{i}].data: file {task.data} does not exist")
        cls = task_class_of(task, f"tasks[{i}]")
        task.protocol, task.settings = protocols.resolve(
            cls, name=task.protocol, default=config.protocol, settings=task.settings, where=f"tasks[{i}]")
        for key in cls.path_settings:  # as `data`: against the config's folder, absolute when frozen
            if isinstance(task.settings.get(key), str):
                task.settings[key] = _resolve(task.settings[key], root)
        check_capability(task, engine, f"tasks[{i}]", settings=task_settings(task, f"tasks[{i}]"), root=root)
    if not tasks_only:
        from cqd_mpi.qd.methods import check_task_count

        check_task_count(config.qd.method, config.task_names)
    if check_files and not tasks_only:
        _check_model_dir(config.base, "base")
        for i, expert in enumerate(config.experts):
            _check_model_dir(expert.path, f"experts[{i}].path")
        from cqd_mpi.run import vision

        vision.check(config, engine)
    return config


def task_class_of(task: TaskConfig, where: str = "task"):
    from cqd_mpi.tasks import task_class

    return task_class(task.kind, f"{where}.kind")


def task_settings(task: TaskConfig, where: str = "task"):
    """The task kind's Settings dataclass built from `task.settings`, checked key by key."""
    return schema.build(task_class_of(task, where).Settings, task.settings, f"{where}.settings")


def engine_class(engine: EngineConfig):
    from cqd_mpi.engines import engine_class as resolve

    return resolve(engine.kind, "engine.kind")


def engine_settings(engine: EngineConfig):
    """The engine kind's Settings dataclass built from `engine.settings`, checked key by key."""
    return schema.build(engine_class(engine).Settings, engine.settings, "engine.settings")


def check_capability(task: TaskConfig, engine: type, where: str, *, settings: Any = None,
                     root: Path | str = ".") -> None:
    """Refuse a task whose engine lacks a capability it calls, naming all three."""
    from cqd_mpi.tasks import task_class

    cls = task_class(task.kind, f"{where}.kind")
    if settings is None:
        settings = task_settings(task, where)
    for needed in cls.capabilities_needed(settings, root=root, where=f"{where}.settings"):
        _check_one(task, engine, where, needed)


def _check_one(task: TaskConfig, engine: type, where: str, needed: type) -> None:
    from cqd_mpi.engines import capabilities

    if not issubclass(engine, needed):
        has = ", ".join(capabilities(engine)) or "none"
        raise ConfigError(
            f"{where}: task {task.name!r} (kind {task.kind!r}) needs {needed.capability}, which engine "
            f"{engine.kind or engine.__name__!r} ({engine.__module__}:{engine.__qualname__}) does not provide "
            f"(it provides: {has}); choose another engine.kind"
        )


def load(path: str | Path, *, check_files: bool = True, tasks_only: bool = False) -> Config:
    """Read and validate a YAML config file (`tasks_only`: see `from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
    try:
        return from_dict(data, root=path.resolve().parent, check_files=check_files, tasks_only=tasks_only)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


MOVED_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("engine", "chat_template"): ("engine", "settings", "chat_template"),
    ("engine", "batch_size"): ("engine", "settings", "batch_size"),
}
"""Keys that moved: (old path) -> (new path). Earlier configs are read with them moved."""


def moved_keys(data: Any, *, warn: bool) -> Any:
    """`data` with every key of MOVED_KEYS at its new place (a warning per moved key)."""
    if not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    for old, new in MOVED_KEYS.items():
        parent = data
        for key in old[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old[-1] not in parent:
            continue
        target = data
        for key in new[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        value = parent.pop(old[-1])
        if new[-1] in target:
            raise ConfigError(f"{'.'.join(old)} and {'.'.join(new)} are the same setting; give only {'.'.join(new)}")
        target[new[-1]] = value
        if warn:
            log.warning("config key %s is now %s; read as such", ".".join(old), ".".join(new))
    return data
