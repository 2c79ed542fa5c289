"""Batched sampling with a preallocated KV cache, behind a small interface a vLLM backend can match.

Where from: nanochat's `engine.py` (a KV-cache object passed into `forward`, sampling with torch
ops) and vLLM's `SamplingParams` vocabulary. How it runs:

- Prompts of different lengths share one batch by left padding: every row's last prompt token sits
  in the same column, so each decoding step writes one cache column for the whole batch. Padded
  rows get rotary positions that start at 0 on their first real token and a key mask that hides
  their pads; a batch without padding takes the mask-free fast path.
- A prompt repeated in the batch (GRPO's G samples, evaluation's k) is prefilled once and its
  keys/values copied to its rows.
- One `KVCache` is allocated per batch shape and reused across `generate` calls; the model runs
  under `Transformer.fused_inference()` (q/k/v and gate/up as one matmul each; on CPU weights
  pre-packed for oneDNN).
- Temperature / top-k / top-p are applied to the logits and a token is drawn with the Gumbel-max
  trick from a `torch.Generator` seeded per call, so `generate(prompts, params, seed)` is
  reproducible for the same prompts and batch size. temperature == 0 is greedy (argmax).
  `seed` may instead be one seed per prompt: rows sharing a seed share one random stream (drawn
  jointly, in row order), so a row's sample no longer depends on the other rows of the batch,
  only on the rows of its stream (`RowStreams`). GRPO seeds each group this way, so its groups can
  be generated on different ranks and still match one process.
- `Generation.logprobs` are log-probabilities of the sampled tokens under the model's *raw*
  distribution (log_softmax of the logits at temperature 1, before top-k/top-p), the quantity
  `lm.logprobs.token_logprobs(..., temperature=1.0)` recomputes for training. (vLLM's default is
  the same; TRL divides by the sampling temperature: pass `temperature=` there to match it.)
- A sequence stops at the tokenizer's end-of-text id, any of `stop_token_ids`, or once its text
  contains one of `stop_strings`; the stopping token is kept in `token_ids` (so trainers learn to
  stop) and `finish_reason` is "stop", else "length". Decoding ends when every row has stopped.
- Finished rows stop costing compute: once a quarter of the batch has stopped, those rows are
  dropped from the batch and the KV cache (one copy of the live rows' cache; at most ~log_4/3(B)
  times a call). Noise is still drawn for the whole batch and each row takes its own, so a row
  samples the same tokens with or without dropping (up to the matmuls' rounding at another
  batch size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import Tensor

from lm.model import KVCache, Transformer
from lm.tokenizer import Tokenizer

__all__ = ["SamplingParams", "Generation", "Sampler", "Seed", "RowStreams", "TorchSampler", "KVCache",
           "completion_text", "sample_next"]


@dataclass
class SamplingParams:
    """How to sample. temperature 0 = greedy; top_k 0 and top_p 1.0 = off."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(s for s in self.stop_strings if s)


@dataclass
class Generation:
    """One sampled completion: the prompt, the new token ids, the log-prob of each new token under
    the model, and why it ended ("stop": a stop token or string; "length": max_new_tokens)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = field(default="length")


Seed = int | Sequence[int]
"""One seed for a whole `generate` call, or one per prompt (rows sharing a seed share a stream)."""


class Sampler(Protocol):
    """What stages call; `TorchSampler` implements it, a vLLM backend could too."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: Seed) -> list[Generation]:
        ...


class RowStreams:
    """Uniform noise from one `torch.Generator` per distinct seed, each feeding the rows that carry
    that seed (in row order). A stream's draws depend only on its own rows, so a group of rows
    samples the same tokens in any batch, alone or beside other groups. One seed for every row is
    one `torch.Generator` drawing the whole [B, V] block."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str) -> None:
        rows: dict[int, list[int]] = {}
        for r, s in enumerate(seeds):
            rows.setdefault(int(s), []).append(r)
        self.n = len(seeds)
        self.streams = [(torch.tensor(r, device=device), torch.Generator(device=device).manual_seed(s))
                        for s, r in rows.items()]

    def rand(self, vocab: int, device: torch.device, rows: Tensor | None = None) -> Tensor:
        """[B, V] uniform noise in [0, 1) for the B rows, or for `rows` only ([n, V], the noise
        those rows get in the full draw: dropping finished rows changes no row's sample)."""
        if len(self.streams) == 1:
            u = torch.rand((self.n, vocab), generator=self.streams[0][1], device=device)  # [B, V]
        else:
            u = torch.empty((self.n, vocab), device=device)  # [B, V]
            for idx, g in self.streams:
                u.index_copy_(0, idx, torch.rand((len(idx), vocab), generator=g, device=device))
        return u if rows is None else u[rows]  # [B|n, V]


def completion_text(tokenizer: Tokenizer, generation: Generation) -> str:
    """The completion's text, without a final end-of-text/pad token (stop strings are kept:
    "</answer>" is part of the answer's format)."""
    ids = generation.token_ids
    if ids and ids[-1] in (tokenizer.eos_id, tokenizer.pad_id):
        ids = ids[:-1]
    return tokenizer.decode(ids)


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | RowStreams | None,
                rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Draw one token per row.

    Args:
        logits: [B, V] next-token logits.
        params: temperature / top_k / top_p.
        generator: randomness source (unused when greedy): one generator, or `RowStreams`.
        rows: with `RowStreams`, which of its rows the logits' rows are (the rest have finished).

    Returns:
        tokens [B] (long) and their log-probs [B] (fp32) under log_softmax(logits) at temperature 1.
    """
    logits = logits.float()  # [B, V]
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    if params.temperature == 0.0:
        tokens = logits.argmax(dim=-1)  # [B]
    else:
        scores = logits / params.temperature if params.temperature != 1.0 else logits  # [B, V]
        if 0 < params.top_k < scores.shape[-1]:
            kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]  # [B, 1]
            scores = scores.masked_fill(scores < kth, float("-inf"))  # [B, V]
        if params.top_p < 1.0:
            scores = _top_p_filter(scores, params.top_p)  # [B, V]
        # Gumbel-max: argmax(scores + G), G = -log(-log U), is a sample from softmax(scores).
        # (Drawing U with rand is ~5x faster on CPU than exponential_.)
        if isinstance(generator, RowStreams):
            u = generator.rand(scores.shape[1], scores.device, rows)  # [B, V] in [0, 1)
        else:
            u = torch.rand(scores.shape, generator=generator, device=scores.device)  # [B, V] in [0, 1)
        gumbel = u.log_().neg_().log_()  # [B, V] -log(-log U), in place: V is ~50k for real vocabularies
        tokens = torch.sub(scores, gumbel, out=gumbel).argmax(dim=-1)  # [B]
    return tokens, logp.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [B], [B]


def _top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of top tokens whose
    probability reaches top_p (the most likely token always survives)."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)  # [B, V] each
    probs = sorted_scores.softmax(dim=-1)  # [B, V]
    drop = probs.cumsum(dim=-1) - probs > top_p  # [B, V] mass before this token already enough
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))  # [B, V]
    return torch.empty_like(scores).scatter_(1, order, sorted_scores)  # [B, V]


class _StopStrings:
    """Per-row byte tails checked against the stop strings after every step (only built when there
    are stop strings: it costs a device-to-host copy and a little Python per step)."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str], batch: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s.encode("utf-8") for s in stop_strings]
        self.keep = max(len(s) for s in self.stops) - 1
        self.tails = [b""] * batch

    def hits(self, tokens: list[int], done: list[bool]) -> list[int]:
        """Rows (not yet done) whose text now contains a stop string."""
        out = []
        for row, tok in enumerate(tokens):
            if done[row]:
                continue
            text = self.tails[row] + self.tokenizer.token_bytes(tok)
            if any(s in text for s in self.stops):
                out.append(row)
            self.tails[row] = text[-self.keep:] if self.keep else b""
        return out

    def keep_rows(self, rows: list[int]) -> None:
        """Follow the batch when finished rows are dropped: row i becomes rows[i]."""
        self.tails = [self.tails[r] for r in rows]


class TorchSampler:
    """The plain-torch `Sampler`: batched generation with a preallocated `KVCache`.

    Args:
        model: a `Transformer` (its device and dtype are used as they are).
        tokenizer: supplies the end-of-text id and decodes stop strings; None (benchmarks) means
            no implicit end-of-text stop and no stop strings.
        use_cache: False recomputes the whole sequence every step (for tests and benchmarks).
        max_batch_size: larger prompt lists are generated in chunks of this many rows; chunk i
            uses seed + i (with one seed per prompt, each chunk takes its rows' seeds).
        frozen: the model's weights do not change between `generate` calls (evaluation, data
            generation): its packed inference weights are kept and reused across calls
            (`Transformer.fused_inference(keep=True)`, which still repacks if a weight changes).
    """

    dedupe_prompts: bool = True  # class-wide switches (tests compare both paths)
    drop_finished: bool = True

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, *, use_cache: bool = True,
                 max_batch_size: int = 64, frozen: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.use_cache = use_cache
        self.max_batch_size = max_batch_size
        self.frozen = frozen
        self._cache: KVCache | None = None

    def release(self) -> None:
        """Drop the kept KV cache and packed weights (their memory) until the next `generate`."""
        self._cache = None
        self.model.drop_fused()

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: Seed = 0) -> list[Generation]:
        """One `Generation` per prompt, in order. Prompts are lists of token ids (at least one);
        `seed` is one int, or one per prompt (see `RowStreams`)."""
        if not isinstance(seed, int) and len(seed) != len(prompts):
            raise ValueError(f"{len(seed)} seeds for {len(prompts)} prompts")
        out: list[Generation] = []
        for i, start in enumerate(range(0, len(prompts), self.max_batch_size)):
            end = start + self.max_batch_size
            chunk_seed = seed + i if isinstance(seed, int) else list(seed[start:end])
            out.extend(self._generate_batch(prompts[start:end], params, chunk_seed))
        return out

    # ---- one batch ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, seed: Seed) -> list[Generation]:
        with self.model.fused_inference(batch_size=len(prompts), keep=self.frozen):
            return self._decode(prompts, params, seed)

    def _decode(self, prompts: list[list[int]], params: SamplingParams, seed: Seed) -> list[Generation]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer")
        model, cfg = self.model, self.model.config
        device = model.tok_embeddings.weight.device
        B, P, N = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
        if P + N > cfg.max_seq_len:
            raise ValueError(f"prompt ({P}) + max_new_tokens ({N}) exceeds max_seq_len {cfg.max_seq_len}")

        tokens, key_mask, positions = _left_pad(prompts, P + N, self._pad_id(), device)  # [B, P+N] each
        padded = any(len(p) != P for p in prompts)
        streams = RowStreams([seed] * B if isinstance(seed, int) else seed, device)
        stop_ids = self._stop_ids(params, device)  # [S]
        stop_text = _StopStrings(self.tokenizer, params.stop_strings, B) if params.stop_strings else None

        # The working batch: its row i is prompt orig[i]. Once a quarter of it has finished, the
        # finished rows are stored and dropped (from the cache too), so decoding stops paying for them.
        orig = torch.arange(B, device=device)  # [b]
        done = torch.zeros(B, dtype=torch.bool, device=device)  # [b]
        length = torch.full((B,), N, dtype=torch.long, device=device)  # [b] tokens kept per row
        out_lp = torch.zeros(B, N, dtype=torch.float32, device=device)  # [b, N]
        cache = self._get_cache(B, P + N, device) if self.use_cache else None
        results: dict[int, Generation] = {}

        logits = self._prefill(prompts, tokens, key_mask, positions, padded, cache, P)  # [b, V]
        steps = 0
        for j in range(N):
            nxt, lp = sample_next(logits, params, streams, orig if len(orig) < B else None)  # [b], [b]
            tokens[:, P + j] = nxt
            out_lp[:, j] = lp
            steps = j + 1
            newly = torch.isin(nxt, stop_ids) & ~done if stop_ids.numel() else None  # [b]
            if stop_text is not None:
                hit_rows = stop_text.hits(nxt.tolist(), done.tolist())
                if hit_rows:
                    extra = torch.zeros_like(done)
                    extra[hit_rows] = True
                    newly = (extra & ~done) if newly is None else (newly | (extra & ~done))
            if newly is not None:
                length = torch.where(newly, j + 1, length)  # [b]
                done |= newly
                n_done = int(done.sum())
                if n_done == len(done):
                    break
                if self.drop_finished and j + 1 < N and 4 * n_done >= len(done):
                    fin = done.nonzero().squeeze(1)  # [b - b']
                    self._store(results, prompts, orig[fin], tokens[fin, P:P + steps], out_lp[fin, :steps],
                                length[fin], done[fin])
                    keep = (~done).nonzero().squeeze(1)  # [b'] ascending
                    tokens, key_mask, positions = tokens[keep], key_mask[keep], positions[keep]
                    orig, out_lp, length, done = orig[keep], out_lp[keep], length[keep], done[keep]
                    if cache is not None:
                        cache.keep_rows(keep)
                    if stop_text is not None:
                        stop_text.keep_rows(keep.tolist())
            if j + 1 < N:
                logits = self._next_logits(tokens, key_mask, positions, padded, cache, P + j, P + j + 1)
        self._store(results, prompts, orig, tokens[:, P:P + steps], out_lp[:, :steps], length, done)
        return [results[row] for row in range(B)]

    def _prefill(self, prompts: list[list[int]], tokens: Tensor, key_mask: Tensor, positions: Tensor, padded: bool,
                 cache: KVCache | None, P: int) -> Tensor:
        """Logits [B, V] after every prompt, each distinct prompt computed once: GRPO's G samples of
        a prompt and evaluation's k samples share a prompt, whose keys/values are copied into each
        of its rows (for SmolLM2 under a chat template the prompts are most of a step's prefill)."""
        distinct: dict[tuple[int, ...], int] = {}
        first_rows: list[int] = []  # the first row of each distinct prompt
        src = []  # row -> its distinct prompt
        for row, p in enumerate(prompts):
            u = distinct.setdefault(tuple(p), len(distinct))
            if u == len(first_rows):
                first_rows.append(row)
            src.append(u)
        if cache is None or not self.dedupe_prompts or len(first_rows) == len(prompts):
            return self._next_logits(tokens, key_mask, positions, padded, cache, 0, P)
        inv = torch.tensor(src, device=tokens.device)  # [B]
        rows = torch.tensor(first_rows, device=tokens.device)  # [U]
        cfg = self.model.config
        part = KVCache.for_model(cfg, len(rows), P, dtype=cache.k.dtype, device=cache.k.device)
        logits = self._next_logits(tokens[rows], key_mask[rows], positions[rows], padded, part, 0, P)  # [U, V]
        cache.k[:, :, :, :P] = part.k[:, inv]  # [L, B, Hkv, P, hd]
        cache.v[:, :, :, :P] = part.v[:, inv]
        cache.advance(P)
        return logits[inv]  # [B, V]

    def _next_logits(self, tokens: Tensor, key_mask: Tensor, positions: Tensor, padded: bool,
                     cache: KVCache | None, start: int, end: int) -> Tensor:
        """Logits [B, V] after column end-1: with the cache the model sees columns start..end-1,
        without it the whole prefix 0..end-1."""
        if cache is None:
            start = 0
        km = key_mask[:, :end] if padded else None  # [B, end]
        pos = positions[:, start:end] if padded else None  # [B, end-start]
        h = self.model(tokens[:, start:end], positions=pos, key_mask=km, cache=cache,
                       return_hidden=True)  # [B, end-start, D]
        return self.model.logits(h[:, -1])  # [B, V]

    @staticmethod
    def _store(results: dict[int, Generation], prompts: list[list[int]], orig: Tensor, new: Tensor, lp: Tensor,
               length: Tensor, done: Tensor) -> None:
        """Record the `Generation` of each given row under its prompt's index `orig` ([r]): its first
        `length` tokens of `new` ([r, steps]) and their log-probs (`lp` [r, steps])."""
        for i, n, toks, lps, stopped in zip(orig.tolist(), length.tolist(), new.tolist(), lp.tolist(), done.tolist()):
            results[i] = Generation(prompt_ids=list(prompts[i]), token_ids=toks[:n], logprobs=lps[:n],
                                    finish_reason="stop" if stopped else "length")

    def _get_cache(self, batch: int, max_len: int, device: torch.device) -> KVCache:
        """Reuse the last cache when the batch fits in it; allocate otherwise."""
        dtype = self.model.tok_embeddings.weight.dtype
        c = self._cache
        if (c is None or c.batch_size != batch or c.max_len < max_len or c.k.dtype != dtype
                or c.k.device != device or c.k.shape[0] != self.model.config.n_layers):
            c = KVCache.for_model(self.model.config, batch, max_len, dtype=dtype, device=device)
            self._cache = c
        c.reset()
        return c

    def _pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer is not None else 0

    def _stop_ids(self, params: SamplingParams, device: torch.device) -> Tensor:
        ids = set(params.stop_token_ids)
        if self.tokenizer is not None:
            ids.add(self.tokenizer.eos_id)
        return torch.tensor(sorted(ids), dtype=torch.long, device=device)  # [S]


def _left_pad(prompts: list[list[int]], width: int, pad_id: int,
              device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Token buffer, key mask and rotary positions for left-padded prompts in `width` columns.

    Returns tokens [B, width] (pads, then the prompt ending at column P-1, then room for new
    tokens), key_mask [B, width] (False on the left pads), positions [B, width] (0 at each row's
    first real token; 0 on pads, which nothing attends to).
    """
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, width), pad_id, dtype=torch.long)  # [B, W]
    key_mask = torch.ones(B, width, dtype=torch.bool)  # [B, W]
    for row, p in enumerate(prompts):
        tokens[row, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        key_mask[row, :P - len(p)] = False
    positions = (key_mask.long().cumsum(dim=1) - 1).clamp_(min=0)  # [B, W]
    return tokens.to(device), key_mask.to(device), positions.to(device)
