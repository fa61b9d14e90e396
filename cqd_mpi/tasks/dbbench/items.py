"""AgentBench's dbbench entries (jsonl or a JSON list) read into checked `Item`s."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cqd_mpi.errors import TaskError
from cqd_mpi.sandboxes.mysql import (
    Table,
)

MODIFYING_TYPES = ("INSERT", "DELETE", "UPDATE")


@dataclasses.dataclass(frozen=True)
class Item:
    """One dbbench entry: its question, its table, and what a correct run produces."""

    item_id: str
    type: str
    description: str
    add_description: str
    table: Table
    label: tuple[Any, ...] | None
    answer_md5: str | None

    @property
    def modifies(self) -> bool:
        return self.type in MODIFYING_TYPES

    @property
    def category(self) -> str:
        """AgentBench's category: INSERT, UPDATE, or SELECT for every other type (DELETE included)."""
        return self.type if self.type in ("INSERT", "UPDATE") else "SELECT"

    @property
    def question(self) -> str:
        return self.description + "\n" + self.add_description


def _cell(value: Any, where: str) -> Any:
    """A table cell bound as AgentBench's client binds it (numbers as their Python text, None as NULL)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return str(value)
    raise TaskError(f"{where}: expected a string, number or null, got {type(value).__name__} {value!r:.60}")


def parse_item(entry: Any, *, item_id: str, where: str) -> Item:
    """Check one jsonl entry and build its Item; errors name the entry and the key."""

    def need(mapping: Any, key: str, kind: type | tuple[type, ...], path: str) -> Any:
        if not isinstance(mapping, dict) or key not in mapping:
            raise TaskError(f"{where}: missing key {path!r}")
        value = mapping[key]
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise TaskError(f"{where}: key {path!r} should be {names}, got {type(value).__name__} {value!r:.60}")
        return value

    if not isinstance(entry, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    types = need(entry, "type", list, "type")
    if not types or not isinstance(types[0], str):
        raise TaskError(f"{where}: key 'type' should be a list starting with a type name, got {types!r:.60}")
    table = need(entry, "table", dict, "table")
    info = need(table, "table_info", dict, "table.table_info")
    columns = need(info, "columns", list, "table.table_info.columns")
    names = []
    for index, column in enumerate(columns):
        names.append(need(column, "name", str, f"table.table_info.columns[{index}].name"))
    if not names:
        raise TaskError(f"{where}: key 'table.table_info.columns' is empty")
    rows = []
    for index, row in enumerate(need(info, "rows", list, "table.table_info.rows")):
        if not isinstance(row, list) or len(row) != len(names):
            raise TaskError(f"{where}: table.table_info.rows[{index}] should be a list of {len(names)} cells "
                            f"(one per column), got {row!r:.60}")
        rows.append(tuple(_cell(v, f"{where}: table.table_info.rows[{index}]") for v in row))
    kind = types[0]
    label = entry.get("label")
    if label is not None and not isinstance(label, list):
        raise TaskError(f"{where}: key 'label' should be list, got {type(label).__name__} {label!r:.60}")
    answer_md5 = None
    if kind in MODIFYING_TYPES:
        answer_md5 = need(entry, "answer_md5", str, "answer_md5")
    elif label is None:
        raise TaskError(f"{where}: missing key 'label' (the answer list of a {kind} item)")
    return Item(
        item_id=item_id,
        type=kind,
        description=need(entry, "description", str, "description"),
        add_description=need(entry, "add_description", str, "add_description"),
        table=Table(name=need(table, "table_name", str, "table.table_name"), columns=tuple(names), rows=tuple(rows)),
        label=None if label is None else tuple(label),
        answer_md5=answer_md5,
    )


def load_items(path: Path) -> list[Item]:
    """The items of an AgentBench dbbench file (jsonl, or a JSON list), ids '0', '1', ... in file order."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskError(f"dbbench data {path}: cannot read it ({exc})") from exc
    if path.suffix == ".json":
        try:
            entries = json.loads(text)
        except ValueError as exc:
            raise TaskError(f"dbbench data {path}: not valid JSON ({exc})") from exc
        if not isinstance(entries, list):
            raise TaskError(f"dbbench data {path}: expected a JSON list of entries, got {type(entries).__name__}")
        located = [(f"dbbench data {path} entry {i}", e) for i, e in enumerate(entries)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"dbbench data {path} line {number}", json.loads(line)))
            except ValueError as exc:
                raise TaskError(f"dbbench data {path} line {number}: not valid JSON ({exc})") from exc
    if not located:
        raise TaskError(f"dbbench data {path}: the file holds no entries")
    return [parse_item(entry, item_id=str(i), where=where) for i, (where, entry) in enumerate(located)]
