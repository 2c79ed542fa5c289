"""Rendering a model's own chat template (the Jinja string shipped in GGUF `tokenizer.chat_template`
or `tokenizer_config.json`).

Where from: Hugging Face `apply_chat_template`, which renders the template with Jinja2 in an
immutable sandbox (`trim_blocks`, `lstrip_blocks`, `raise_exception`, `tojson`). The template comes
from a downloaded file, so it is untrusted: it is only ever rendered in that sandbox, never
evaluated as Python. Without Jinja2, ChatML templates (`<|im_start|>role\\n...<|im_end|>`, SmolLM2,
Qwen2) are rendered by a small built-in renderer that reads the default system prompt out of the
template text; any other template then raises a clear error.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

Message = Mapping[str, str]

# DeepSeek-R1-Zero's training template (DeepSeek-AI 2025, Table 1), verbatim; "r1_zero_short" is a
# compact variant for tiny CPU models, whose compute is dominated by prompt length.
TEMPLATES: dict[str, str] = {
    "r1_zero": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer. The reasoning process and answer are enclosed within "
        "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
        "process here </think> <answer> answer here </answer>. User: {question}. Assistant:"
    ),
    "r1_zero_short": "User: {question}\nAssistant:",
}

# Every name `Tokenizer.render_prompt` accepts: the plain templates, "chat" (the model's own) and
# "chat_think" (the model's own, the assistant's turn opened with "<think>": R1-Zero's template ends
# with the assistant's turn, and prefilling the tag is how small instruct models are put on the
# format's path; the rewards see the prompt and count the tag as written).
TEMPLATE_NAMES: tuple[str, ...] = (*TEMPLATES, "chat", "chat_think")
THINK_PREFILL = "<think>\n"


def prefills_think(template: str | None) -> bool:
    """True when prompts rendered with `template` end inside an opened `<think>` block, so a
    completion starts in the think body (the format check adds the tag it did not write)."""
    return template == "chat_think"


def known_template(name: str) -> str:
    """`name` if it is one of TEMPLATE_NAMES; else a ValueError listing them (config validation)."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATE_NAMES)}")
    return name


class ChatTemplateError(ValueError):
    """The chat template cannot be rendered."""


def render_chat(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", use_jinja: bool | None = None) -> str:
    """The prompt text of `messages` ([{"role": ..., "content": ...}]) under `template`.

    Args:
        template: the Jinja chat template.
        messages: the conversation so far.
        add_generation_prompt: end with the opening of an assistant turn.
        bos_token, eos_token: values of the template variables of the same name.
        use_jinja: force (True) or avoid (False) Jinja2; None uses it when it is installed.
    """
    for m in messages:
        if "role" not in m or "content" not in m:
            raise ChatTemplateError(f"a message needs 'role' and 'content', got keys {sorted(m)}")
    if use_jinja is None:
        use_jinja = _jinja_available()
    if use_jinja:
        return _render_jinja(template, messages, add_generation_prompt, bos_token, eos_token)
    return render_chatml(template, messages, add_generation_prompt)


def _jinja_available() -> bool:
    try:
        import jinja2.sandbox  # noqa: F401
    except ImportError:
        return False
    return True


def _render_jinja(template: str, messages: Sequence[Message], add_generation_prompt: bool,
                  bos_token: str, eos_token: str) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=[dict(m) for m in messages],
                               add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"cannot render the chat template: {e}") from e


_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)


def render_chatml(template: str, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """Jinja-free ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, a default
    system turn first when the template has one and the conversation does not start with a system
    message, and `<|im_start|>assistant\\n` as the generation prompt."""
    if "<|im_start|>" not in template:
        raise ChatTemplateError("the chat template is not ChatML and Jinja2 is not installed "
                                "(`pip install jinja2`) to render it")
    parts: list[str] = []
    default = _DEFAULT_SYSTEM.search(template)
    if default and (not messages or messages[0]["role"] != "system"):
        parts.append(f"<|im_start|>system\n{default.group(1)}<|im_end|>\n")
    parts.extend(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def r1_system_prompt() -> str:
    """DeepSeek-R1-Zero's instruction (the `r1_zero` template up to " User:"), used as the system
    turn when a chat model gets the R1 prompt through its own template."""
    return TEMPLATES["r1_zero"].split(" User:")[0]


def render_r1_chat(template: str, question: str | Sequence[Message], **kwargs: str | bool | None) -> str:
    """The R1 prompt for a chat model: R1-Zero's instruction as the system turn, the question as
    the user turn, then the opening of the assistant's turn (where `<think>` should follow).

    Departs from R1-Zero's plain-text template ("... User: q. Assistant:") only in wrapping the
    same instruction and question in the model's own turn markers, which instruct-tuned models
    such as SmolLM2-Instruct need to answer at all. A conversation (chat messages) is rendered as
    it is, with R1-Zero's instruction as its system turn when it has none.
    """
    if isinstance(question, str):
        messages = [{"role": "user", "content": question.strip()}]
    else:
        messages = [dict(m) for m in question]
    if not messages or messages[0].get("role") != "system":
        messages = [{"role": "system", "content": r1_system_prompt()}, *messages]
    return render_chat(template, messages, add_generation_prompt=True, **kwargs)


def r1_conversation(question: str | Sequence[Message], template: str) -> list[dict[str, str]]:
    """The chat messages equivalent to a prompt r1flow renders with a named template, for
    exports in TRL's conversational form: the problem's messages (or one user turn), preceded by
    R1-Zero's instruction as the system turn under the templates that carry it (``r1_zero`` in
    its text, ``chat`` as that turn) when the conversation has no system turn of its own."""
    if isinstance(question, str):
        messages = [{"role": "user", "content": question.strip()}]
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in question]
    if template in ("r1_zero", "chat", "chat_think") and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": r1_system_prompt()}, *messages]
    return messages
