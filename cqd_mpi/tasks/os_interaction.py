"""AgentBench's OS-interaction task (`kind: os`): multi-turn bash in an isolated Linux environment.

The protocol is AgentBench v0.2's (THUDM/AgentBench at 41e6807,
src/server/tasks/os_interaction/task.py and configs/tasks/os.yaml), as the CycleQD paper
evaluates it:
- items are AgentBench's JSON files as they are: `description`, `create.image` (default
  `local-os/default`), `create.init` (a script, or a list of them), `start`, and
  `evaluation.match` (a string, `{answer}` or `{regex}`) or `evaluation.check` (a script or a
  list; a null entry is the item's `evaluation.example`). A script is a string (bash) or
  `{code | file, language}` with `file` relative to the file's scripts dir;
- the conversation is AgentBench's instruction prompt and its one-shot dialogue, then "Now,
  I will start a new problem in a new OS. My problem is:" and the description. A reply's
  action is parsed as extract_action parses it: the last `Act:` line wins; `bash` runs the
  reply's ```bash blocks, joined, in the item's persistent shell; `finish` and `answer(...)`
  end the episode. Output over 800 characters is cut to 780 plus AgentBench's notice; empty
  output gets its sentence;
- init scripts run first (`bash -c` / `python3 -c`; one that fails ends the item), then
  `start` in the shell; checks run in the same environment after the episode, as
  AgentBench runs them (`bash -c script -- params`, `python3 -c script params`, params the
  answer then each check's output; a non-zero exit fails the item);
- each reply is a round (`max_rounds`, 5 as in the paper; AgentBench's config says 8); an
  episode that reaches the limit, or a reply without an action, fails, as in AgentBench
  (`judge_unfinished: true` judges it with an empty answer, as the CycleQD authors' code
  does). Success rate = passed / items; `repeats` scores the mean of several passes.

Departures, for isolation (docs/os.md): each item runs in a fresh environment of the
configured back-end (cqd_mpi/sandboxes/osenv*.py) with no network and bounded time,
processes, memory, disk and output; before the checks run, every process of the
environment is stopped and the programs, libraries and interpreter start-up files a check
may run are compared with the image: a check the agent could have fooled by changing them
is not run, and the item scores 0 (`tampered`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cqd_mpi import faults
from cqd_mpi.engines.base import TextGeneration
from cqd_mpi.errors import BackendUnavailable, ConfigError, TaskError
from cqd_mpi.sandboxes.osenv import EnvironmentLimit, EnvLimits, ansi_c_quote, watched
from cqd_mpi.schema import parse_size
from cqd_mpi.tasks import multiturn, protocols
from cqd_mpi.tasks.base import BackendStatus, ItemResult, Task

log = logging.getLogger("cqd_mpi.tasks.os_interaction")

INSTRUCTION = (
    "You are an assistant that will act like a person, I'will play the role of linux(ubuntu) operating system. "
    "Your goal is to implement the operations required by me or answer to the question proposed by me. For each "
    "of your turn, you should first think what you should do, and then take exact one of the three actions: "
    "\"bash\", \"finish\" or \"answer\". \n\n"
    "1. If you think you should execute some bash code, take bash action, and you should print like this:\n\n"
    "Think: put your thought here.\n\nAct: bash\n\n```bash\n# put your bash code here\n```\n\n"
    "2. If you think you have finished the task, take finish action, and you should print like this:\n\n"
    "Think: put your thought here.\n\nAct: finish\n\n"
    "3. If you think you have got the answer to the question, take answer action, and you should print like this:"
    "\n\nThink: put your thought here.\n\n"
    "Act: answer(Your answer to the question should be put in this pair of parentheses)\n\n"
    "If the output is too long, I will truncate it. The truncated output is not complete. You have to deal with "
    "the truncating problem by yourself. Attention, your bash code should not contain any input operation. Once "
    "again, you should take only exact one of the three actions in each turn.\n\n"
)
"""AgentBench v0.2's instruction, verbatim; the first user turn is this, "Now, my problem is:\\n\\n"
and the one-shot question."""

ONE_SHOT = (
    ("user", 'tell me how many files are in the directory "/etc"?'),
    ("assistant", "Think: To count the files in /etc, I need to print all the files in it.\n\n"
                  "Act: bash\n\n```bash\nls /etc\n```"),
    ("user", "The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm networkd-dispatcher protocols "
             "selinux tmpfiles.d [truncated because the output is too long]"),
    ("assistant", "Think: The output has been truncated because it is too long, so I need to count files by "
                  "script directly.\n\nAct: bash\n\n```bash\nls -1 /etc | wc -l\n```"),
    ("user", "The output of the OS:\n220"),
    ("assistant", "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"),
)
NEW_PROBLEM = "Now, I will start a new problem in a new OS. My problem is:\n\n"

OUTPUT_CHARS, OUTPUT_KEPT = 800, 780
TRUNCATED = "\n[truncated because the output is too long]"
EMPTY = "The output of the OS is empty."
OBSERVATION = "The output of the OS:\n\n"

DEFAULT_IMAGE = "local-os/default"
LANGUAGES = ("bash", "python")
EXCERPT_CHARS = 2000

STATUS_ERRORS = {"completed": "wrong-answer", "round-limit": "round-limit", "invalid-action": "invalid-action",
                 "time-limit": "time-limit", "init-failed": "init", "tampered": "tampered",
                 "environment-limit": "environment-limit", "no-reference": "no-reference"}


# ------------------------------------------------------------------- settings


def default_images() -> dict[str, dict[str, str]]:
    """Where each back-end finds AgentBench's images, as env/os-image.sh leaves them."""
    cache = os.environ.get("CQD_CACHE_DIR", "/var/cache/cqd_mpi")
    return {
        "bwrap": {name: f"{cache}/os-{name}-rootfs-bookworm.tar" for name in ("default", "packages")},
        "docker": {name: f"localhost/cqd_mpi-os-{name}:latest" for name in ("default", "packages")},
    }


@dataclasses.dataclass
class EnvironmentSettings:
    """`settings.environment` of an os task: the back-end and the limits of each item's environment.

    images: AgentBench image name (`local-os/default`, or `default`) -> a rootfs tarball or
    directory (bwrap) or an image tag (docker); env/os-image.sh's by default. rootfs_cache:
    where bwrap unpacks tarballs, once per node (default ~/.cache/cqd_mpi/os-rootfs; for root
    $CQD_CACHE_DIR/os-rootfs, default /var/cache/cqd_mpi/os-rootfs).
    docker_host: default $DOCKER_HOST. Sizes are bytes or strings such as '512MiB'.
    """

    backend: Literal["bwrap", "docker"] = "bwrap"
    images: dict[str, str] = dataclasses.field(default_factory=dict)
    rootfs_cache: str | None = None
    docker_host: str | None = None
    command_seconds: float = 30.0
    script_seconds: float = 60.0
    item_seconds: float = 600.0
    memory: int | str = "1GiB"
    processes: int = 256
    disk: int | str = "512MiB"
    inodes: int = 65536
    output: int | str = "1MiB"

    def validate(self, where: str) -> None:
        for name in ("memory", "disk", "output"):
            parse_size(getattr(self, name), f"{where}.{name}", minimum=1)
        for name in ("command_seconds", "script_seconds", "item_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}.{name}: expected a number > 0, got {getattr(self, name)!r}")
        for name in ("processes", "inodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: expected an integer >= 1, got {getattr(self, name)}")

    def limits(self) -> EnvLimits:
        return EnvLimits(command_seconds=self.command_seconds, script_seconds=self.script_seconds,
                         memory_bytes=parse_size(self.memory), processes=self.processes,
                         disk_bytes=parse_size(self.disk), inodes=self.inodes, output_bytes=parse_size(self.output))

    def image_for(self, name: str) -> str:
        """The rootfs or tag configured for an item's image; TaskError naming the setting when none is."""
        short = name.removeprefix("local-os/")
        images = {**default_images()[self.backend], **self.images}
        for key in (name, short):
            if key in images:
                return images[key]
        raise TaskError(f"settings.environment.images has no {self.backend} image for {name!r} "
                        f"(configured: {', '.join(sorted(images))})")


@dataclasses.dataclass
class Settings:
    """`settings:` of an os task in the config.

    max_rounds: replies per item (the paper: 5; AgentBench's config: 8). max_new_tokens: per
    reply. repeats: passes per item, scored by their mean (the CycleQD authors used 5).
    parallel: environments set up, run and checked at once per worker. judge_unfinished:
    judge an episode that ended without finish/answer with an empty answer (the authors'
    code) instead of failing it (AgentBench). scripts: the scripts dir of a single data file
    (default: AgentBench's layout, see the module docstring). item_ids: a subset of items, by
    this task's ids or AgentBench's sample ids, or the name of a list shipped with the package
    (cqd_mpi/tasks/items/os-<name>.json; the `paper` protocol's 110 items are `cycleqd`).
    include_dev: with a data dir, also its data/dev.json (the `paper` items are standard + dev).
    """

    environment: EnvironmentSettings = dataclasses.field(default_factory=EnvironmentSettings)
    max_rounds: int = 5
    max_new_tokens: int = 512
    stop: list[str] = dataclasses.field(default_factory=list)
    repeats: int = 1
    parallel: int = 4
    judge_unfinished: bool = False
    scripts: str | None = None
    item_ids: list[str] | str | None = None
    include_dev: bool = False

    def validate(self, where: str) -> None:
        for name in ("max_rounds", "max_new_tokens", "repeats", "parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if isinstance(self.item_ids, list) and not self.item_ids:
            raise ConfigError(f"{where}.item_ids: expected a non-empty list of item ids or null, got []")


# ---------------------------------------------------------------------- items


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


def extract_action(raw: str) -> tuple[str | None, str | None]:
    """AgentBench's extract_action: ('bash', the joined blocks), ('commit', answer or None), or (None, None)."""
    for action in re.findall(r"Act:\s*(.+)", raw)[::-1]:
        lowered = action.lower()
        if lowered.startswith("bash"):
            return "bash", "\n\n".join(re.findall(r"```bash\n(.*?)\n```", raw, re.DOTALL))
        if lowered.startswith("finish"):
            return "commit", None
        if lowered.startswith("answer"):
            content = action[6:].strip()
            left, right = content.find("("), content.rfind(")")
            if left == -1 or right == -1:
                continue
            return "commit", content[left + 1:right]
    return None, None


def observation(output: str) -> str:
    """A command's output as AgentBench shows it to the agent."""
    if len(output) > OUTPUT_CHARS:
        output = output[:OUTPUT_KEPT] + TRUNCATED
    return OBSERVATION + output if output else EMPTY


def script_argv(script: Script, params: Sequence[str] = ()) -> list[str]:
    """AgentBench's execute_independent command line."""
    if script.language == "python":
        return ["python3", "-c", script.code, *params]
    return ["bash", "-c", script.code, *(["--", *params] if params else [])]


def opening(description: str) -> list[dict[str, str]]:
    first, *rest = ONE_SHOT
    history = [{"role": "user", "content": INSTRUCTION + "Now, my problem is:\n\n" + first[1]}]
    history += [{"role": role, "content": content} for role, content in rest]
    history.append({"role": "user", "content": NEW_PROBLEM + description})
    return history


def shell_command(script: Script) -> str:
    """A script as one shell command (the oracle runs examples through the agent's shell)."""
    if script.language == "python":
        return f"python3 -c {ansi_c_quote(script.code)}"
    return script.code


# -------------------------------------------------------------------- episode

PATH_DIRS = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")
SYSTEM = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr/bin", "usr/sbin", "usr/lib", "usr/lib32",
          "usr/lib64", "usr/libx32", "usr/libexec", "etc/ld.so.*", "etc/python3*")
HOOKS = re.compile(r"(^|/)(sitecustomize|usercustomize)\.py$|\.pth$|(^|/)__pycache__/(site|user)customize\.")


def tampering(before: dict, after: dict, env) -> list[str]:
    """Paths whose change since the set-up could fool a check (the module docstring; docs/os.md):
    a program, library or loader file of the image changed, replaced or deleted; a new program
    on PATH that shadows one of the image's further along PATH; a new Python start-up hook
    (.pth, sitecustomize, usercustomize); a new /etc/ld.so.preload."""
    found = []
    for path in sorted(set(before) | set(after)):
        image = env.image_entry(path)
        then, now = before.get(path, image), after.get(path, image)
        if then == now or (now == ("dir", "") and then in (("dir", ""), None)):
            continue
        directory, _, name = path.rpartition("/")
        if (image is not None and watched(path, SYSTEM)) or path == "etc/ld.so.preload" or HOOKS.search(path):
            found.append(path)
        elif directory in PATH_DIRS and image is None:
            later = PATH_DIRS[PATH_DIRS.index(directory) + 1:]
            if any(env.image_entry(f"{d}/{name}") is not None for d in later):
                found.append(path)
    return found


class OSEpisode(multiturn.Episode):
    """One pass of one item: its conversation and its environment."""

    def __init__(self, *, item: Item, task: OSInteractionTask):
        super().__init__(item_id=item.item_id, history=opening(item.description))
        self.item = item
        self.task = task
        self.rounds = 0
        self.commands: list[str] = []
        self.outputs: list[str] = []
        self.answer: str | None = None
        self.message = ""
        self.env = None
        self.env_seconds = 0.0
        self.baseline: dict = {}
        self.tampered: list[str] = []
        self.checks: list[int | None] = []
        self.no_reference = False
        self._last_round = False

    @property
    def settings(self) -> Settings:
        return self.task.settings

    def set_up(self) -> None:
        started = time.monotonic()
        try:
            self.env = self.task.open_environment(self.item)
            faults.point("os-setup")
            for number, script in enumerate(self.item.init):
                result = self.env.exec(script_argv(script))
                if result.exit_code != 0:
                    self.status = "init-failed"
                    self.message = (f"init script {number} exited {result.exit_code}"
                                    f"{' (time limit)' if result.timed_out else ''}: "
                                    f"{result.output.decode(errors='replace')[-500:]}")
                    return
            if self.item.start is not None:
                self.env.shell().run(self.item.start.code)
            if self.item.check:
                self.baseline = self.env.changes()
        except EnvironmentLimit as exc:
            self.status, self.message = "environment-limit", str(exc)
        finally:
            self.env_seconds += time.monotonic() - started

    def take_reply(self, reply: str) -> str | None:
        self.history.append({"role": "assistant", "content": reply})
        self.rounds += 1
        action, content = extract_action(reply)
        if action is None:
            self.status = "invalid-action"
            return None
        if action == "commit":
            self.answer = content
            self.status = "completed"
            return None
        if self.env_seconds > self.settings.environment.item_seconds:
            self.status = "time-limit"
            return None
        self.commands.append(content)
        if self.rounds >= self.settings.max_rounds:
            if not self.settings.judge_unfinished:
                self.status = "round-limit"
                return None
            self._last_round = True
        return content

    def act(self, command: str) -> str:
        started = time.monotonic()
        try:
            output = self.env.shell().run(command)
        except EnvironmentLimit as exc:
            self.status, self.message = "environment-limit", str(exc)
            return ""
        finally:
            self.env_seconds += time.monotonic() - started
        self.outputs.append(output.text[:EXCERPT_CHARS])
        return observation(output.text)

    def take_observation(self, text: str) -> None:
        if self.status is not None:
            return
        super().take_observation(text)
        if self._last_round:
            self.status = "round-limit"

    # ------------------------------------------------------------- judging

    def judged(self) -> bool:
        if self.status == "completed":
            return True
        return self.settings.judge_unfinished and self.status in ("round-limit", "invalid-action", "time-limit")

    def score(self) -> ItemResult:
        passed = False
        if self.judged():
            if self.status != "completed":
                self.answer = ""
            try:
                passed = self.judge()
            except EnvironmentLimit as exc:
                self.status, self.message = "environment-limit", str(exc)
        return self.result(passed)

    def judge(self) -> bool:
        """AgentBench's judgement, after the environment was stopped and checked for tampering."""
        item, answer = self.item, self.answer
        if item.match is not None:
            if isinstance(answer, str) and item.match.get("strip"):
                answer = answer.strip()
            if answer is None:
                return False
            if "answer" in item.match:
                return answer == item.match["answer"]
            return re.search(item.match["regex"], answer) is not None
        self.env.freeze()
        self.tampered = tampering(self.baseline, self.env.changes(), self.env)
        if self.tampered:
            self.status = "tampered"
            return False
        params = [str(answer)]
        for script in item.check:
            result = self.env.exec(script_argv(script if script is not None else item.example, params))
            self.checks.append(result.exit_code)
            if result.exit_code != 0:
                return False
            params.append(result.output.decode("utf-8", errors="replace"))
        return True

    def result(self, passed: bool) -> ItemResult:
        detail: dict[str, Any] = {
            "file": self.item.file, "index": self.item.index, "status": self.status, "rounds": self.rounds,
            "commands": [c[:EXCERPT_CHARS] for c in self.commands], "outputs": self.outputs,
            "answer": None if self.answer is None else self.answer[:EXCERPT_CHARS],
        }
        if self.checks:
            detail["checks"] = self.checks
        if self.tampered:
            detail["tampered"] = self.tampered[:50]
        restarts = self.env.shells_started - 1 if self.env is not None else 0
        if restarts > 0:
            detail["shell_restarts"] = restarts
        if self.message:
            detail["message"] = self.message[:EXCERPT_CHARS]
        status = "no-reference" if self.no_reference else self.status or "completed"
        error = None if passed else STATUS_ERRORS.get(status, status)
        return ItemResult(item_id=self.item.item_id, score=1.0 if passed else 0.0, error=error, detail=detail)

    def failed_result(self) -> ItemResult:
        result = super().failed_result()
        return dataclasses.replace(result, detail={"file": self.item.file, "index": self.item.index,
                                                   "rounds": self.rounds, **result.detail})

    def tear_down(self) -> None:
        if self.env is not None:
            self.env.close()


def reference_reply(episode: OSEpisode) -> str:
    """The oracle: echo the match answer (or run the example) in the shell, then answer the last
    line of its output (`Act: answer(...)` holds one line), or `finish` when there is none."""
    item = episode.item
    if episode.rounds == 0:
        if item.match is not None and "answer" in item.match:
            command = f"echo {_single_quoted(item.match['answer'])}"
        elif item.example is not None:
            command = shell_command(item.example)
        else:
            episode.no_reference = True
            return "Think: there is no reference solution.\n\nAct: finish"
        return f"Think: the reference solution.\n\nAct: bash\n\n```bash\n{command}\n```"
    lines = (episode.outputs[-1] if episode.outputs else "").strip().splitlines()
    if not lines:
        return "Think: done.\n\nAct: finish"
    return f"Think: its last line is the answer.\n\nAct: answer({lines[-1].strip()})"


def _single_quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# ----------------------------------------------------------------------- task


class OSInteractionTask(Task):
    """AgentBench's OS interaction; see the module docstring for the protocol and its sources."""

    kind = "os"
    Settings = Settings
    presets = protocols.OS

    def __init__(self, *, name, data, settings, context):
        super().__init__(name=name, data=data, settings=settings or Settings(), context=context)
        self._items: dict[str, Item] | None = None
        self._backend_lock = threading.Lock()
        self._rootfs: dict[str, Path] = {}
        self._client = None
        self._pristine: dict[str, Any] = {}

    # ------------------------------------------------------------------ data

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.context.config_dir) / path

    def data_path(self) -> Path:
        if not self.data:
            raise TaskError(f"task {self.name!r}: give `data:` AgentBench's data/os_interaction dir or one of "
                            "its problem files (e.g. data/os_interaction/data/dev.json)")
        return self._path(self.data)

    @property
    def items(self) -> dict[str, Item]:
        if self._items is None:
            scripts = self._path(self.settings.scripts) if self.settings.scripts else None
            items = {item.item_id: item for item in load_items(self.data_path(), scripts,
                                                               include_dev=self.settings.include_dev)}
            wanted = protocols.item_ids(self.kind, self.settings.item_ids, f"task {self.name!r}: settings.item_ids")
            if wanted is not None:
                wanted = [from_agentbench_id(i) for i in wanted]
                unknown = [i for i in wanted if i not in items]
                if unknown:
                    raise TaskError(f"task {self.name!r}: settings.item_ids names {', '.join(map(repr, unknown))}, "
                                    f"which {self.data_path()} does not have (ids look like {next(iter(items))!r})")
                items = {i: items[i] for i in items if i in set(wanted)}
            for item in items.values():
                self.settings.environment.image_for(item.image)
            self._items = items
        return self._items

    def item_seconds(self, item_id: str) -> float:
        """Each pass: the environment's budget, its last command and its checks' script."""
        env = self.settings.environment
        return self.settings.repeats * (env.item_seconds + env.command_seconds + env.script_seconds)

    def item_ids(self) -> list[str]:
        return list(self.items)

    def _item(self, item_id: str) -> Item:
        try:
            return self.items[item_id]
        except KeyError:
            raise TaskError(f"task {self.name!r}: unknown item id {item_id!r}") from None

    # ---------------------------------------------------------- environments

    def open_environment(self, item: Item):
        """A fresh environment for one pass of an item, on the configured back-end."""
        environment = self.settings.environment
        source = environment.image_for(item.image)
        limits = environment.limits()
        if environment.backend == "bwrap":
            from cqd_mpi.sandboxes.osenv_bwrap import BwrapEnvironment

            return BwrapEnvironment(rootfs=self._unpacked(source), image=item.image, limits=limits)
        from cqd_mpi.sandboxes.osenv_docker import DockerEnvironment

        client, pristine = self._docker(source)
        return DockerEnvironment(client=client, image=item.image, tag=source, limits=limits, pristine=pristine)

    def _unpacked(self, source: str) -> Path:
        from cqd_mpi.sandboxes.osenv_bwrap import default_rootfs_cache, ensure_rootfs

        with self._backend_lock:
            if source not in self._rootfs:
                cache = self.settings.environment.rootfs_cache
                self._rootfs[source] = ensure_rootfs(self._path(source),
                                                     self._path(cache) if cache else default_rootfs_cache())
            return self._rootfs[source]

    def _docker(self, tag: str):
        from cqd_mpi.sandboxes import containers
        from cqd_mpi.sandboxes.osenv_docker import BUILD_HINT, FEATURE, PURPOSE, Pristine

        with self._backend_lock:
            if self._client is None:
                self._client = containers.docker_client(self.settings.environment.docker_host, feature=FEATURE)
                containers.reap_orphans(self._client, PURPOSE)
            if tag not in self._pristine:
                containers.ensure_image(self._client, tag, feature=FEATURE, build_hint=BUILD_HINT)
                self._pristine[tag] = Pristine(self._client, tag)
            return self._client, self._pristine[tag]

    # -------------------------------------------------------------- protocol

    def run_episodes(self, item_ids: Sequence[str], respond: multiturn.Respond, *,
                     repeats: int | None = None) -> list[ItemResult]:
        """Play `repeats` passes of each item (cqd_mpi.tasks.multiturn.play) and score each item by
        the mean of its passes."""
        repeats = self.settings.repeats if repeats is None else repeats
        items = [self._item(i) for i in item_ids]
        episodes = [OSEpisode(item=item, task=self) for item in items for _ in range(repeats)]
        results = multiturn.play(episodes, respond, parallel=self.settings.parallel, where=f"task {self.name!r}")
        combined = []
        for index, item in enumerate(items):
            passes = results[index * repeats:(index + 1) * repeats]
            if repeats == 1:
                combined.append(passes[0])
                continue
            score = sum(r.score for r in passes) / repeats
            error = next((r.error for r in passes if r.error is not None), None) if score < 1.0 else None
            combined.append(ItemResult(item_id=item.item_id, score=score, error=error,
                                       seconds=sum(r.seconds for r in passes),
                                       detail={"scores": [r.score for r in passes],
                                               "passes": [r.detail for r in passes]}))
        return combined

    def evaluate(self, model: TextGeneration, item_ids: Sequence[str]) -> list[ItemResult]:
        settings = self.settings

        def respond(episodes):
            return list(model.chat([e.history for e in episodes], max_new_tokens=settings.max_new_tokens,
                                   stop=list(settings.stop)))

        return self.run_episodes(item_ids, respond)

    def reference_results(self, item_ids: Sequence[str]) -> list[ItemResult]:
        """The harness ceiling (check-tasks): each item's example (check items) or a shell echo of
        its answer (match items) runs in the agent's shell, and its output is the answer."""
        return self.run_episodes(item_ids, lambda episodes: [reference_reply(e) for e in episodes], repeats=1)

    def check_backends(self) -> list[BackendStatus]:
        statuses = []
        try:
            path = self.data_path()
            statuses.append(BackendStatus("os data", True, f"{path}: {len(self.items)} items"))
            images = sorted({item.image for item in self.items.values()})
        except Exception as exc:
            statuses.append(BackendStatus("os data", False, str(exc)))
            images = [DEFAULT_IMAGE]
        statuses += environment_status(self.settings.environment, images, self._path)
        return statuses

    def close(self) -> None:
        with self._backend_lock:
            pristine, self._pristine = self._pristine, {}
            client, self._client = self._client, None
        for entry in pristine.values():
            entry.close()
        if client is not None:
            client.close()


def environment_status(settings: EnvironmentSettings, images: Sequence[str], resolve) -> list[BackendStatus]:
    """Whether the configured back-end can start the images' environments, without starting one. Never raises."""
    name = f"os environment ({settings.backend})"
    out = []
    try:
        if settings.backend == "bwrap":
            from cqd_mpi.sandboxes.osenv_bwrap import bwrap_usable

            out.append(BackendStatus(name, *bwrap_usable()))
            for image in images:
                source = resolve(settings.image_for(image))
                present = source.exists()
                out.append(BackendStatus(f"os image {image} (bwrap)", present,
                                         f"{source}" if present else f"{source} is missing: build it with env/os-image.sh"))
            return out
        from cqd_mpi.sandboxes import containers
        from cqd_mpi.sandboxes.osenv_docker import FEATURE

        client = containers.docker_client(settings.docker_host, feature=FEATURE)
        try:
            out.append(BackendStatus(name, True, f"engine at {client.cqd_base_url or 'the default docker socket'}"))
            for image in images:
                tag = settings.image_for(image)
                try:
                    client.images.get(tag)
                    out.append(BackendStatus(f"os image {image} (docker)", True, tag))
                except Exception as exc:
                    out.append(BackendStatus(f"os image {image} (docker)", False,
                                             f"{tag}: {exc}; build it with env/os-image.sh"))
        finally:
            client.close()
    except (BackendUnavailable, TaskError) as exc:
        out.append(BackendStatus(name, False, str(exc)))
    except Exception as exc:
        out.append(BackendStatus(name, False, f"{type(exc).__name__}: {exc}"))
    return out
