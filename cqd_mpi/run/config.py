"""The run config: one YAML file with the models, the tasks, the QD settings, runtime and engine.

Relative paths are resolved against the config file's directory. Every error names the key.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from cqd_mpi import schema
from cqd_mpi.errors import ConfigError


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
    name: str
    kind: str
    data: str | None = None
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
    mu: float = 1.0
    sigma: float = 0.03

    def validate(self, where: str) -> None:
        if self.sigma < 0:
            raise ConfigError(f"{where}.sigma: expected a number >= 0, got {self.sigma}")


@dataclasses.dataclass
class MutationConfig:
    kind: Literal["svd", "gaussian", "none"] = "svd"
    basis: Literal["child", "expert"] = "child"
    rank: int | Literal["full"] = "full"
    w_max: float = 0.3
    sigma: float = 0.001
    exclude: list[str] = dataclasses.field(default_factory=list)
    niter: int = 2
    sketch_dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self, where: str) -> None:
        if self.niter < 0:
            raise ConfigError(f"{where}.niter: expected an integer >= 0, got {self.niter}")
        if self.rank != "full" and self.rank < 1:
            raise ConfigError(f"{where}.rank: expected 'full' or an integer >= 1, got {self.rank}")
        if self.w_max < 0:
            raise ConfigError(f"{where}.w_max: expected a number >= 0, got {self.w_max}")
        for i, pattern in enumerate(self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{where}.exclude[{i}]: invalid regular expression {pattern!r}: {exc}") from exc


@dataclasses.dataclass
class QDConfig:
    generations: int
    sampling: Literal["elite", "random"] = "elite"
    alpha_low: float = 0.5
    alpha_high: float = 0.8
    crossover: CrossoverConfig = dataclasses.field(default_factory=CrossoverConfig)
    mutation: MutationConfig = dataclasses.field(default_factory=MutationConfig)
    n_bins: int = 15
    bc_lower_factor: float = 0.85
    bc_upper_factor: float = 1.15
    search_fraction: float = 0.5

    def validate(self, where: str) -> None:
        if self.generations < 0:
            raise ConfigError(f"{where}.generations: expected an integer >= 0, got {self.generations}")
        if self.n_bins < 1:
            raise ConfigError(f"{where}.n_bins: expected an integer >= 1, got {self.n_bins}")
        if not 0.0 < self.search_fraction < 1.0:
            raise ConfigError(f"{where}.search_fraction: expected a number in (0, 1), got {self.search_fraction}")


@dataclasses.dataclass
class RuntimeConfig:
    run_dir: str
    seed: int = 0
    transport: Literal["mpi", "file"] = "mpi"
    staging_dir: str | None = None
    pipeline_depth: int = 0
    eval_groups: int = 1
    max_shard_size: str = "5GB"
    basis_cache: str | None = None
    keep_backup: bool = True
    threads: int | None = None
    retain_child_bytes: str = "2GB"

    def validate(self, where: str) -> None:
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: expected an integer >= 0, got {self.seed}")
        if self.pipeline_depth < 0:
            raise ConfigError(f"{where}.pipeline_depth: expected an integer >= 0, got {self.pipeline_depth}")
        if self.eval_groups < 1:
            raise ConfigError(f"{where}.eval_groups: expected an integer >= 1, got {self.eval_groups}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{where}.threads: expected an integer >= 1 or null, got {self.threads}")
        parse_size(self.max_shard_size, f"{where}.max_shard_size")
        parse_size(self.retain_child_bytes, f"{where}.retain_child_bytes")


@dataclasses.dataclass
class EngineConfig:
    kind: Literal["transformers"] = "transformers"
    device: str = "auto"
    dtype: str = "auto"
    chat_template: str | None = None
    batch_size: int = 16

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: expected an integer >= 1, got {self.batch_size}")


@dataclasses.dataclass
class Config:
    base: str
    experts: list[ExpertConfig]
    tasks: list[TaskConfig]
    qd: QDConfig
    runtime: RuntimeConfig
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)

    def validate(self, where: str) -> None:
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
        if self.qd.alpha_high < self.qd.alpha_low:
            raise ConfigError(
                f"qd.alpha_high: expected >= alpha_low ({self.qd.alpha_low}), got {self.qd.alpha_high}"
            )

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def expert_path(self, task: str) -> str:
        return next(e.path for e in self.experts if e.task == task)

    def to_dict(self) -> dict[str, Any]:
        return schema.to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, where: str = "size") -> int:
    """Bytes from '5GB', '500MiB' or an integer."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{where}: expected a size such as '5GB' or '512MiB', got {text!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()])


def _resolve(path: str | None, root: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def _check_model_dir(path: str, where: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{where}: expected a Hugging Face model directory, but {path} does not exist")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{where}: {path} is not a Hugging Face model directory (no config.json)")


def from_dict(data: Any, *, root: Path | str = ".", check_files: bool = True) -> Config:
    """Validate a config mapping; resolve paths against `root`; build each task's Settings."""
    root = Path(root)
    config = schema.build(Config, data, "")
    config.base = _resolve(config.base, root)
    for expert in config.experts:
        expert.path = _resolve(expert.path, root)
    config.runtime.run_dir = _resolve(config.runtime.run_dir, root)
    config.runtime.staging_dir = _resolve(config.runtime.staging_dir, root)
    config.runtime.basis_cache = _resolve(config.runtime.basis_cache, root)
    for i, task in enumerate(config.tasks):
        task.data = _resolve(task.data, root)
        if check_files and task.data is not None and not Path(task.data).exists():
            raise ConfigError(f"tasks[{i}].data: file {task.data} does not exist")
        task_settings(task, f"tasks[{i}]")
    if check_files:
        _check_model_dir(config.base, "base")
        for i, expert in enumerate(config.experts):
            _check_model_dir(expert.path, f"experts[{i}].path")
    return config


def task_settings(task: TaskConfig, where: str = "task"):
    """The task kind's Settings dataclass built from `task.settings`, checked key by key."""
    from cqd_mpi.tasks import task_class

    cls = task_class(task.kind, f"{where}.kind")
    return schema.build(cls.Settings, task.settings, f"{where}.settings")


def load(path: str | Path, *, check_files: bool = True) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return from_dict(data, root=path.resolve().parent, check_files=check_files)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


RESULT_NEUTRAL_KEYS = frozenset({
    ("runtime", "transport"), ("runtime", "staging_dir"), ("runtime", "eval_groups"),
    ("runtime", "basis_cache"), ("runtime", "keep_backup"), ("runtime", "retain_child_bytes"),
    ("engine", "device"),
})


ADDED_KEYS: dict[tuple[str, ...], Any] = {
    ("qd", "mutation", "niter"): 2,
    ("qd", "mutation", "sketch_dtype"): "float32",
}


def upgrade(frozen: dict[str, Any]) -> dict[str, Any]:
    """A config frozen by an earlier version, with the keys added since at the values that
    reproduce what that version did, so that resuming its run is not refused over them."""
    for path, value in ADDED_KEYS.items():
        node = frozen
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(path[-1], value)
    return frozen


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ and could change a run's results (resume refuses these)."""
    found: list[str] = []

    def walk(a: Any, b: Any, key: tuple[str, ...]) -> None:
        if key in RESULT_NEUTRAL_KEYS:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), (*key, str(k)))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, (*key[:-1], f"{key[-1]}[{i}]") if key else (f"[{i}]",))
        elif a != b:
            found.append(f"{'.'.join(key)}: {a!r} -> {b!r}")

    walk(old, new, ())
    return found
