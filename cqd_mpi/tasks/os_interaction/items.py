"""AgentBench's OS items: its JSON problem files and scripts read into `Item`s, its sample ids,
and a script as the command line that runs it."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cqd_mpi.errors import TaskError
from cqd_mpi.sandboxes.osenv import ansi_c_quote

log = logging.getLogger("cqd_mpi.tasks.os_interaction")


DEFAULT_IMAGE = "local-os/default"
LANGUAGES = ("bash", "python")


@dataclasses.dataclass(frozen=True)
class Script:
    language: str
    code: str


@dataclasses.dataclass(frozen=True)
class Item:
    """One AgentBench OS problem, its scripts read from its file's scripts dir."""

    item_id: str
    file: str
    index: int
    description: str
    image: str
    init: tuple[Script, ...]
    start: Script | None
    match: dict[str, Any] | None
    check: tuple[Script | None, ...]
    example: Script | None


def _script(value: Any, *, scripts: Path, where: str) -> Script | None:
    """AgentBench's load_script: None, a bash string, or {code | file, language}."""
    if value is None:
        return None
    if isinstance(value, str):
        return Script("bash", value)
    if not isinstance(value, dict):
        raise TaskError(f"{where}: expected a script (a string or {{code | file, language}}), got "
                        f"{type(value).__name__} {value!r:.60}")
    language = value.get("language", "bash")
    if language not in LANGUAGES:
        raise TaskError(f"{where}.language: expected one of {', '.join(LANGUAGES)}, got {language!r}")
    if "file" in value:
        path = scripts / str(value["file"])
        try:
            return Script(language, path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise TaskError(f"{where}.file: cannot read {path} ({exc})") from exc
    if "code" in value:
        if not isinstance(value["code"], str):
            raise TaskError(f"{where}.code: expected a string, got {type(value['code']).__name__}")
        return Script(language, value["code"])
    raise TaskError(f"{where}: a script needs 'code' or 'file', got keys {sorted(value)}")


def _scripts(value: Any, *, scripts: Path, where: str) -> tuple[Script | None, ...]:
    if isinstance(value, list):
        return tuple(_script(v, scripts=scripts, where=f"{where}[{i}]") for i, v in enumerate(value))
    return (_script(value, scripts=scripts, where=where),)


def parse_item(entry: Any, *, item_id: str, file: str, index: int, scripts: Path, where: str) -> Item:
    """Check one AgentBench entry and build its Item, reading it as AgentBench's _load_configs does."""
    if not isinstance(entry, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    description = entry.get("description")
    if not isinstance(description, str):
        raise TaskError(f"{where}: key 'description' should be a string, got {description!r:.60}")
    create = entry.get("create", {})
    image, init = DEFAULT_IMAGE, ()
    if isinstance(create, dict):
        image = create.get("image", DEFAULT_IMAGE)
        if not isinstance(image, str):
            raise TaskError(f"{where}: key 'create.image' should be a string, got {image!r:.60}")
        if "init" in create:
            init = _scripts(create["init"], scripts=scripts, where=f"{where}: create.init")
            if any(script is None for script in init):
                raise TaskError(f"{where}: create.init holds a null script")
    else:
        log.warning("%s: 'create' is a %s, not a mapping; as AgentBench does, the item gets the default image "
                    "and no init", where, type(create).__name__)
    start = _script(entry["start"], scripts=scripts, where=f"{where}: start") if "start" in entry else None
    evaluation = entry.get("evaluation")
    if not isinstance(evaluation, dict):
        raise TaskError(f"{where}: key 'evaluation' should be a mapping, got {evaluation!r:.60}")
    match, check, example = None, (), None
    if "match" in evaluation:
        match = evaluation["match"]
        if isinstance(match, str):
            match = {"answer": match, "strip": True}
        if not isinstance(match, dict) or not ({"answer", "regex"} & set(match)):
            raise TaskError(f"{where}: evaluation.match should be a string, {{answer}} or {{regex}}, got {match!r:.60}")
    elif "check" in evaluation:
        check = _scripts(evaluation["check"], scripts=scripts, where=f"{where}: evaluation.check")
    else:
        raise TaskError(f"{where}: evaluation needs 'match' or 'check', got keys {sorted(evaluation)}")
    if "example" in evaluation:
        example = _script(evaluation["example"], scripts=scripts, where=f"{where}: evaluation.example")
    if any(script is None for script in check) and example is None:
        raise TaskError(f"{where}: evaluation.check has a null entry (the example) but no evaluation.example")
    return Item(item_id=item_id, file=file, index=index, description=description, image=image, init=init,
                start=start, match=match, check=check, example=example)


def load_file(path: Path, *, scripts: Path, prefix: str) -> list[Item]:
    """The items of one AgentBench problem file (a JSON object or list, or jsonl): ids PREFIX-00000, ..."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskError(f"OS data {path}: cannot read it ({exc})") from exc
    try:
        if path.suffix == ".jsonl":
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = json.loads(text)
    except ValueError as exc:
        raise TaskError(f"OS data {path}: not valid JSON ({exc})") from exc
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        raise TaskError(f"OS data {path}: expected a JSON list or object, got {type(entries).__name__}")
    return [parse_item(entry, item_id=f"{prefix}-{index:05d}", file=str(path), index=index, scripts=scripts,
                       where=f"OS data {path} entry {index}") for index, entry in enumerate(entries)]


_AGENTBENCH_STD_ID = re.compile(r"std-(\d{3})-(.+)-(\d{5})")
_AGENTBENCH_DEV_ID = re.compile(r"dev-001-(.+)-(\d{5})")


def from_agentbench_id(item_id: str) -> str:
    """This task's id of an AgentBench v0.2 sample id (configs/tasks/os.yaml's index_prefix +
    the file's base name + the position: std-001-stock-00001 is 1/stock-00001, dev-001-dev-00003
    is dev-00003); any other id is returned as it is."""
    std = _AGENTBENCH_STD_ID.fullmatch(item_id)
    if std:
        return f"{int(std.group(1))}/{std.group(2)}-{std.group(3)}"
    dev = _AGENTBENCH_DEV_ID.fullmatch(item_id)
    if dev:
        return f"{dev.group(1)}-{dev.group(2)}"
    return item_id


def load_items(data: Path, scripts: Path | None = None, *, include_dev: bool = False) -> list[Item]:
    """AgentBench's OS items, in a fixed order.

    `data` is AgentBench's data/os_interaction dir (its standard set: every data/*/*.json,
    scripts from scripts/<that dir>, ids like '1/stock-00000'; with `include_dev` also
    data/dev.json, ids like 'dev-00003') or one problem file (ids like 'dev-00003'; scripts
    from `scripts`, else scripts/<dir or stem> next to its data dir).
    """
    if data.is_dir():
        files = sorted(p for p in (data / "data").glob("*/*.json"))
        if not files:
            raise TaskError(f"OS data {data}: no data/*/*.json files (expected AgentBench's data/os_interaction)")
        items = []
        for path in files:
            group = path.parent.name
            items += load_file(path, scripts=scripts or data / "scripts" / group, prefix=f"{group}/{path.stem}")
        if include_dev:
            dev = data / "data" / "dev.json"
            if not dev.is_file():
                raise TaskError(f"OS data {data}: include_dev asks for {dev}, which does not exist")
            items += load_file(dev, scripts=data / "scripts" / "dev", prefix="dev")
        return items
    if not data.is_file():
        raise TaskError(f"OS data {data} does not exist")
    if scripts is None:
        parent = data.parent
        if parent.name == "data":
            scripts = parent.parent / "scripts" / data.stem
        else:
            scripts = parent.parent.parent / "scripts" / parent.name
    return load_file(data, scripts=scripts, prefix=data.stem)


def script_argv(script: Script, params: Sequence[str] = ()) -> list[str]:
    """AgentBench's execute_independent command line."""
    if script.language == "python":
        return ["python3", "-c", script.code, *params]
    return ["bash", "-c", script.code, *(["--", *params] if params else [])]


def shell_command(script: Script) -> str:
    """A script as one shell command (the oracle runs examples through the agent's shell)."""
    if script.language == "python":
        return f"python3 -c {ansi_c_quote(script.code)}"
    return script.code
