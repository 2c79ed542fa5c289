"""Byte-level BPE vocabularies -> tiktoken (lm/bpe_convert.py).

Hand-worked merge examples first; then parity with Hugging Face `tokenizers` (the reference
implementation) on tokenizers it trains itself, one per supported pre-tokenizer.
"""
from __future__ import annotations

import json

import pytest

from lm.bpe_convert import (DIGITS_THEN_GPT2_SPLIT, DROPPED, GPT2_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT,
                            BPEConversionError, bytes_to_unicode, convert_byte_level_bpe, make_tokenizer,
                            token_bytes)
from tests.lm.varied_texts import varied_texts

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_vocab(skip: tuple[int, ...] = ()) -> dict[str, int]:
    """The 256 single-byte tokens (minus `skip`), ids 3.. in byte order (0..2 are the specials)."""
    table = bytes_to_unicode()
    return {table[b]: 3 + i for i, b in enumerate(b for b in range(256) if b not in skip)}


def _specials() -> dict[str, int]:
    return {s: i for i, s in enumerate(SPECIALS)}


def test_bytes_to_unicode_is_gpt2s_table() -> None:
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("!")] == "!"
    assert token_bytes("ĠhelloĊ") == b" hello\n"
    assert token_bytes("Ã©") == "é".encode("utf-8")  # é is C3 A9, spelled with two alphabet chars


def test_a_character_outside_the_byte_alphabet_is_rejected() -> None:
    with pytest.raises(BPEConversionError, match="byte alphabet"):
        token_bytes(" plain space")  # a raw space is not in the alphabet: it is spelled "Ġ"


@pytest.mark.parametrize("el_id,he_id", [(300, 301), (301, 300)])
def test_merge_order_not_token_id_decides(el_id: int, he_id: int) -> None:
    # Merges, best first: (e, l) then (h, e). On "hel" the pairs are (h,e) rank 1 and (e,l) rank 0,
    # so (e,l) merges first: [h, el]; no rule joins (h, el), so that is the result. When "he" has the
    # smaller id (second case) the ids do not follow merge order and an id map must restore it;
    # merging by id would wrongly give [he, l].
    vocab = {**_byte_vocab(), "el": el_id, "he": he_id}
    bpe = convert_byte_level_bpe("t", vocab, ["e l", "h e"], _specials(), GPT2_SPLIT)
    assert (bpe.id_map is None) == (el_id < he_id)
    tok = make_tokenizer(bpe, eos_id=0)
    assert tok.encode("hel") == [vocab["h"], el_id]
    assert tok.encode("he") == [he_id]
    assert tok.decode(tok.encode("hel")) == "hel"


def test_merges_as_pairs_and_specials_keep_their_ids() -> None:
    vocab = {**_byte_vocab(), "Ġt": 259, "he": 260, "Ġthe": 261}
    bpe = convert_byte_level_bpe("t", vocab, [["Ġ", "t"], ["h", "e"], ["Ġt", "he"]], _specials(), GPT2_SPLIT)
    tok = make_tokenizer(bpe, eos_id=0)
    # " the" -> Ġ t h e -> (Ġ,t) rank 0 -> Ġt h e -> (h,e) rank 1 -> Ġt he -> (Ġt,he) -> Ġthe.
    assert tok.encode("<|im_start|> the<|im_end|>") == [1, 261, 2]
    assert tok.vocab_size == 262
    assert tok.decode([1, 261, 2]) == "<|im_start|> the<|im_end|>"


def test_a_byte_without_a_token_is_marked_and_encodes_to_the_unknown_id() -> None:
    # No token for byte 0x04: HF's BPE (and llama.cpp) skip it; tiktoken must rank it, so the id
    # map marks it DROPPED and the Tokenizer (which cannot drop) encodes it as the unknown token.
    # "a\x04b" splits into "a", "\x04", "b" (the control char is punctuation-like).
    vocab = _byte_vocab(skip=(0x04,))
    bpe = convert_byte_level_bpe("t", vocab, [], _specials(), GPT2_SPLIT)
    assert bpe.id_map is not None and bpe.id_map.count(DROPPED) == 1
    tok = make_tokenizer(bpe, eos_id=2, unknown_id=0)
    assert tok.encode("a\x04b") == [vocab["a"], 0, vocab["b"]]
    last = max(vocab.values())  # the marked rank sits past every real token and must not shadow one
    assert tok.token_bytes(last) == bytes([255])


def test_a_merge_of_unknown_tokens_is_an_error() -> None:
    with pytest.raises(BPEConversionError, match="not in the vocabulary"):
        convert_byte_level_bpe("t", _byte_vocab(), ["h e"], _specials(), GPT2_SPLIT)


def test_digits_split_keeps_a_whitespace_run_before_a_digit_whole() -> None:
    # HF Sequence[Digits(individual), ByteLevel] on "and  12": Digits -> "and  ", "1", "2"; GPT-2's
    # regex on "and  " -> "and", "  " (the run ends its piece), and "  " merges to "ĠĠ".
    # Plain GPT-2 on the whole string -> "and", " ", " 12": the two spaces never meet.
    vocab = {**_byte_vocab(), "ĠĠ": 259}
    digits = make_tokenizer(convert_byte_level_bpe("d", vocab, ["Ġ Ġ"], _specials(), DIGITS_THEN_GPT2_SPLIT), eos_id=0)
    gpt2 = make_tokenizer(convert_byte_level_bpe("g", vocab, ["Ġ Ġ"], _specials(), GPT2_SPLIT), eos_id=0)
    a, n, d, one, two = (vocab[c] for c in ("a", "n", "d", "1", "2"))
    assert digits.encode("and  12") == [a, n, d, 259, one, two]
    assert gpt2.encode("and  12") == [a, n, d, vocab["Ġ"], vocab["Ġ"], one, two]


# --------------------------------------------------------------------------------------------------
# Parity with HF `tokenizers`


def _hf_pre_tokenizers():
    from tokenizers import Regex, pre_tokenizers as pt

    return {
        "gpt2": (pt.ByteLevel(add_prefix_space=False, use_regex=True), GPT2_SPLIT),
        "digits": (pt.Sequence([pt.Digits(individual_digits=True),
                                pt.ByteLevel(add_prefix_space=False, use_regex=True)]), DIGITS_THEN_GPT2_SPLIT),
        "llama3": (pt.Sequence([pt.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                pt.ByteLevel(add_prefix_space=False, use_regex=False)]), LLAMA3_SPLIT),
        "qwen2": (pt.Sequence([pt.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                               pt.ByteLevel(add_prefix_space=False, use_regex=False)]), QWEN2_SPLIT),
    }


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return varied_texts(SPECIALS)


@pytest.mark.parametrize("kind", ["gpt2", "digits", "llama3", "qwen2"])
def test_matches_hf_tokenizers_on_a_trained_vocabulary(kind: str, texts: list[str]) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    pre, split = _hf_pre_tokenizers()[kind]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = pre
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=1500, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts * 3, trainer)
    model = json.loads(hf.to_str())["model"]
    specials = {s: hf.token_to_id(s) for s in SPECIALS}
    vocab = {t: i for t, i in model["vocab"].items() if t not in specials}
    bpe = convert_byte_level_bpe(kind, vocab, model["merges"], specials, split)
    tok = make_tokenizer(bpe, eos_id=specials["<|endoftext|>"])

    mismatches = [s for s in texts if tok.encode(s) != hf.encode(s).ids]
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, e.g. {mismatches[:3]!r}"
    assert all(tok.decode(tok.encode(s)) == s for s in texts)
