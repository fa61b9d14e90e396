"""A run with vision-language experts (docs/vqa.md): which expert carries the vision stack, the
layout every model is built in, and the text-only models saved as that vision stack plus their
language model (RUN_DIR/lifted), which is how the run scores them.

A config names nothing new for this: an expert whose config.json has a `vision_config` makes
the run a vision-language one; `vision.expert` picks the template among several, and
`vision.mapping` overrides the derived name mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from cqd_mpi.errors import ConfigError
from cqd_mpi.merging.embedding import VisionLayout, is_vision_language
from cqd_mpi.merging.modeldir import ModelDir


class Config(Protocol):
    """What this module reads of a run's config (run/config.py's `Config`, which calls `check`
    at load: a protocol here keeps the import one way)."""

    base: str
    vision: Any
    task_names: list[str]

    def expert_path(self, task: str) -> str: ...

LIFTED = "lifted"


def _template(experts: dict[str, str], chosen: str | None) -> str | None:
    if chosen is not None:
        path = experts[chosen]
        if not is_vision_language(path):
            raise ConfigError(f"vision.expert: expected the task of a vision-language expert (a config.json with a "
                              f"vision_config), but the expert of {chosen!r}, {path}, has none")
        return path
    return next((path for path in experts.values() if is_vision_language(path)), None)


def template_path(config: Config) -> str | None:
    """The vision-language expert whose vision stack every model gets, or None (a text-only run)."""
    return _template({n: config.expert_path(n) for n in config.task_names}, config.vision.expert)


def layout(config: Config) -> VisionLayout | None:
    """The run's vision layout, checked against the base (WeightsError names the first tensor of a
    language model that is not the base's), or None for a text-only run."""
    template = template_path(config)
    if template is None:
        return None
    return VisionLayout(base=ModelDir(config.base), template=ModelDir(template), mapping=config.vision.mapping)


def frozen_layout(frozen: dict) -> VisionLayout | None:
    """The vision layout of a run from its frozen config (RUN_DIR/config.yaml), for exports."""
    experts = {e["task"]: e["path"] for e in frozen.get("experts") or []}
    section = frozen.get("vision") or {}
    template = _template(experts, section.get("expert"))
    if template is None:
        return None
    return VisionLayout(base=ModelDir(frozen["base"]), template=ModelDir(template), mapping=section.get("mapping"))


def check(config: Config, engine: type) -> None:
    """Refuse at load a vision-language run whose experts do not embed the base, or whose engine
    cannot hold a vision-language model."""
    from cqd_mpi.engines.base import VisualQuestionAnswering

    vision = layout(config)
    for name in config.task_names:
        path = config.expert_path(name)
        if vision is not None and is_vision_language(path) and path != str(vision.template.path):
            vision.view(path)
    if vision is not None and not issubclass(engine, VisualQuestionAnswering):
        raise ConfigError(f"engine.kind: the expert {vision.template.path} is a vision-language model, which the "
                          f"engine {engine.__name__} cannot hold; expected an engine with visual question "
                          "answering (kind: llava)")


def model_paths(config: Config, run_dir: Path, vision: VisionLayout | None) -> tuple[str, list[str]]:
    """The base's and the experts' dirs as the run records them: the config's, or with vision, each
    text-only model (and any vision-language expert but the template) saved under RUN_DIR/lifted
    as the template's vision stack plus its language model, recorded relative to the run dir
    (`RunDir.resolve`), so that the state does not depend on where the run dir is."""
    experts = [config.expert_path(n) for n in config.task_names]
    if vision is None:
        return config.base, experts
    template = str(vision.template.path)

    def lifted(path: str, name: str) -> str:
        if path == template:
            return path
        out = run_dir / LIFTED / name
        if not out.is_dir():
            vision.write_lifted(path, out)
        return f"{LIFTED}/{name}"

    return lifted(config.base, "base"), [lifted(p, f"expert-{n}") for p, n in zip(experts, config.task_names)]


def engine_dir(config: Config) -> str:
    """The dir a worker builds its engine on: the template with vision, else the base."""
    return template_path(config) or config.base
