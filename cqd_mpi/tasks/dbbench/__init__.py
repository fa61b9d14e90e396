"""AgentBench's DB task (dbbench): multi-turn SQL against a real MySQL-compatible server.

The protocol follows AgentBench v0.2 (THUDM/AgentBench at 41e6807,
src/server/tasks/dbbench/__init__.py), the version the CycleQD paper evaluates with (0-shot,
up to 5 rounds):
- the conversation opens with its instruction prompt as a user turn, "Ok." as the agent's
  turn, then the item's `description` and `add_description`;
- a reply whose `Action: ` line says `Operation` must hold a ```sql block; its first block is
  executed (newlines made spaces) and the raw result, cut at 800 characters, is the next user
  turn. After `max_rounds` executions, or on any other action, the reply must hold a line
  `Final Answer: ...`; a reply that fits neither pattern ends the item (validation failure);
- SELECT-style items compare that answer with the label (AgentBench's calculate_overall:
  float equality for single values, set equality otherwise); INSERT/UPDATE/DELETE items ignore
  the answer and compare AgentBench's row-hash MD5 of the table with `answer_md5`;
- the metric is AgentBench's `overall_cat_accuracy`: the mean of the SELECT, INSERT and UPDATE
  categories' accuracies (SELECT holds every type other than INSERT and UPDATE).

Those are the Settings defaults (AgentBench's code defaults). A config always goes through a
protocol (cqd_mpi.tasks.protocols.DBBENCH): `paper` (the CycleQD authors' 341 items, 5 rounds,
an Operation reply without SQL read for its answer, pooled accuracy) or `reference`
(AgentBench v0.2's configs: 15 rounds); docs/protocols.md has each point and its source.

Deliberate differences, for isolation: AgentBench runs every item as root in a database named
after its table and lets a statement string hold several statements; here each item has its
own database and user (cqd_mpi.sandboxes.mysql), several statements are refused, and
statements have a time limit. AgentBench eval()s the answer text; here it is read with
ast.literal_eval, which accepts the same literals and never runs model output.

Modules: `protocol` (the prompt and reply patterns), `settings`, `items` (AgentBench's entries),
`scoring` (answers and category accuracy), `episode` (one item's conversation and database, and
the oracle), `task` (DBBenchTask), `doctor` (server_status). The round-by-round loop is the
shared cqd_mpi.tasks.multiturn; servers and item databases are cqd_mpi.sandboxes.mysql.
"""

from cqd_mpi.tasks.dbbench.doctor import server_status
from cqd_mpi.tasks.dbbench.episode import (
    EXCERPT_CHARS,
    STATUS_ERRORS,
    Episode,
    Respond,
    reference_reply,
)
from cqd_mpi.tasks.dbbench.items import MODIFYING_TYPES, Item, load_items, parse_item
from cqd_mpi.tasks.dbbench.protocol import (
    ACKNOWLEDGEMENT,
    ACTION,
    FINAL_ANSWER,
    INSTRUCTION,
    SQL_BLOCK,
)
from cqd_mpi.tasks.dbbench.scoring import CATEGORIES, answer_matches, category_accuracy, is_correct
from cqd_mpi.tasks.dbbench.settings import Settings
from cqd_mpi.tasks.dbbench.task import DBBenchTask

__all__ = [
    "ACKNOWLEDGEMENT", "ACTION", "CATEGORIES", "EXCERPT_CHARS", "FINAL_ANSWER", "INSTRUCTION", "MODIFYING_TYPES",
    "SQL_BLOCK", "STATUS_ERRORS", "DBBenchTask", "Episode", "Item", "Respond", "Settings", "answer_matches",
    "category_accuracy", "is_correct", "load_items", "parse_item", "reference_reply", "server_status",
]
