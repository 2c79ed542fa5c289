"""Foreign byte-level BPE vocabularies (GPT-2 style `vocab` + `merges`) as a `tiktoken.Encoding`.

Where from: GPT-2's byte-level BPE (Radford et al. 2019, `encoder.py`: `bytes_to_unicode`, merge
ranks), as stored by Hugging Face `tokenizers` (tokenizer.json) and llama.cpp (GGUF
`tokenizer.ggml.tokens` / `tokenizer.ggml.merges`), and the split regexes llama.cpp's
`llama-vocab.cpp` uses for each `tokenizer.ggml.pre` type.

How the conversion works, and where it departs from the reference tokenizers:
- Tokens are spelled in GPT-2's printable byte alphabet ("Ġ" is the space byte); they are turned
  back into raw bytes.
- tiktoken merges the adjacent pair whose *concatenation* has the lowest rank; HF/llama.cpp merge
  the pair whose *merge rule* comes first. The two agree when every merge produces a distinct token
  and ranks follow merge order. So a merge result's rank is its merge's position; when the model's
  ids already increase in merge order (true for vocabularies trained by `tokenizers`, SmolLM2
  included) the ranks are the model ids themselves and no id map is needed; otherwise an id map
  (tiktoken rank -> model id) is built.
- A single byte with no token in the vocabulary (SmolLM2 has 21: the controls 0x04 0x06 0x13 0x14
  0x16 0x1D, and lead bytes of unassigned or invalid code points) is dropped by HF's BPE and by
  llama.cpp. tiktoken must know every byte, so such bytes get ranks past the vocabulary, marked
  `DROPPED` in `ConvertedBPE.id_map`. `Tokenizer` has no way to drop a token, so
  `make_tokenizer` maps them to the model's unknown token (else end-of-text): the one departure
  from HF's ids, and only for text containing those bytes.
- Control / added tokens (`<|im_start|>`, ...) stay out of the encoding: `Tokenizer` matches them
  whole before splitting (as HF does with added tokens) and gives them their model ids.
- Pre-tokenization is one regex. Where llama.cpp and HF apply two splits in sequence (first single
  digits, then GPT-2's regex, for `smollm`/`starcoder`), the two are folded into one equivalent
  regex: see `DIGITS_THEN_GPT2_SPLIT`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

import tiktoken

from lm.tokenizer import Tokenizer

# The model-id value of a tiktoken token that the reference tokenizer drops (a byte with no token).
DROPPED = -1

# GPT-2 (and HF `ByteLevel(use_regex=True)`).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# HF `Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]` / llama.cpp
# {"\p{N}", GPT-2} as one regex. Digits split first, so GPT-2's regex runs on the digit-free
# stretches between them: a digit is its own piece, ` ?\p{N}+` can never apply, and a whitespace
# run right before a digit ends its stretch, so `\s+(?!\S)` takes it whole — hence the lookahead
# `(?![^\s\p{N}])` ("not followed by a non-space that is not a digit").
DIGITS_THEN_GPT2_SPLIT = (
    r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)

# Llama 3 (= tiktoken cl100k_base's split), llama.cpp "llama-bpe".
LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen (tokenizer.json `Split` pattern).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# llama.cpp `tokenizer.ggml.pre` names -> split regex (the groups of llama-vocab.cpp).
GGUF_PRE_SPLITS: dict[str, str] = {
    **dict.fromkeys(("gpt2", "mpt", "olmo", "jais"), GPT2_SPLIT),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    DIGITS_THEN_GPT2_SPLIT),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"), LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), QWEN2_SPLIT),
}


class BPEConversionError(ValueError):
    """The vocabulary cannot be represented faithfully as a tiktoken encoding."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (`encoder.py`, Radford et al. 2019).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
    U+0100.. in byte order, so "Ġ" (U+0120) is the space byte 0x20.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(token: str) -> bytes:
    """Raw bytes of a token spelled in GPT-2's byte alphabet ("Ġhello" -> b" hello")."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError as e:
        raise BPEConversionError(f"token {token!r} has a character {e.args[0]!r} outside the GPT-2 "
                                 f"byte alphabet: not a byte-level BPE vocabulary") from None


def split_merge(merge: str | Sequence[str]) -> tuple[str, str]:
    """One merge rule as a pair: "Ġ t" (GGUF, old tokenizer.json) or ["Ġ", "t"] (new tokenizer.json)."""
    if isinstance(merge, str):
        parts = merge.split(" ")
    else:
        parts = list(merge)
    if len(parts) != 2 or not all(parts):
        raise BPEConversionError(f"malformed merge rule {merge!r}: expected two tokens")
    return parts[0], parts[1]


@dataclass(frozen=True)
class ConvertedBPE:
    """A foreign vocabulary as tiktoken sees it, in the pieces `lm.tokenizer.Tokenizer` takes.

    `encoding` holds the ordinary tokens only; `id_map[rank]` is the model id of tiktoken rank
    `rank` (`DROPPED` for a byte the model has no token for), `None` when ranks are model ids.
    `special_tokens` maps text to model ids. `vocab_size` is the model's (embedding rows).
    """

    encoding: tiktoken.Encoding
    id_map: tuple[int, ...] | None
    special_tokens: dict[str, int]
    vocab_size: int


def convert_byte_level_bpe(name: str, vocab: Mapping[str, int], merges: Sequence[str | Sequence[str]],
                           special_tokens: Mapping[str, int], split_pattern: str) -> ConvertedBPE:
    """Build a `ConvertedBPE` from a byte-level vocabulary.

    Args:
        name: encoding name (tiktoken uses it only for display).
        vocab: token (GPT-2 byte alphabet) -> model id; must not contain the special tokens.
        merges: merge rules in priority order ("a b" or ["a", "b"]).
        special_tokens: text -> model id, matched whole before pre-tokenization.
        split_pattern: the pre-tokenizer regex (one of the `*_SPLIT` constants or a tokenizer.json
            `Split` pattern).
    """
    pairs = [split_merge(m) for m in merges]
    by_bytes: dict[bytes, int] = {}
    for token, model_id in vocab.items():
        b = token_bytes(token)
        if b in by_bytes:
            raise BPEConversionError(f"two tokens spell the bytes {b!r} (ids {by_bytes[b]} and {model_id})")
        by_bytes[b] = model_id
    merge_order = _merge_results(pairs, vocab)
    all_ids = [*by_bytes.values(), *special_tokens.values()]
    vocab_size = max(all_ids) + 1
    if len(set(all_ids)) != len(all_ids):
        raise BPEConversionError("a special token shares its id with another token")

    if all(a < b for a, b in zip(merge_order, merge_order[1:])):
        ranks, id_map = dict(by_bytes), None  # model ids already follow merge order
    else:
        ranks, id_map = _ranks_in_merge_order(by_bytes, merge_order)

    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    if missing:
        n_ranks = max(ranks.values()) + 1
        if id_map is None:
            id_map = list(range(n_ranks))  # ranks are model ids; holes (special ids) map to themselves
        for k, b in enumerate(missing):
            ranks[b] = n_ranks + k
        id_map.extend([DROPPED] * len(missing))
    enc = tiktoken.Encoding(name, pat_str=split_pattern, mergeable_ranks=ranks, special_tokens={})
    return ConvertedBPE(encoding=enc, id_map=None if id_map is None else tuple(id_map),
                        special_tokens=dict(special_tokens), vocab_size=vocab_size)


def _merge_results(pairs: list[tuple[str, str]], vocab: Mapping[str, int]) -> list[int]:
    """Model ids of the tokens the merges produce, in merge order.

    A token produced by two merges keeps the first (tiktoken ranks tokens, not rules): the later
    rule then fires at the earlier rule's priority, a rare difference from HF's BPE.
    """
    seen: set[str] = set()
    out: list[int] = []
    for left, right in pairs:
        for part in (left, right):
            if part not in vocab:
                raise BPEConversionError(f"merge ({left!r}, {right!r}) uses {part!r}, which is not in the vocabulary")
        merged = left + right
        if merged not in vocab:
            raise BPEConversionError(f"merge ({left!r}, {right!r}) yields {merged!r}, which is not in the vocabulary")
        if merged in seen:
            continue
        seen.add(merged)
        out.append(vocab[merged])
    return out


def _ranks_in_merge_order(by_bytes: dict[bytes, int], merge_order: list[int]) -> tuple[dict[bytes, int], list[int]]:
    """Ranks 0.. in the order: tokens no merge produces (single bytes, ...), then merge results
    by merge position; returns (ranks, rank -> model id)."""
    merged = set(merge_order)
    id_to_bytes = {i: b for b, i in by_bytes.items()}
    order = [i for i in sorted(id_to_bytes) if i not in merged] + merge_order
    return {id_to_bytes[i]: r for r, i in enumerate(order)}, order


def make_tokenizer(bpe: ConvertedBPE, *, bos_id: int | None = None, eos_id: int | None = None,
                   pad_id: int | None = None, unknown_id: int | None = None, add_bos: bool = False,
                   chat_template: str | None = None) -> Tokenizer:
    """A `Tokenizer` over a converted vocabulary, carrying the model's BOS setting and chat template.

    Bytes the vocabulary lacks (`DROPPED`) encode to `unknown_id`, else to the end-of-text id (see
    the module docstring).
    """
    id_map = bpe.id_map
    if id_map is not None and DROPPED in id_map:
        fallback = unknown_id if unknown_id is not None else eos_id
        if fallback is None:
            fallback = bpe.special_tokens.get("<|endoftext|>")
        if fallback is None:
            raise BPEConversionError("the vocabulary lacks some bytes and has no unknown or end-of-text "
                                     "token to encode them as")
        id_map = tuple(fallback if i == DROPPED else i for i in id_map)
    return Tokenizer(bpe.encoding, bpe.special_tokens, id_map=id_map, bos_id=bos_id, eos_id=eos_id,
                     pad_id=pad_id, add_bos=add_bos, chat_template=chat_template)
