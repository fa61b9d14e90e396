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
  end the episode. Output (cleaned as AgentBench cleans it, or raw: `observation`) over 800
  characters is cut to 780 plus AgentBench's notice; empty output gets its sentence; a
  command still running after `turn_seconds` (the authors' 5 s) gets the episode judged;
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

Modules: `protocol` (the prompts, action parsing, observations), `settings`, `items` (AgentBench's
files and ids, scripts as command lines), `tamper` (the tamper check), `episode` (one pass of
one item, and the oracle), `task` (OSInteractionTask), `doctor` (environment_status). The
round-by-round loop is the shared cqd_mpi.tasks.multiturn.
"""

from cqd_mpi.tasks.os_interaction.doctor import environment_status
from cqd_mpi.tasks.os_interaction.episode import (
    EXCERPT_CHARS,
    STATUS_ERRORS,
    OSEpisode,
    reference_reply,
)
from cqd_mpi.tasks.os_interaction.items import (
    DEFAULT_IMAGE,
    LANGUAGES,
    Item,
    Script,
    from_agentbench_id,
    load_file,
    load_items,
    parse_item,
    script_argv,
    shell_command,
)
from cqd_mpi.tasks.os_interaction.protocol import (
    EMPTY,
    INSTRUCTION,
    NEW_PROBLEM,
    OBSERVATION,
    ONE_SHOT,
    OUTPUT_CHARS,
    OUTPUT_KEPT,
    TRUNCATED,
    extract_action,
    observation,
    opening,
    terminal_prompt,
)
from cqd_mpi.tasks.os_interaction.settings import EnvironmentSettings, Settings, default_images
from cqd_mpi.tasks.os_interaction.tamper import IMMUTABLE, OPEN, PATH_DIRS, STARTUP, tampering
from cqd_mpi.tasks.os_interaction.task import OSInteractionTask

__all__ = [
    "DEFAULT_IMAGE", "EMPTY", "EXCERPT_CHARS", "IMMUTABLE", "INSTRUCTION", "LANGUAGES", "NEW_PROBLEM", "OBSERVATION",
    "ONE_SHOT", "OPEN", "OUTPUT_CHARS", "OUTPUT_KEPT", "PATH_DIRS", "STARTUP", "STATUS_ERRORS", "TRUNCATED",
    "EnvironmentSettings", "Item", "OSEpisode", "OSInteractionTask", "Script", "Settings", "default_images",
    "environment_status", "extract_action", "from_agentbench_id", "load_file", "load_items", "observation",
    "opening", "parse_item", "reference_reply", "script_argv", "shell_command", "tampering", "terminal_prompt",
]
