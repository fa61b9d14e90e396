"""Chat formats: the named templates a config may choose, and rendering with a response prefix.

Kept free of torch and transformers so tasks can render the text formats themselves.
"""

from __future__ import annotations

from collections.abc import Callable

INSTRUCTION_RESPONSE = "instruction-response"
"""The chat format of the CycleQD authors' code task (see `CHAT_TEMPLATES`)."""

CHAT_TEMPLATES = {
    INSTRUCTION_RESPONSE: (
        "{% set offset = 0 %}"
        "{% if messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] | trim }}{{ '\\n\\n' }}"
        "{% set offset = 1 %}"
        "{% endif %}"
        "{% for message in messages[offset:] %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ '@@ Instruction:\\n' + (message['content'] | trim) + '\\n\\n' }}"
        "{% else %}"
        "{{ '@@ Response:\\n' + (message['content'] | trim) }}"
        "{% endif %}"
        "{% if loop.last and message['role'] == 'user' and add_generation_prompt %}"
        "{{ '@@ Response:\\n' }}"
        "{% endif %}"
        "{% endfor %}"
    ),
}
"""Named chat formats a config may give instead of a Jinja template.

`instruction-response`: an optional system text, then ``@@ Instruction:`` / ``@@ Response:``
turns, the format the CycleQD authors' released code uses for MBPP.
"""

_PREFILL_MARKER = "\x00cqd-prefill-marker\x00"

Conversation = list[dict[str, str]]


class TemplateError(ValueError):
    """A conversation cannot be rendered with the template."""


def resolve_template(chat_template: str | None, where: str = "chat_template") -> str | None:
    """A template name from `CHAT_TEMPLATES` or a Jinja string, as Jinja text (None stays None)."""
    from cqd_mpi.errors import ConfigError

    if chat_template is None:
        return None
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    raise ConfigError(
        f"{where}: expected one of {', '.join(map(repr, CHAT_TEMPLATES))} "
        f"or a Jinja template string, got {chat_template!r}"
    )


def render_conversation(conversation: Conversation, render: Callable[[Conversation, bool], str]) -> str:
    """The prompt text of a conversation, given `render(messages, add_generation_prompt)`.

    A conversation that ends with an assistant message is continued from that message's
    text, as evalplus's codegen does with its response prefix.
    """
    if not conversation:
        raise TemplateError("a conversation needs at least one message")
    last = conversation[-1]
    if last.get("role") != "assistant":
        return render(conversation, True)
    marked = [*conversation[:-1], {"role": "assistant", "content": last["content"] + _PREFILL_MARKER}]
    text = render(marked, False)
    if _PREFILL_MARKER not in text:
        raise TemplateError("the chat template drops the final assistant message, so it cannot be continued")
    return text.split(_PREFILL_MARKER)[0]


def render_jinja(template: str, conversation: Conversation, **variables) -> str:
    """Render `conversation` with a Jinja chat template, without a tokenizer (as transformers does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return render_conversation(
        conversation,
        lambda messages, add_generation_prompt: compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        ),
    )
