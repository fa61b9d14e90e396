"""A few OS items in AgentBench's own layout (data/dev.json, scripts/dev/), shared by the OS
task's tests and the three-task run."""

from __future__ import annotations

import json
from pathlib import Path

INTEGER_MATCH = "from sys import argv\nif int(argv[1]) == int(argv[2]): exit(0)\nexit(1)\n"
GREET_CHECK = "#!/bin/bash\n[ \"$(greet)\" = hi ] || exit 1\n[ -x /usr/local/bin/greet ] || exit 1\nexit 0\n"
GREET_EXAMPLE = "printf '#!/bin/bash\\necho hi\\n' > /usr/local/bin/greet && chmod +x /usr/local/bin/greet\n"

ITEMS = [
    {"description": "What is in /root/hello.txt?", "create": {"local": "default", "init": {"code": "echo -n world > /root/hello.txt"}},
     "evaluation": {"match": "world"}, "labels": ["file"]},
    {"description": "How many files are in /root/d?",
     "create": {"init": ["mkdir -p /root/d", {"file": "init/mk.sh"}]},
     "evaluation": {"check": [None, {"language": "python", "file": "check/integer-match.py"}],
                    "example": {"code": "ls /root/d | wc -l"}}},
    {"description": "Make a command greet that prints hi.",
     "evaluation": {"check": {"file": "check/greet.sh"}, "example": {"file": "example/greet.sh"}}},
    {"description": "There is a vulnerability related to SUID; fix it.", "create": {"init": {"code": "chmod u+s /usr/bin/find"}},
     "evaluation": {"check": {"code": "ls -l /usr/bin/find | awk '{if ($1~/^-..s/) { exit 1; } else { exit 0; }}'"},
                    "example": {"code": "chmod u-s /usr/bin/find"}}},
    {"description": "What is the value of SECRET in my shell?", "start": "export SECRET=42",
     "evaluation": {"match": "42"}},
    {"description": "How many directories are in /root/d?", "create": [None, {"language": "python", "file": "check/integer-match.py"}],
     "evaluation": {"match": {"regex": "^0$"}, "example": {"code": "ls -d /root/d 2>/dev/null | wc -l"}}},
    {"description": "This item cannot be set up.", "create": {"init": {"code": "echo broken >&2; exit 3"}},
     "evaluation": {"match": "x"}},
]


def write_items(root: Path) -> Path:
    """ITEMS and their scripts in AgentBench's layout under `root` (data/dev.json, scripts/dev/)."""
    (root / "data").mkdir()
    (root / "data" / "dev.json").write_text(json.dumps(ITEMS, indent=1))
    scripts = root / "scripts" / "dev"
    for name, text in {"check/integer-match.py": INTEGER_MATCH, "check/greet.sh": GREET_CHECK,
                       "example/greet.sh": GREET_EXAMPLE, "init/mk.sh": "touch /root/d/a /root/d/b /root/d/c\n"}.items():
        (scripts / name).parent.mkdir(parents=True, exist_ok=True)
        (scripts / name).write_text(text)
    return root
