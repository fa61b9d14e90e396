"""AgentBench v0.2's OS conversation: the instruction, the one-shot dialogue, how a reply's
action is read and how a command's output is shown to the agent."""

from __future__ import annotations

import re

from cqd_mpi.sandboxes.osenv import HOSTNAME

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
    """A command's output as AgentBench shows it to the agent (v0.2 task.py:500-515; the authors'
    code the same, os_interaction.py:366-377), from the text the `observation` setting picks."""
    if len(output) > OUTPUT_CHARS:
        output = output[:OUTPUT_KEPT] + TRUNCATED
    return OBSERVATION + output if output else EMPTY


def terminal_prompt(cwd: str, host: str = HOSTNAME) -> str:
    """The bash prompt that ends each output of the CycleQD authors' terminal, after a command
    that left the shell in `cwd` (as bash's `\\w` shows it: `~` for $HOME). Their shell is
    `bash --login` on a docker exec TTY (SakanaAI/CycleQD evaluation/fishfarm/fishfarm/tasks/
    os_interaction.py:247-249; docker gives it TERM=xterm), read until a chunk holds the prompt
    (`\\x1b.+@.+[#|$] `, :286-287) and returned with it (:292-293, shown uncleaned at :366-368).
    Their images are Ubuntu's, whose /root/.bashrc (the /etc/skel/.bashrc of Debian's bash
    package; Debian's own /root/.bashrc leaves the title out) sets, for TERM=xterm (no colour),
    PS1='\\[\\e]0;\\u@\\h: \\w\\a\\]\\u@\\h:\\w\\$ ': the window title, then
    `root@<host>:<cwd># `. Their host name is the container's (the first 12 hex digits of its id);
    ours is `cqd-os` (osenv.HOSTNAME), 6 characters shorter."""
    return f"\x1b]0;root@{host}: {cwd}\x07root@{host}:{cwd}# "


def opening(description: str) -> list[dict[str, str]]:
    first, *rest = ONE_SHOT
    history = [{"role": "user", "content": INSTRUCTION + "Now, my problem is:\n\n" + first[1]}]
    history += [{"role": role, "content": content} for role, content in rest]
    history.append({"role": "user", "content": NEW_PROBLEM + description})
    return history
