"""Tokenizer: trained BPE round trips, special tokens, templates, rank files, cl100k, id maps."""
from __future__ import annotations

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from lm.tokenizer import (PAT_STR, SPECIAL_TOKENS, TEMPLATES, Tokenizer, read_rank_file, train_bpe,
                          write_rank_file)

MIXED = ("Solve 3x² + 2x − 1 = 0 ⇒ x ∈ {1/3, −1}. 数学很有趣，答案是42。 "
         "<think> 12 * 7 = 84 </think> <answer> 84 </answer><|endoftext|><|im_start|>user<|im_end|>\n\ttabs  end")


def test_round_trip_chinese_math_and_special_tokens(tokenizer):
    ids = tokenizer.encode(MIXED)
    assert tokenizer.decode(ids) == MIXED
    for s in ("<think>", "</think>", "<answer>", "</answer>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert ids.count(tokenizer.id_of(s)) == MIXED.count(s)
    assert max(ids) < tokenizer.vocab_size


def test_special_tokens_are_single_ids_only_when_allowed(tokenizer):
    think = tokenizer.id_of("<think>")
    assert tokenizer.encode("<think>") == [think]
    plain = tokenizer.encode("<think>", allow_special=False)
    assert think not in plain and tokenizer.decode(plain) == "<think>"
    assert tokenizer.eos_id == tokenizer.id_of("<|endoftext|>")
    assert tokenizer.pad_id == tokenizer.id_of("<|pad|>") != tokenizer.eos_id
    assert tokenizer.bos_id is None
    assert set(SPECIAL_TOKENS) <= set(tokenizer.special_tokens)


def test_trained_vocab_layout(tokenizer):
    enc = tokenizer.encoding
    assert isinstance(enc, tiktoken.Encoding)
    assert all(enc.decode_single_token_bytes(b) == bytes([b]) for b in range(256))
    assert tokenizer.vocab_size == enc.n_vocab + len(SPECIAL_TOKENS) <= 400
    assert enc.n_vocab > 256  # it learned merges
    # digits are split one per token
    assert len(tokenizer.encode("12345", allow_special=False)) == 5


def test_train_bpe_is_deterministic():
    texts = ["the cat sat on the mat"] * 5 + ["the hat"] * 3
    a, b = train_bpe(texts, 270), train_bpe(texts, 270)
    assert a.encoding._mergeable_ranks == b.encoding._mergeable_ranks
    # the most frequent pair inside a pre-token: "at" in " cat"/" sat"/" mat"/" hat" (10 times)
    assert a.encoding._mergeable_ranks[b"at"] == 256
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(texts, 100)


def test_save_load_identical(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "ranks.tiktoken").is_file()
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.encode(MIXED) == tokenizer.encode(MIXED)
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id, loaded.special_tokens) == \
        (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id, tokenizer.special_tokens)


def test_rank_file_round_trip_and_errors(tmp_path):
    ranks = {bytes([i]): i for i in range(256)} | {b"ab": 256, "数".encode(): 257}
    write_rank_file(tmp_path / "r.tiktoken", ranks)
    assert read_rank_file(tmp_path / "r.tiktoken") == ranks
    # tiktoken reads the same file format
    assert load_tiktoken_bpe(str(tmp_path / "r.tiktoken")) == ranks
    (tmp_path / "bad.tiktoken").write_text("not-base64!! x\n")
    with pytest.raises(ValueError, match="malformed rank line"):
        read_rank_file(tmp_path / "bad.tiktoken")


def test_cl100k_base_offline_with_project_special_tokens(tmp_path):
    tok = Tokenizer.from_tiktoken("cl100k_base")
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert tok.eos_id == 100257
    assert tok.encode("hello world", allow_special=False) == [15339, 1917]  # cl100k's own ids
    assert tok.id_of("<think>") >= 100277 and tok.vocab_size == 100277 + len(set(SPECIAL_TOKENS) - {"<|endoftext|>"})
    tok.save(tmp_path / "cl")
    assert not (tmp_path / "cl" / "ranks.tiktoken").exists()  # a reference, not a copy
    assert Tokenizer.load(tmp_path / "cl").encode(MIXED) == tok.encode(MIXED)


def test_foreign_vocabulary_with_id_map(tokenizer, tmp_path):
    """A loader (GGUF/HF) passes an id map: ordinary ranks -> the model's ids; specials as-is."""
    enc = tokenizer.encoding
    n = enc.n_vocab
    id_map = np.arange(n)[::-1] + 3  # reversed, shifted past 3 special ids
    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    foreign = Tokenizer(enc, specials, id_map=id_map)
    text = "<|im_start|>数学 12+7=19<|im_end|><|endoftext|>"
    ids = foreign.encode(text)
    assert ids[0] == 1 and ids[-2:] == [2, 0]
    assert ids[1:-2] == [n - 1 - r + 3 for r in enc.encode_ordinary("数学 12+7=19")]
    assert foreign.decode(ids) == text
    assert foreign.vocab_size == n + 3 and foreign.pad_id == foreign.eos_id == 0
    foreign.save(tmp_path / "f")
    assert Tokenizer.load(tmp_path / "f").encode(text) == ids
    with pytest.raises(ValueError, match="id_map has shape"):
        Tokenizer(enc, specials, id_map=np.arange(5))
    with pytest.raises(ValueError, match="no eos_id"):
        Tokenizer(enc, {})


def test_templates(tokenizer):
    r1 = tokenizer.render_prompt("What is {x}?")
    assert r1 == TEMPLATES["r1_zero"].replace("{question}", "What is {x}?")
    assert r1.startswith("A conversation between User and Assistant. The user asks a question, and the "
                         "Assistant solves it.")
    assert "<think> reasoning process here </think> <answer> answer here </answer>." in r1
    assert r1.endswith("User: What is {x}?. Assistant:")
    assert tokenizer.render_prompt("2+2?", "r1_zero_short") == "User: 2+2?\nAssistant:"
    with pytest.raises(KeyError, match="unknown template"):
        tokenizer.render_prompt("q", "chatml")


def test_pattern_is_gpt4_with_single_digits():
    assert r"\p{N}|" in PAT_STR and r"\p{N}{1,3}" not in PAT_STR


def test_decode_ignores_ids_outside_the_vocabulary(tokenizer):
    """A model whose embedding has spare rows may sample ids the tokenizer lacks."""
    ids = tokenizer.encode("ab") + [tokenizer.vocab_size + 5, -1]
    assert tokenizer.decode(ids) == "ab"
    assert tokenizer.token_bytes(tokenizer.vocab_size + 5) == b""


def test_chat_template_and_bos_setting_survive_save_and_load(tmp_path):
    from lm.tokenizer import Tokenizer

    tok = Tokenizer.from_tiktoken("cl100k_base")
    tok.add_bos = True
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.add_bos is True and back.chat_template == tok.chat_template
    prompt = back.render_prompt("What is 2 + 2?", "chat")
    assert "<|im_start|>user\nWhat is 2 + 2?<|im_end|>" in prompt and "<think>" in prompt


def test_chat_template_name_needs_a_chat_template():
    import pytest

    from lm.tokenizer import Tokenizer

    with pytest.raises(KeyError, match="has none"):
        Tokenizer.from_tiktoken("cl100k_base").render_prompt("q", "chat")


def test_chat_think_opens_the_assistants_think_block(tokenizer):
    import copy

    from lm.chat_template import THINK_PREFILL, prefills_think
    from tests.lm.test_chat_template import SMOLLM2

    chat_model = copy.copy(tokenizer)
    chat_model.chat_template = SMOLLM2
    chat, think = chat_model.render_prompt("What is 2+2?", "chat"), chat_model.render_prompt("What is 2+2?", "chat_think")
    assert think == chat + THINK_PREFILL and chat.endswith("<|im_start|>assistant\n")
    assert prefills_think("chat_think") and not prefills_think("chat") and not prefills_think(None)
    with pytest.raises(KeyError, match="'chat_think' needs a tokenizer with its own chat template"):
        tokenizer.render_prompt("q", "chat_think")
