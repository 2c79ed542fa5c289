"""Chat templates (lm/chat_template.py): Jinja2 in a sandbox, and the Jinja-free ChatML renderer."""
from __future__ import annotations

import pytest

from lm.chat_template import ChatTemplateError, render_chat, render_chatml, render_r1_chat

# SmolLM2-135M-Instruct's template, verbatim from its GGUF `tokenizer.chat_template`.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


def test_smollm2_template_adds_its_default_system_turn() -> None:
    pytest.importorskip("jinja2")
    out = render_chat(SMOLLM2, CONVERSATIONS[0])
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chatml_renderer_agrees_with_jinja(messages, gen: bool) -> None:
    pytest.importorskip("jinja2")
    assert render_chatml(SMOLLM2, messages, gen) == render_chat(SMOLLM2, messages, add_generation_prompt=gen,
                                                                use_jinja=True)


def test_r1_prompt_puts_the_instruction_in_the_system_turn() -> None:
    out = render_r1_chat(SMOLLM2, "  What is 7 * 8? ", use_jinja=False)
    assert out.startswith("<|im_start|>system\nA conversation between User and Assistant.")
    assert "<think> reasoning process here </think> <answer> answer here </answer>.<|im_end|>\n" in out
    assert out.endswith("<|im_start|>user\nWhat is 7 * 8?<|im_end|>\n<|im_start|>assistant\n")
    assert "SmolLM" not in out  # our system turn replaces the default one


def test_a_template_cannot_reach_python_internals() -> None:
    pytest.importorskip("jinja2")
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat(evil, CONVERSATIONS[0])


def test_raise_exception_in_a_template_is_a_clear_error() -> None:
    pytest.importorskip("jinja2")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", CONVERSATIONS[0])


def test_non_chatml_template_without_jinja_is_refused() -> None:
    with pytest.raises(ChatTemplateError, match="not ChatML"):
        render_chat("[INST] {{ messages[0]['content'] }} [/INST]", CONVERSATIONS[0], use_jinja=False)
