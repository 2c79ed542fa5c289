"""Shared components of next-token training: the `base`, `sft` and `distill` stages build on them.

The three stages share one loop, `train_loop` (so their resume, logging and evaluation rules
agree); each keeps its own data, loss and model set-up. This module holds what they share:

- Tokenisation into `Example`s: a token sequence plus a loss mask. Raw documents (pretraining)
  carry loss on every token; (prompt, completion) pairs carry it on the completion and the final
  end-of-text only, as in SFT since InstructGPT (Ouyang et al. 2022) and R1's SFT stages.
- Batching: length buckets (right-padded rows, each sequence starting at position 0 exactly as at
  sampling time) or packing (documents concatenated into fixed windows, GPT-2 style, for corpora
  whose documents outrun the window). Which rows form micro-batch m is a pure function of
  (seed, m), so a resumed run sees the same data as an uninterrupted one.
- The loss: token-level cross-entropy (`lm.logprobs.token_logprobs`, which projects only target
  rows onto the vocabulary) summed over masked targets and divided by the number of target tokens
  in the whole optimizer step, so k micro-batches of accumulation equal one batch k times larger.
  The token-level distillation term (Hinton et al. 2015) lives here too.
- The step (accumulate, clip, non-finite guard, update; `lm.train` supplies the optimizer, the
  schedule and the guard), the validation loss, metrics rows (`stages.metrics.METRICS_SCHEMA`),
  and resume state in `ctx.run_dir` (`lm.checkpoint.save_resume`, the helper GRPO uses too).

Right padding needs no attention mask: under a causal mask no real token can see a pad that
follows it, so the model's `is_causal` fast path applies and pads only need masking in the loss.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from artifacts.store import open_parquet, read_table
from lm import distributed
from lm.checkpoint import load_resume as load_resume_state
from lm.checkpoint import save_resume as save_resume_state
from lm.chat_template import r1_system_prompt
from lm.logprobs import sequence_hidden, token_logprobs
from lm.model import MODEL_PRESETS, Transformer
from lm.tokenizer import ANSWER, ANSWER_END, IM_END, IM_START, THINK, THINK_END, Tokenizer
from lm.train import autocast_context, check_finite, clip_grad, lr_at, set_lr
from stages.context import StageContext
from stages.metrics import METRICS_FIELDS

# The format tags a model writes as single special ids; other special-token strings found in data
# (e.g. a literal "<|endoftext|>" in a model's output) stay plain text so data cannot inject control
# tokens such as end-of-text or pad.
FORMAT_TAGS: tuple[str, ...] = (THINK, THINK_END, ANSWER, ANSWER_END)
# Chat-turn markers, single ids in a prompt rendered with a model's chat template ("chat").
CHAT_MARKERS: tuple[str, ...] = (IM_START, IM_END)
_TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in FORMAT_TAGS) + ")")
_PROMPT_RE = re.compile("(" + "|".join(re.escape(t) for t in (*CHAT_MARKERS, *FORMAT_TAGS)) + ")")


# --------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass(frozen=True)
class Example:
    """One training sequence. `loss_mask[i]` is 1 when token i is a prediction target (predicted from
    tokens < i); the first token is never a target."""

    ids: np.ndarray  # [T] int64
    loss_mask: np.ndarray  # [T] bool
    group: str = ""  # rows of one group (e.g. samples of one prompt) stay on one side of a split

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return int(self.loss_mask[1:].sum())


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, with the think/answer tags as the single ids the model samples.

    Why not `tok.encode(text, allow_special=True)`: that would also turn "<|endoftext|>" or
    "<|pad|>" written inside a completion into control ids. A tokenizer whose vocabulary has no such
    tag (a foreign model's) encodes it as ordinary text.
    """
    return _encode_with(tok, text, _TAG_RE)


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt: like `encode_text`, plus the chat-turn markers
    ("<|im_start|>", "<|im_end|>") as single ids, as a chat model (SmolLM2-Instruct) was trained to
    read them. Prompts come from a template and the user's problems, not from a model, so the only
    control tokens they can carry this way are turn markers; end-of-text and pad stay text.
    """
    return _encode_with(tok, prompt, _PROMPT_RE)


def _encode_with(tok: Tokenizer, text: str, specials: re.Pattern[str]) -> list[int]:
    ids: list[int] = []
    for i, piece in enumerate(specials.split(text)):
        if i % 2 == 1 and piece in tok.special_tokens:
            ids.append(tok.special_tokens[piece])
        elif piece:
            ids.extend(tok.encode(piece, allow_special=False))
    return ids


@dataclass
class TokenizeReport:
    """What tokenisation did to the rows: kept, truncated, dropped (and why)."""

    kept: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    dropped_prompt_too_long: int = 0


def render_prompts(tok: Tokenizer, prompts: Sequence[str | list[dict[str, str]]], template: str | None) -> list[str]:
    """The prompt text the model sees, rendered as `stages.sampling.encode_prompts` does at sampling
    time (template None: the prompts are already rendered). A prompt is a question or chat messages.
    An empty question stays empty (rendering would hide the fault) so that tokenisation drops and
    counts it."""
    if template is None:
        return [p if isinstance(p, str) else "" for p in prompts]
    return [tok.render_prompt(p, template) if not isinstance(p, str) or p.strip() else "" for p in prompts]


def file_prompts(path: Path, text: list[str], template: str | None) -> list[str | list[dict[str, str]]]:
    """The prompts of r1flow's own SFT/preference file as the sampler rendered them: the question
    (`prompt_text`), or the chat messages (`prompt`) when the problem had more than its question
    (a system turn of its own, `problems.few_shot` examples, earlier turns of a user's chat data).
    The system turn holding R1-Zero's instruction that the export adds is left to the template,
    which adds it back as it did at sampling time."""
    names = open_parquet(path).schema_arrow.names
    if template is None or "prompt_text" not in names or "prompt" not in names:
        return list(text)
    column = read_table(path, None, columns=["prompt"]).column("prompt").to_pylist()
    out: list[str | list[dict[str, str]]] = []
    for question, messages in zip(text, column):
        if not isinstance(messages, list) or not messages:
            out.append(question)
            continue
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        if turns[0]["role"] == "system" and turns[0]["content"] == r1_system_prompt():
            turns = turns[1:]  # the template brings it back (`r1_zero` in its text, `chat` as that turn)
        only_question = len(turns) == 1 and turns[0]["role"] == "user" and turns[0]["content"].strip() == question.strip()
        out.append(question if only_question else turns)
    return out


def tokenize_documents(tok: Tokenizer, texts: Iterable[str], max_len: int | None,
                       loss_after: str | None = None) -> tuple[list[Example], TokenizeReport]:
    """Raw documents for pretraining: `text + <eos>`, loss on every token, or only after a marker.

    Args:
        texts: documents (empty ones are dropped and counted).
        max_len: truncate each document to this many tokens (None: keep whole, for packing).
        loss_after: if set, a document containing this marker is encoded as two pieces, up to and
            including the marker's first occurrence, then the rest (as a sampler sees a prompt and
            its completion), and only the rest (and <eos>) carries loss. Documents without it keep
            loss on every token.
    """
    report, out = TokenizeReport(), []
    for text in texts:
        if not text or not text.strip():
            report.dropped_empty += 1
            continue
        cut = text.find(loss_after) if loss_after else -1
        if cut >= 0:
            head = encode_text(tok, text[:cut + len(loss_after)])
            ids = head + encode_text(tok, text[cut + len(loss_after):]) + [tok.eos_id]
        else:
            head, ids = [], encode_text(tok, text) + [tok.eos_id]
        mask = np.ones(len(ids), dtype=bool)
        mask[:len(head)] = False
        if max_len is not None and len(ids) > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            report.truncated += 1
        out.append(Example(np.asarray(ids, dtype=np.int64), mask))
        report.kept += 1
    return out, report


def tokenize_pairs(tok: Tokenizer, prompts: Sequence[str], completions: Sequence[str],
                   max_len: int) -> tuple[list[Example], TokenizeReport]:
    """(prompt, completion) pairs for SFT: `prompt + completion + <eos>`, loss on completion + eos.
    Each example's `group` is its prompt.

    Prompt and completion are encoded separately, as the sampler sees them (the prompt's ids, then
    the ids the model wrote), so the boundary token is the one the model must produce. The prompt
    goes through `encode_prompt` (chat-turn markers as ids), the completion through `encode_text`. A completion
    that overruns `max_len` is cut (it still teaches its prefix); a prompt that leaves no room for a
    single completion token is dropped.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    report, out = TokenizeReport(), []
    for prompt, completion in zip(prompts, completions):
        if not prompt or not prompt.strip() or not completion or not completion.strip():
            report.dropped_empty += 1
            continue
        p = encode_prompt(tok, prompt)
        c = encode_text(tok, completion) + [tok.eos_id]
        if len(p) >= max_len:
            report.dropped_prompt_too_long += 1
            continue
        if len(p) + len(c) > max_len:
            c = c[: max_len - len(p)]
            report.truncated += 1
        ids = np.asarray(p + c, dtype=np.int64)
        mask = np.concatenate([np.zeros(len(p), dtype=bool), np.ones(len(c), dtype=bool)])
        out.append(Example(ids, mask, prompt))
        report.kept += 1
    return out, report


def pack(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Concatenate examples (each already ending in eos) and cut the stream into `seq_len` windows.

    GPT-2/nanoGPT-style packing: attention crosses document boundaries inside a window, which the
    eos separator makes learnable. The ragged tail shorter than a window is dropped.
    """
    if not examples:
        return []
    ids = np.concatenate([e.ids for e in examples])  # [N]
    mask = np.concatenate([e.loss_mask for e in examples])  # [N]
    n = len(ids) // seq_len
    return [Example(ids[i * seq_len:(i + 1) * seq_len], mask[i * seq_len:(i + 1) * seq_len]) for i in range(n)]


def split_holdout(n: int, fraction: float, max_items: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic (train, validation) split of range(n): `fraction` of the rows, at most
    `max_items`, and never all of them (at least one row stays for training when n >= 2)."""
    perm = np.random.default_rng(seed).permutation(n)
    k = _holdout_size(n, fraction, max_items)
    return np.sort(perm[k:]), np.sort(perm[:k])


def split_by_group(groups: Sequence[str], fraction: float, max_items: int | None,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Like `split_holdout`, but rows sharing a group (e.g. two kept samples of one prompt) land on
    the same side, so the validation loss measures unseen prompts, not a sibling's memorised twin.

    Whole groups, in a seeded order, join the validation side while it holds fewer rows than
    `split_holdout` would give it; at least one group stays for training.
    """
    n = len(groups)
    k = _holdout_size(n, fraction, max_items)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(members)
    val: list[int] = []
    for j in np.random.default_rng(seed).permutation(len(keys))[:max(len(keys) - 1, 0)]:
        if len(val) >= k:
            break
        val.extend(members[keys[j]])
    held = set(val)
    return np.array([i for i in range(n) if i not in held], dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def _holdout_size(n: int, fraction: float, max_items: int | None) -> int:
    k = int(round(n * fraction))
    if max_items is not None:
        k = min(k, max_items)
    return min(k, max(n - 1, 0))


# --------------------------------------------------------------------------------------------------
# Batching


@dataclass
class Batch:
    """A right-padded micro-batch in the layout `lm.logprobs.token_logprobs` takes (unshifted)."""

    ids: Tensor  # [B, T] token ids, pad after each row's end
    attention: Tensor  # [B, T] bool, True on real tokens
    loss_mask: Tensor  # [B, T] bool, True on tokens that are prediction targets

    @property
    def n_targets(self) -> int:
        return int(self.loss_mask[:, 1:].sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention.sum())

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.ids.to(device), self.attention.to(device), self.loss_mask.to(device))


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad `examples` to the longest one."""
    T = max(len(e) for e in examples)
    ids = np.full((len(examples), T), pad_id, dtype=np.int64)  # [B, T]
    attention = np.zeros((len(examples), T), dtype=bool)  # [B, T]
    loss_mask = np.zeros((len(examples), T), dtype=bool)  # [B, T]
    for r, e in enumerate(examples):
        ids[r, :len(e)] = e.ids
        attention[r, :len(e)] = True
        loss_mask[r, :len(e)] = e.loss_mask
    loss_mask[:, 0] = False  # nothing predicts the first token
    return Batch(torch.from_numpy(ids), torch.from_numpy(attention), torch.from_numpy(loss_mask))


class BatchPlan:
    """Which examples form micro-batch m, for any m, as a pure function of (seed, m).

    Each epoch shuffles the examples, sorts them by length inside pools of `pool` batches (so the
    rows of a batch have similar lengths and little padding, as torchtext's BucketIterator does),
    cuts batches and shuffles their order. Every epoch has the same number of batches
    (`batches_per_epoch`; the last may be smaller), so micro-batch m lives in epoch
    m // batches_per_epoch. Nothing depends on what came before: resuming at step s needs only s.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, *, pool: int = 8) -> None:
        if len(lengths) == 0:
            raise ValueError("no training examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.pool = pool
        self.batches_per_epoch = math.ceil(len(self.lengths) / batch_size)
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        span = self.batch_size * self.pool
        pools = [order[i:i + span] for i in range(0, len(order), span)]
        order = np.concatenate([p[np.argsort(self.lengths[p], kind="stable")] for p in pools])
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def micro_batch(self, m: int) -> np.ndarray:
        """Indices of the examples in global micro-batch m."""
        epoch, i = divmod(m, self.batches_per_epoch)
        return self.epoch_batches(epoch)[i]

    def step(self, step: int, grad_accum: int) -> list[np.ndarray]:
        """Example indices of each micro-batch of optimizer step `step`."""
        return [self.micro_batch(step * grad_accum + j) for j in range(grad_accum)]


def steps_for_epochs(n_examples: int, batch_size: int, grad_accum: int, epochs: float) -> int:
    """Optimizer steps that cover `epochs` passes over `n_examples` (at least one)."""
    micro = math.ceil(n_examples / batch_size) * epochs
    return max(1, math.ceil(micro / grad_accum))


def fixed_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> list[Batch]:
    """Examples in length order cut into batches, for validation (where order does not matter)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    return [collate([examples[i] for i in order[j:j + batch_size]], pad_id)
            for j in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------------
# Losses

# A loss function maps (model, batch) to the loss summed over the batch's target tokens.
LossFn = Callable[[Transformer, Batch], Tensor]


def lm_loss_sum(model: Transformer, batch: Batch) -> Tensor:
    """Next-token cross-entropy summed over the batch's target tokens: -sum log p(target).

    Computed with `lm.logprobs.token_logprobs`, which projects only the rows that predict a target
    onto the vocabulary (the prompt rows of an SFT batch cost nothing there, and a 49k vocabulary
    never materialises [B, T, V]). The caller divides by the step's target count.
    """
    logp = token_logprobs(model, batch.ids, batch.attention, batch.loss_mask)  # [B, T], 0 off-target
    return -logp.sum()


def distill_loss_sum(student: Transformer, teacher: Transformer, batch: Batch, *, kd_weight: float,
                     temperature: float) -> Tensor:
    """Cross-entropy on the teacher's sampled tokens plus kd_weight x token-level KD, summed.

    Sequence-level distillation (Kim & Rush 2016; R1's distillation, sec. 2.4) is the
    cross-entropy term: SFT on the teacher's outputs. The token-level term is Hinton et al.'s
    (2015) soft-target loss, KL(p_teacher^T || p_student^T) * T^2 at each target position: the
    T^2 keeps its gradient scale independent of T. It needs one vocabulary for both models and,
    when on, projects all target rows at once ([N, V] for each model): fine for the small
    vocabularies it runs with on a CPU, to be chunked like `token_logprobs` for 50k vocabularies.
    """
    if kd_weight == 0:
        return lm_loss_sum(student, batch)  # chunked: no [N, V] tensor at all
    score = batch.loss_mask.clone()  # [B, T]
    score[:, 0] = False
    rows = score[:, 1:]  # [B, T-1] positions t whose next token is a target
    targets = batch.ids[:, 1:][rows]  # [N]
    h_s = sequence_hidden(student, batch.ids, batch.attention)[:, :-1][rows]  # [N, D_s]
    logits_s = student.logits(h_s).float()  # [N, V]
    ce = F.cross_entropy(logits_s, targets, reduction="sum")
    with torch.no_grad():
        h_t = sequence_hidden(teacher, batch.ids, batch.attention)[:, :-1][rows]  # [N, D_t]
        logits_t = teacher.logits(h_t).float()  # [N, V]
    return ce + kd_weight * kd_kl_sum(logits_s, logits_t, temperature)


def kd_kl_sum(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """sum over rows of KL(softmax(teacher/T) || softmax(student/T)) * T^2 (Hinton et al. 2015).

    Args:
        student_logits, teacher_logits: [N, V] over the same vocabulary.
        temperature: T > 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: token-level KD needs one vocabulary")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [N, V]
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [N, V]
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [N]
    return kl.sum() * temperature ** 2


# --------------------------------------------------------------------------------------------------
# The step and validation


@dataclass
class StepStats:
    loss: float  # mean loss per target token over the whole step
    grad_norm: float  # before clipping
    tokens: int  # real tokens processed (prompt tokens included)
    targets: int  # tokens that carried loss


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[Batch],
                   loss_fn: LossFn, *, clip: float, autocast: bool, device: str, step: int,
                   weights: Sequence[float] | None = None) -> StepStats:
    """One optimizer step over `batches` (its micro-batches): accumulate, clip, guard, update.

    Each micro-batch's summed loss is divided by the target count of the whole step, so the
    accumulated gradient is that of the per-token mean over every micro-batch: exactly the
    gradient of one batch holding them all (unlike averaging per-micro-batch means, which weights
    short micro-batches up). A NaN/inf loss or gradient norm raises `NonFiniteError` before the
    update, so no bad step reaches the weights or a resume checkpoint.

    `model` is a bare model or a `lm.distributed.Trainable`'s module (DDP or FSDP2 under several
    ranks). There `batches` are this rank's shares of the step's micro-batches: the target count
    is summed over ranks and each loss multiplied by the world size, so the ranks' averaged
    gradient is the single-process gradient (up to float reduction order). `weights` (1 or 0 per
    micro-batch) zero a placeholder micro-batch that a rank runs only so that every rank takes
    part in each gradient reduction.
    """
    module = distributed.as_loss_module(model)
    weights = list(weights) if weights is not None else [1.0] * len(batches)
    n_targets = int(distributed.all_reduce_sum(float(sum(b.n_targets for b, w in zip(batches, weights) if w))))
    if n_targets == 0:
        raise ValueError(f"step {step}: no target tokens in the batch")
    world = distributed.world_size()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for j, (batch, w) in enumerate(zip(batches, weights)):
        with distributed.grad_sync(module, j == len(batches) - 1), \
                autocast_context(device, "bf16" if autocast else "fp32"):
            loss = module(loss_fn, batch.to(device)) * (w * world / n_targets)
        loss.backward()
        total += float(loss.detach()) / world
    total = distributed.all_reduce_sum(total)
    check_finite("loss", total, step)
    grad_norm = clip_grad(module, clip)
    check_finite("grad_norm", grad_norm, step)
    optimizer.step()
    tokens = int(distributed.all_reduce_sum(float(sum(b.n_tokens for b, w in zip(batches, weights) if w))))
    return StepStats(total, grad_norm, tokens, n_targets)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Sequence[Batch], *, autocast: bool, device: str) -> float:
    """Mean loss per target token over `batches` (NaN when there are none); under several ranks
    each takes every W-th batch and the sums are added. `model`: a bare model or a `Trainable`'s
    module; a sharded one needs every rank in each forward, so a rank out of batches runs a
    placeholder at weight 0 while the others finish theirs."""
    module = distributed.unwrap(distributed.as_loss_module(model))  # DDP: its inner LossModule
    mine = distributed.shard(batches)
    rounds = -(-len(batches) // distributed.world_size()) if distributed.is_sharded(module) else len(mine)
    total, n = 0.0, 0
    was_training = module.training
    module.eval()
    for i in range(rounds):
        batch, w = (mine[i], 1) if i < len(mine) else (batches[0], 0)
        with autocast_context(device, "bf16" if autocast else "fp32"):
            total += w * float(module(lm_loss_sum, batch.to(device)))
        n += w * batch.n_targets
    module.train(was_training)
    total, n = distributed.all_reduce_sum([total, float(n)])
    return total / n if n else float("nan")


def rank_micro_batches(examples: Sequence[Example], step_batches: Sequence[np.ndarray],
                       pad_id: int) -> tuple[list[Batch], list[float]]:
    """This rank's share of each micro-batch of a step (round-robin rows: a distributed sampler
    over the single-process batch plan), and a weight per micro-batch.

    The global batch stays the one a single process trains on; each rank sees batch / world rows.
    A rank whose share of a micro-batch is empty (fewer rows than ranks) gets the micro-batch's
    first row at weight 0, so it still joins the gradient reduction with a zero contribution.
    """
    batches, weights = [], []
    for idx in step_batches:
        mine = distributed.shard(list(idx))
        batches.append(collate([examples[i] for i in (mine or list(idx[:1]))], pad_id))
        weights.append(1.0 if mine else 0.0)
    return batches, weights


# --------------------------------------------------------------------------------------------------
# Models, metrics, resume


def new_model(preset: str, vocab_size: int, seed: int) -> Transformer:
    """A freshly initialised `Transformer` of an lm preset, its vocabulary the tokenizer's size,
    its weights a function of `seed` alone."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; the presets are: {', '.join(MODEL_PRESETS)}")
    torch.manual_seed(seed)
    return Transformer(dataclasses.replace(MODEL_PRESETS[preset], vocab_size=vocab_size))


def lr_schedule(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Peak `lr` times `lm.train.lr_at`: linear warmup, then cosine decay to min_ratio * lr."""
    return lr * lr_at(step, warmup, total, min_ratio)


@dataclass
class Metrics:
    """Rows of (step, name, value), kept as plain data so they travel in the resume state."""

    rows: list[dict] = field(default_factory=list)

    def add(self, step: int, **values: float) -> None:
        self.rows.extend({"step": int(step), "name": k, "value": float(v)} for k, v in values.items())

    def last(self, name: str) -> float | None:
        return next((r["value"] for r in reversed(self.rows) if r["name"] == name), None)

    def tail_mean(self, name: str, n: int) -> float | None:
        """Mean of the last n values of `name` (a smoothed "final" loss)."""
        vals = [r["value"] for r in self.rows if r["name"] == name][-n:]
        return sum(vals) / len(vals) if vals else None

    def table(self, **constant_columns: str) -> pa.Table:
        """A Parquet-ready table; `constant_columns` (e.g. student="tiny-student") go first."""
        schema = pa.schema([pa.field(k, pa.string(), nullable=False) for k in constant_columns] + METRICS_FIELDS)
        rows = [{**constant_columns, **r} for r in self.rows]
        return pa.Table.from_pylist(rows, schema=schema)


def save_resume(directory: Path, model: Transformer, optimizer: torch.optim.Optimizer, step: int,
                metrics: Metrics) -> None:
    """`lm.checkpoint.save_resume` with the metric rows so far as the loop's extra state."""
    save_resume_state(directory, model, optimizer, step, {"metrics": metrics.rows})


def load_resume(directory: Path | None, model: Transformer,
                optimizer: torch.optim.Optimizer) -> tuple[int, Metrics] | None:
    """(steps already done, metrics so far) from `lm.checkpoint.load_resume`; None: a fresh start."""
    resumed = load_resume_state(directory, model, optimizer)
    if resumed is None:
        return None
    step, extra = resumed
    return step, Metrics(list(extra.get("metrics", [])))


def resume_dir(ctx: StageContext, name: str) -> Path | None:
    """Where one training run of a stage keeps its resume state (None: the context has no run_dir)."""
    return None if ctx.run_dir is None else Path(ctx.run_dir) / name


def start_or_resume(ctx: StageContext, name: str, model: Transformer, optimizer: torch.optim.Optimizer,
                    steps: int, label: str) -> tuple[Path | None, int, Metrics]:
    """(resume directory, steps already done, metrics so far) for one training run: restored
    from `resume_dir(ctx, name)` when an interrupted run left a state there, else a fresh start."""
    state_dir = resume_dir(ctx, name)
    resumed = load_resume(state_dir, model, optimizer)
    start, metrics = resumed if resumed is not None else (0, Metrics())
    if start:
        ctx.log(f"{label}: resuming at step {start}/{steps}")
    return state_dir, start, metrics


class LoopConfig(Protocol):
    """The config fields `train_loop` reads (base, sft and distill Configs all have them)."""

    lr: float
    warmup_steps: int
    min_lr_ratio: float
    grad_accum: int
    clip: float
    autocast: bool
    log_every: int
    checkpoint_every: int


def train_loop(model: Transformer, optimizer: torch.optim.Optimizer, examples: Sequence[Example], plan: BatchPlan,
               loss_fn: LossFn, cfg: LoopConfig, *, steps: int, start: int, metrics: Metrics, pad_id: int,
               val_batches: Sequence[Batch], device: str, ctx: StageContext, label: str,
               state_dir: Path | None, eval_every: int | None = None, data_offset: int = 0) -> Metrics:
    """Steps `start`..`steps`-1 of warmup + cosine AdamW over `plan`'s batches of `examples`.

    Each step records loss, lr, grad_norm, tokens_per_s and tokens in `metrics`; the validation
    loss is added every `eval_every` steps (None: only at the end) and after the last step; a log
    line every `log_every` steps; the resume state is saved every `checkpoint_every` steps and
    after the last. Each step's scalars go to `ctx.track`, and the rows so far to
    `ctx.flush_metrics` every `log_every` steps (live metrics). `data_offset` shifts the batch
    plan (a phase continuing data an earlier phase consumed). The base, sft and distill stages share it, so their resume and logging rules agree.
    """
    trainable = distributed.prepare_training(model, optimizer, shard=ctx.shard == "fsdp")
    if trainable.sharded:
        ctx.log(f"{label}: weights, gradients and optimizer state sharded over {distributed.world_size()} ranks (FSDP2)")
    for step in ctx.progress(range(start, steps), desc=label, total=steps - start):
        lr = lr_schedule(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=steps, min_ratio=cfg.min_lr_ratio)
        set_lr(trainable.optimizer, lr)
        batches, weights = rank_micro_batches(examples, plan.step(data_offset + step, cfg.grad_accum), pad_id)
        t = time.perf_counter()
        stats = optimizer_step(trainable.module, trainable.optimizer, batches, loss_fn, clip=cfg.clip,
                               autocast=cfg.autocast, device=device, step=step, weights=weights)
        scalars = dict(loss=stats.loss, lr=lr, grad_norm=stats.grad_norm,
                       tokens_per_s=stats.tokens / (time.perf_counter() - t), tokens=stats.tokens)
        metrics.add(step, **scalars)
        if distributed.is_main():
            ctx.track(step, scalars)
        done = step + 1
        if val_batches and (done == steps or (eval_every is not None and done % eval_every == 0)):
            val = validation_loss(trainable.module, val_batches, autocast=cfg.autocast, device=device)
            metrics.add(done, val_loss=val)
            if distributed.is_main():
                ctx.track(done, {"val_loss": val})
        if done % cfg.log_every == 0:
            ctx.log(f"{label}: step {done}/{steps} loss {metrics.tail_mean('loss', cfg.log_every):.4f} lr {lr:.2e}")
            if distributed.is_main():
                ctx.flush_metrics(metrics.table())
        if state_dir is not None and (done % cfg.checkpoint_every == 0 or done == steps):
            trainable.sync_to(model, optimizer)  # sharded: gather the full state (every rank takes part)
            if distributed.is_main():
                save_resume(state_dir, model, optimizer, done, metrics)  # ranks hold equal weights: rank 0 saves
    trainable.sync_to(model, optimizer)  # the caller's model leaves with the trained weights
    return metrics


# --------------------------------------------------------------------------------------------------
# Reading training data


def read_text_columns(path: Path, columns: Sequence[str], what: str) -> dict[str, list[str]]:
    """String columns of a Parquet file, with errors that say which file and what is wrong.

    Raises:
        ArtifactError: the file is missing, not Parquet, or lacks a column (or has it mistyped).
        ValueError: the file has no rows (`what` names the stage input, for the message).
    """
    schema = pa.schema([pa.field(c, pa.string()) for c in columns])
    table = read_table(path, schema, columns=list(columns))
    if table.num_rows == 0:
        raise ValueError(f"{path} has no rows: {what} needs at least one")
    return {c: [v if v is not None else "" for v in table.column(c).to_pylist()] for c in columns}


def plain_text_columns(path: Path, columns: Sequence[str]) -> list[str]:
    """The names under which a Parquet file holds `columns` as plain strings: r1flow's own SFT and
    preference files keep them as `<name>_text` (their `<name>` columns are TRL's chat messages);
    other files have them as `<name>`."""
    names = open_parquet(path).schema_arrow.names if Path(path).is_file() else []
    return [f"{c}_text" if f"{c}_text" in names else c for c in columns]


def read_pairs(path: Path, tok: Tokenizer, template: str | None, seq_len: int,
               what: str) -> tuple[list[Example], TokenizeReport]:
    """The (prompt, completion) rows of a Parquet file as training examples (prompts rendered with
    `template`), with errors that name the file: missing columns, no rows, no usable row.

    r1flow's own SFT files keep the plain strings in `prompt_text`/`completion_text` (their
    `prompt`/`completion` are TRL's chat messages); other files have them as `prompt`/`completion`.
    """
    p, c = plain_text_columns(path, ("prompt", "completion"))
    cols = read_text_columns(path, [p, c], what)
    prompts = render_prompts(tok, file_prompts(path, cols[p], template), template)
    examples, report = tokenize_pairs(tok, prompts, cols[c], seq_len)
    if not examples:
        raise ValueError(f"{path}: none of its {len(prompts)} rows is usable for {what} ({report})")
    return examples, report
