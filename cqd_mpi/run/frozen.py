"""A run's frozen config across versions and resumes: which keys cannot change its results,
the keys added since an older version froze it (at the values that reproduce that version),
the hash state.h5 binds, and the refusal of a resume whose config would change its results.
Reading a config (run/config.py) moves renamed keys; this module compares frozen ones."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any

from cqd_mpi import schema
from cqd_mpi.errors import StateError
from cqd_mpi.run.config import (
    CoefficientsConfig,
    PolicyGradientConfig,
    RuntimeConfig,
    VisionConfig,
    moved_keys,
)
from cqd_mpi.tasks import protocols

log = logging.getLogger("cqd_mpi.run.config")

RESULT_NEUTRAL_KEYS = frozenset({
    ("runtime", "transport"), ("runtime", "staging_dir"), ("runtime", "eval_groups"),
    ("runtime", "basis_cache"), ("runtime", "keep_backup"), ("runtime", "retain_child_bytes"),
    ("runtime", "threads"), ("runtime", "eval_deadline"), ("runtime", "eval_grace"), ("runtime", "model_store_bytes"),
    ("runtime", "model_store_depth"), ("engine", "device"), ("protocol",), ("tracking",),
})
"""Keys that cannot change a run's results, or whose effect is checked elsewhere. The run-wide
`protocol` is one: what it changes is resolved into each task's `protocol` and `settings`,
which are compared. `runtime.threads` is another: the thread count it gives is recorded in
state.h5 and checked on resume (run/state.py), so pinning the recorded count is no change."""


ADDED_KEYS: dict[tuple[str, ...], Any] = {
    ("qd", "mutation", "niter"): 2,
    ("qd", "mutation", "sketch_dtype"): "float32",
    ("protocol",): protocols.DEFAULT,
    ("tasks", "*", "protocol"): None,
    ("qd", "method"): "cycleqd",
    ("qd", "coefficients"): schema.to_dict(CoefficientsConfig()),
    ("qd", "policy_gradient"): schema.to_dict(PolicyGradientConfig()),
    ("runtime", "eval_deadline"): "auto",
    ("runtime", "eval_grace"): RuntimeConfig.eval_grace,
    ("runtime", "model_store_bytes"): None,
    ("runtime", "model_store_depth"): RuntimeConfig.model_store_depth,
    ("runtime", "test_every"): RuntimeConfig.test_every,
    ("vision",): schema.to_dict(VisionConfig()),
}
"""Keys added since a run could have been frozen, at the values that reproduce what the older
version did ('*' stands for every element of a list). Tasks frozen without a protocol kept
only the settings their config gave; resuming one whose kind has presets lists the preset's
values as changes (the scores would differ), so that needs --force."""


ADDED_ENGINE_SETTINGS: dict[str, dict[str, Any]] = {"vllm": {"bos": "once"}}
"""As ADDED_KEYS, for `engine.settings` of the engine kind a frozen config names."""


def upgrade(frozen: dict[str, Any]) -> dict[str, Any]:
    """A config frozen by an earlier version, with moved keys in their new place and the keys
    added since at the values that reproduce what that version did, so that resuming its run
    is not refused over them."""
    frozen = moved_keys(frozen, warn=False)
    for path, value in ADDED_KEYS.items():
        nodes = [frozen]
        for key in path[:-1]:
            if key == "*":
                nodes = [item for node in nodes if isinstance(node, list) for item in node]
            else:
                nodes = [node.get(key) for node in nodes if isinstance(node, dict)]
        for node in nodes:
            if isinstance(node, dict):
                node.setdefault(path[-1], copy.deepcopy(value))
    engine = frozen.get("engine") if isinstance(frozen.get("engine"), dict) else {}
    if isinstance(engine.get("settings"), dict):
        engine["settings"] = {**ADDED_ENGINE_SETTINGS.get(engine.get("kind"), {}), **engine["settings"]}
    return frozen


def config_hash(config: dict[str, Any]) -> str:
    """sha256 (hex) of the config's results-relevant content (RESULT_NEUTRAL_KEYS left out, the
    keys of `upgrade` in place) as canonical JSON: state.h5's `config_hash`."""
    relevant = upgrade(copy.deepcopy(config))
    for path in RESULT_NEUTRAL_KEYS:
        parent = relevant
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def refuse_changes(holder: str, changed: list[str], *, force: bool) -> None:
    """Refuse to resume `holder` (a run dir, a state file) under a config with these changes
    (from `differences`), unless `force`, which only warns."""
    if not changed:
        return
    if not force:
        listing = "\n  ".join(changed)
        raise StateError(
            f"{holder} holds a run with a different config; resuming it with this one would "
            f"change its results:\n  {listing}\nUse the original config, a new run_dir, or "
            "--force to resume with the new settings anyway."
        )
    log.warning("resuming %s with a changed config (--force): %s", holder, "; ".join(changed))


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
