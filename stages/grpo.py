"""The GRPO training loop shared by the `rl_zero` and `rl_reasoning` stages.

Where from: Group Relative Policy Optimization, DeepSeekMath (Shao et al. 2024, §4.1, Algorithm 1)
as used by DeepSeek-R1 (2025, §2.2.1): for each step take P prompts, sample G completions each
with the current ("old") policy, score them with rule-based rewards, turn the rewards into
group-relative advantages, then run μ optimisation passes over the batch (in mini-batches) on the
clipped surrogate plus β·KL to a frozen reference model. The loss pieces live in
`stages/grpo_loss.py`; options from later papers are named there (clip-higher, token-mean,
dynamic sampling and overlong masking from DAPO; no-std advantages and the constant normaliser
from Dr. GRPO).

How a step runs (and why it is fast on a CPU):
- Generation uses `lm.sampler.TorchSampler` (KV cache, left-padded prompts). The sampler records
  each token's log-prob under the sampling policy at temperature 1, which *are* the old-policy
  log-probs: no extra forward pass. With μ = 1 and one mini-batch the policy has not moved when
  the loss is taken, so the ratio is exactly 1 and the loss uses `logp.detach()` as old log-probs
  (TRL does the same); the sampler's are used only when μ > 1 or there are several mini-batches.
- The G completions of a prompt share it, so the training and reference forwards compute each
  prompt once and let the completions attend to its keys/values (`lm.logprobs.completion_logprobs`,
  the same `Transformer.forward` with a shared-prefix `Cache`); only completion rows are projected onto the
  vocabulary. This is `lm.logprobs.token_logprobs` over the concatenated sequences, minus the
  repeated prompt work (22% less at the benchmark's shape).
- The reference model (a frozen copy of the initial policy) runs under `inference_mode` and, in
  fp32, `Transformer.fused_inference` (pre-packed oneDNN weights); with β = 0 it is never built.
- Dynamic sampling (DAPO §3.2): groups whose rewards are all equal carry no advantage; with the
  option on they are dropped and replaced by groups of fresh prompts, up to `max_sampling_rounds`.

Precision: generation runs in fp32 (the master weights); the training and reference forwards run
under bf16 autocast when `autocast` is on and the device does bf16 natively (1.45x faster on the
reference CPU for the base stage). Then the sampler's fp32 log-probs would differ from the
training forward's by bf16 rounding, so with μ > 1 the old log-probs are recomputed by one no-grad
forward instead. In fp32 on a CPU, matmuls go to oneDNN when it is fp32-exact (`lm.train.fast_fp32_matmul`).

Objective variants (`policy_loss`, `advantage`, `tis_cap`) are the named functions of
`stages/grpo_loss.py`; the loop only picks them by name. With `tis_cap` each token's loss is weighted
by min(π_old_train / π_sampler, cap) (truncated importance sampling); on one CPU in fp32 the two agree
to rounding, so the logged `tis_weight` stays ~1 — the option matters with bf16 or another engine.

Departure: the entropy metric is the sample estimate −mean log π(o_t) over the sampled tokens (the
exact entropy needs the full vocabulary distribution at every position).

Determinism and resume: every random draw is a pure function of (seed, stage, step): the prompt
order (`PromptStream`, whose only state is a cursor), the sampling seed, the mini-batch shuffle.
Every `checkpoint_every` steps the policy, optimizer, step, cursor and the rollout/metric rows so
far are written atomically to `ctx.run_dir/grpo_resume`; a restarted run continues from there and
ends with the same weights and the same Parquet files as an uninterrupted one.

Several ranks (torchrun, `lm.distributed`): each rank samples and scores every W-th group, with
the group's own seed, and all ranks receive every group, so rollouts, rewards, advantages and the
loss normaliser (`LossScale` over the whole mini-batch) are the single-process ones. Each rank
backpropagates its groups' rows; the gradients are summed across ranks before clipping (not DDP:
ranks may run different numbers of micro-batches). Rank 0 writes the resume state.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from artifacts.store import write_table
from lm import distributed
from lm.chat_template import THINK_PREFILL
from lm.checkpoint import load_resume as load_resume_state
from lm.checkpoint import save_checkpoint
from lm.checkpoint import save_resume as save_resume_state
from lm.logprobs import completion_logprobs
from lm.model import Transformer
from lm.sampler import Generation, Sampler, SamplingParams, TorchSampler, completion_text
from lm.tokenizer import Tokenizer
from lm.logprobs import completion_logprobs, padding_layout
from lm.train import (autocast_context, check_finite, clip_grad, fast_fp32_matmul, lr_at, make_optimizer,
                      resolve_dtype_name, set_lr, training_precision)
from lm.value import ValueModel
from stages.context import StageContext
from stages.grpo_loss import (ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, LossScale, clipped_value_loss, gae_advantages,
                              grpo_loss, mask_truncated, outcome_token_rewards, whiten)
from stages.metrics import METRICS_SCHEMA
from stages.sampling import (Problem, TemplateName, check_prompt_lengths, choose, encode_prompts, load_policy, read_problems,
                             sample_completions, sampling_params, stage_seed)

# --------------------------------------------------------------------------------------------------
# Config




class GRPOConfig(BaseModel):
    """Knobs of a GRPO stage; `rl_zero.Config` and `rl_reasoning.Config` differ only in `rewards`.

    Defaults suit the `tiny` preset (a ~3M-parameter model on 2 CPU cores).
    """

    model_config = ConfigDict(extra="forbid")

    template: TemplateName = "r1_zero_short"  # chat template the prompt is rendered with
    # reward name or user reference ("file.py:fn", "pkg.mod:fn", "verl:...") -> weight
    rewards: dict[str, float] = Field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    # per-reward keyword options, e.g. {overlong_penalty = {max_length = 96, cache_length = 24}}
    reward_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # rollouts
    steps: int = Field(100, ge=1)
    prompts_per_step: int = Field(8, ge=1)  # P
    group_size: int = Field(8, ge=2)  # G
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop_at_answer: bool = True  # also stop after "</answer>" (nothing after it is graded)
    # objective
    # the accepted names are the registries' keys (stages/grpo_loss.py)
    policy_loss: Literal[tuple(POLICY_LOSSES)] = "clip"  # clip (PPO token clip) | gspo | cispo
    # group | batch | none (Dr. GRPO) | rloo | reinforce_pp | gae (PPO: learned critic, GAE, clipped value loss)
    advantage: Literal[tuple(ADVANTAGES) + ("gae",)] = "group"
    gae_gamma: float = Field(1.0, ge=0.0, le=1.0)  # gae: discount γ
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0)  # gae: λ
    value_clip: float = Field(0.2, gt=0.0)  # gae: ε_v of the clipped value loss
    vf_coef: float = Field(0.1, gt=0.0)  # gae: weight of the value loss (one optimizer for policy + critic, as TRL)
    advantage_eps: float = Field(1e-4, ge=0.0)
    loss_aggregation: Literal[tuple(AGGREGATIONS)] = "sequence_mean"
    tis_cap: float | None = Field(None, gt=0.0)  # truncated importance sampling sampler -> trainer; None = off
    beta: float = Field(0.04, ge=0.0)  # KL weight; 0 skips the reference model
    eps_low: float = Field(0.2, ge=0.0)
    eps_high: float = Field(0.28, ge=0.0)  # DAPO clip-higher; set 0.2 for the symmetric clip
    mask_truncated: bool = False  # DAPO overlong filtering
    dynamic_sampling: bool = False  # DAPO: drop zero-spread groups, refill from new prompts
    max_sampling_rounds: int = Field(3, ge=1)
    # optimisation
    mu: int = Field(1, ge=1)  # passes over each batch
    minibatches: int = Field(1, ge=1)  # optimizer steps per pass
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    lr: float = Field(1e-4, gt=0.0)  # tiny model: 2e-5 too slow, 3e-4 KL 0.2 after 60 steps
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 = measure only
    autocast: bool = True  # bf16 autocast for the training/reference forwards where supported
    # evaluation on the test split
    eval_every: int = Field(50, ge=0)  # steps; 0 = only before and after training
    eval_problems: int = Field(64, ge=1)
    eval_samples: int = Field(4, ge=1)  # k of pass@1 (mean correctness over k samples)
    eval_temperature: float = Field(0.6, ge=0.0)  # R1's pass@1 setting (T 0.6, top-p 0.95)
    eval_top_p: float = Field(0.95, gt=0.0, le=1.0)
    eval_batch_size: int = Field(256, ge=1)
    # resume
    checkpoint_every: int = Field(25, ge=1)
    log_every: int = Field(1, ge=1, description="steps between flushes of the live metrics.parquet")

    @model_validator(mode="after")
    def _check(self) -> "GRPOConfig":
        if not self.rewards:
            raise ValueError("rewards must name at least one reward with a weight")
        check_rewards(self.rewards, self.reward_options)
        rows = self.prompts_per_step * self.group_size
        if self.minibatches * self.grad_accum > rows:
            raise ValueError(f"minibatches × grad_accum = {self.minibatches * self.grad_accum} exceeds the "
                             f"{rows} completions of a step")
        return self

    @property
    def updates_per_step(self) -> int:
        return self.mu * self.minibatches


# --------------------------------------------------------------------------------------------------
# Outputs

_ROLLOUT_FIELDS = [
    pa.field("step", pa.int64(), nullable=False),
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
    pa.field("num_tokens", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("reward", pa.float64()),
    pa.field("advantage", pa.float64()),
]


def rollouts_schema(reward_names: Sequence[str]) -> pa.Schema:
    """rollouts.parquet: one row per trained completion, with a `reward_<name>` column per reward
    component (its raw, unweighted score; null where the reward could not judge)."""
    extra = [pa.field(f"reward_{n}", pa.float64()) for n in sorted(reward_names)]
    return pa.schema(_ROLLOUT_FIELDS[:7] + extra + _ROLLOUT_FIELDS[7:])


def _reward_columns(schema: pa.Schema) -> list[str]:
    return [f.name[len("reward_"):] for f in schema if f.name.startswith("reward_")]


# --------------------------------------------------------------------------------------------------
# Prompts and rewards


class PromptStream:
    """Train problems in a seeded order, a fresh permutation per epoch. `cursor` (how many prompts
    were taken) is the whole state, so resuming needs one integer."""

    def __init__(self, n: int, seed: int, cursor: int = 0) -> None:
        if n < 1:
            raise ValueError("no training problems")
        self.n, self.seed, self.cursor = n, seed, cursor
        self._epoch: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._epoch[1]

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.cursor, self.n)
            out.append(int(self._order(epoch)[i]))
            self.cursor += 1
        return out


class Scores(Protocol):
    """What a scorer returns (`rewards.CombinedReward` fits): per completion the weighted total
    and, per reward name, the raw component scores (None = could not judge)."""

    total: list[float | None]
    components: dict[str, list[float | None]]


Scorer = Callable[[Sequence[Problem], Sequence[str], list[str]], Scores]
"""(problem of each completion, rendered prompt of each completion, completions) -> Scores."""


def check_rewards(weights: dict[str, float], options: dict[str, dict[str, Any]]) -> None:
    """Every reward name is registered or a loadable user reference (file and function exist),
    options name only weighted rewards, labels do not clash: checked when the config loads, so a
    bad name stops the run before any stage (ValueError naming the reward, file and function)."""
    from rewards.registry import reward_labels
    from rewards.user import check_reward_name

    for name in weights:
        check_reward_name(name)
    extra = sorted(set(options) - set(weights))
    if extra:
        raise ValueError(f"reward_options names rewards without a weight: {extra}")
    reward_labels(list(weights))


def reward_sources(cfg: GRPOConfig) -> dict[str, str]:
    """sha256 of each user reward's source file: part of the stage's cache key, so editing the
    file reruns the stage (and, through its new artifact, everything downstream)."""
    from rewards.user import reward_sources as sources

    return sources(list(cfg.rewards))


def reward_options(cfg: GRPOConfig) -> dict[str, dict[str, Any]]:
    """The configured per-reward options; the overlong penalty's limit defaults to this stage's
    `max_new_tokens` (soft zone the last quarter, DAPO's 4096 of 20480 is a fifth), counted in
    tokens: the completions' token ids reach the rewards."""
    options = {k: dict(v) for k, v in cfg.reward_options.items()}
    if "overlong_penalty" in cfg.rewards:
        o = options.setdefault("overlong_penalty", {})
        o.setdefault("max_length", cfg.max_new_tokens)
        o.setdefault("cache_length", max(1, o["max_length"] // 4))
    return options


@dataclass
class TrainerState:
    """What `trainer_state=` gives a reward (the fields of TRL's `TrainerState` rewards read)."""

    global_step: int = 0
    max_steps: int = 0


@dataclass
class RewardScorer:
    """The stages' scorer: `rewards.combine` called the way TRL's GRPOTrainer calls reward
    functions: `prompts`, `completions` (conversational message lists when the problems have
    messages, else strings), `completion_ids`, every problem column (`id`, `answer`, `language`,
    `source`, `difficulty`, `data_source`, `extra_info`, ...), `trainer_state`, `log_extra`,
    `log_metric`. Metrics a reward logs with `log_metric` come back, averaged, from
    `pop_metrics` (the loop records them as `reward_log/<name>`); `log_extra` columns are
    accepted and kept for the step in `extra_columns`."""

    weights: dict[str, float]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: TrainerState = field(default_factory=TrainerState)
    logged: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    extra_columns: dict[str, list[Any]] = field(default_factory=dict)

    def __call__(self, problems: Sequence[Problem], prompts: Sequence[str], texts: list[str], *,
                 completion_ids: Sequence[Sequence[int]] | None = None) -> Scores:
        import rewards

        conversational = bool(problems) and all(p.messages for p in problems)
        columns: dict[str, list[Any]] = {"id": [p.id for p in problems], "answer": [p.answer for p in problems],
                                         "language": [p.language for p in problems]}
        for name in sorted({k for p in problems for k in p.columns}):
            columns[name] = [p.columns.get(name) for p in problems]
        kwargs: dict[str, Any] = {
            "prompts": [_prompt_messages(p, r) for p, r in zip(problems, prompts)] if conversational else list(prompts),
            "trainer_state": self.state, "log_extra": self._log_extra, "log_metric": self._log_metric,
        }
        if completion_ids is not None:
            kwargs["completion_ids"] = [list(x) for x in completion_ids]
        completions: list[Any] = ([[{"role": "assistant", "content": t}] for t in texts] if conversational
                                  else list(texts))
        return rewards.combine(self.weights, completions, self.options, **columns, **kwargs)

    def _log_metric(self, name: str, value: float) -> None:
        self.logged[name].append(float(value))

    def _log_extra(self, column: str, values: list[Any]) -> None:
        self.extra_columns[column] = list(values)

    def pop_metrics(self) -> dict[str, float]:
        out = {f"reward_log/{k}": float(np.mean(v)) for k, v in self.logged.items() if v}
        self.logged.clear()
        self.extra_columns.clear()
        return out


def _prompt_messages(problem: Problem, rendered: str) -> list[dict[str, str]]:
    """A conversational prompt as the rewards see it: the problem's messages, plus the assistant
    turn the template opened (TRL's `continue_final_message` form) when it prefilled `<think>`,
    so the format rewards count that tag as written."""
    from rewards.format import prompt_opens_think

    messages = [dict(m) for m in problem.messages]
    if prompt_opens_think(rendered):
        messages.append({"role": "assistant", "content": THINK_PREFILL})
    return messages


def reward_scorer(weights: dict[str, float], options: dict[str, dict[str, Any]] | None = None) -> RewardScorer:
    """The stages' scorer (see `RewardScorer`)."""
    return RewardScorer(dict(weights), dict(options or {}))


def score(scorer: Scorer, problems: Sequence[Problem], prompts: Sequence[str], texts: list[str],
          completion_ids: Sequence[Sequence[int]] | None = None) -> Scores:
    """Call a scorer; the stages' `RewardScorer` also gets the completions' token ids."""
    if isinstance(scorer, RewardScorer):
        return scorer(problems, prompts, texts, completion_ids=completion_ids)
    return scorer(problems, prompts, texts)


# --------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollouts:
    """P groups of G completions, rows grouped by prompt (row p*G + g is sample g of prompt p)."""

    problems: list[Problem]  # [P]
    prompts: list[str]  # [P] rendered prompt text
    prompt_ids: list[list[int]]  # [P]
    gens: list[Generation]  # [P*G]
    texts: list[str]  # [P*G]
    totals: list[float]  # [P*G] weighted reward (None scored 0)
    components: dict[str, list[float | None]]  # name -> [P*G]

    @property
    def num_groups(self) -> int:
        return len(self.problems)

    def groups(self, keep: Sequence[int], group_size: int) -> "Rollouts":
        rows = [p * group_size + g for p in keep for g in range(group_size)]
        return Rollouts([self.problems[p] for p in keep], [self.prompts[p] for p in keep],
                        [self.prompt_ids[p] for p in keep], [self.gens[r] for r in rows],
                        [self.texts[r] for r in rows], [self.totals[r] for r in rows],
                        {k: [v[r] for r in rows] for k, v in self.components.items()})

    @staticmethod
    def concat(parts: Sequence["Rollouts"]) -> "Rollouts":
        names = list(parts[0].components) if parts else []
        return Rollouts([x for r in parts for x in r.problems], [x for r in parts for x in r.prompts],
                        [x for r in parts for x in r.prompt_ids], [x for r in parts for x in r.gens],
                        [x for r in parts for x in r.texts], [x for r in parts for x in r.totals],
                        {k: [x for r in parts for x in r.components[k]] for k in names})


def sample_groups(sampler: Sampler, tokenizer: Tokenizer, scorer: Scorer, problems: Sequence[Problem],
                  prompts: Sequence[str], prompt_ids: Sequence[list[int]], group_size: int,
                  params: SamplingParams, seed: int) -> Rollouts:
    """G completions for each prompt in one `generate` call, decoded and scored.

    Group p draws from its own random stream (seed `stage_seed(seed, "group:p")`, `lm.sampler`'s
    per-prompt seeds), so its completions do not depend on the other groups of the call. Under
    several ranks each samples and scores its own groups (`group_shares`) and every rank receives
    all of them, as one process would have produced them.
    """
    mine = group_shares(len(problems))
    requests = [list(prompt_ids[p]) for p in mine for _ in range(group_size)]
    seeds = [stage_seed(seed, f"group:{p}") for p in mine for _ in range(group_size)]
    gens = sampler.generate(requests, params, seeds) if requests else []
    if len(gens) != len(requests):
        raise RuntimeError(f"sampler returned {len(gens)} generations for {len(requests)} prompts")
    texts = [completion_text(tokenizer, g) for g in gens]
    per_row = [problems[p] for p in mine for _ in range(group_size)]
    scores = (score(scorer, per_row, [prompts[p] for p in mine for _ in range(group_size)], texts,
                    [g.token_ids for g in gens]) if requests else None)
    totals = [0.0 if t is None else float(t) for t in (scores.total if scores else [])]
    components = {k: list(v) for k, v in scores.components.items()} if scores else {}
    rows = [slice(i * group_size, (i + 1) * group_size) for i in range(len(mine))]
    groups = distributed.gather_shards([(gens[r], texts[r], totals[r], {k: v[r] for k, v in components.items()})
                                        for r in rows], len(problems))
    names = next((list(c) for *_, c in groups if c), [])
    return Rollouts(list(problems), list(prompts), [list(i) for i in prompt_ids], [g for x in groups for g in x[0]],
                    [t for x in groups for t in x[1]], [t for x in groups for t in x[2]],
                    {k: [v for x in groups for v in x[3][k]] for k in names})


def group_shares(num_groups: int) -> list[int]:
    """The groups this rank samples and trains on: every W-th (all of them in one process)."""
    return distributed.shard_indices(num_groups)


def own_rows(num_groups: int, group_size: int) -> Tensor:
    """Row indices (row p*G + g) of this rank's groups."""
    return torch.tensor([p * group_size + g for p in group_shares(num_groups) for g in range(group_size)],
                        dtype=torch.long)


def zero_spread_groups(totals: Sequence[float], group_size: int) -> list[bool]:
    """Per group: are all G rewards equal (no advantage signal)?"""
    return [max(totals[i:i + group_size]) == min(totals[i:i + group_size])
            for i in range(0, len(totals), group_size)]


# --------------------------------------------------------------------------------------------------
# The training batch


PAD_MULTIPLE = 8
"""Prompt and completion widths are rounded up to a multiple of this, so the matmul shapes repeat
from step to step: oneDNN (bf16 autocast, fast fp32) builds a kernel per new shape (~1-3 ms each on
the reference CPU), and without rounding nearly every step brings new ones."""


def _round_up(n: int, limit: int) -> int:
    return min(limit, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE)


@dataclass
class TrainBatch:
    """A batch laid out so each group's prompt is computed once.

    Prompts are left-padded (every prompt ends in the last column), completions right-padded, and
    `group` maps each completion row to its prompt: an `lm.logprobs.PrefixBatch`, which
    `completion_logprobs` runs prompts first, then completions attending to their prompt's keys/values.
    """

    prompt_ids: Tensor  # [P, Lp] left-padded
    prompt_mask: Tensor  # [P, Lp] bool, real prompt tokens
    completion_ids: Tensor  # [N, Lc] right-padded
    completion_real: Tensor  # [N, Lc] bool, generated tokens (what attention may see)
    loss_mask: Tensor  # [N, Lc] float, tokens that carry loss (truncated rows zeroed if asked)
    group: Tensor  # [N] long, prompt row of each completion
    old_logp: Tensor  # [N, Lc] old-policy log-probs (the sampler's, or the trainer's recomputed), 0 on padding
    advantages: Tensor  # [N], or [N, Lc] per token (gae)
    sampler_logp: Tensor  # [N, Lc] the sampler's log-probs as it reported them, 0 on padding
    returns: Tensor | None = None  # [N, Lc] gae: the critic's regression targets
    old_values: Tensor | None = None  # [N, Lc] gae: the values the advantages were computed with

    def rows(self, idx: Tensor) -> "TrainBatch":
        """The completions `idx` with just their prompts, cut to their longest prompt/completion."""
        groups, inv = torch.unique(self.group[idx], return_inverse=True)  # [g], [n]
        real = self.completion_real[idx]  # [n, Lc]
        Lc = _round_up(max(int(real.sum(dim=1).max()), 1), real.shape[1])
        pmask = self.prompt_mask[groups]  # [g, Lp]
        Lp = _round_up(int(pmask.sum(dim=1).max()), pmask.shape[1])
        adv = self.advantages[idx]

        def per_token(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[idx, :Lc]

        return TrainBatch(self.prompt_ids[groups, -Lp:], pmask[:, -Lp:], self.completion_ids[idx, :Lc], real[:, :Lc],
                          self.loss_mask[idx, :Lc], inv, self.old_logp[idx, :Lc], adv if adv.dim() == 1 else adv[:, :Lc],
                          self.sampler_logp[idx, :Lc], per_token(self.returns), per_token(self.old_values))


def build_batch(prompt_ids: Sequence[list[int]], gens: Sequence[Generation], group_size: int,
                advantages: Tensor, pad_id: int, drop_truncated: bool, device: torch.device | str) -> TrainBatch:
    """Pack P prompts and their P*G generations (row p*G + g belongs to prompt p) into tensors."""
    P, N = len(prompt_ids), len(gens)
    Lp, Lc = (_round_up(max(len(x) for x in seqs), 1 << 30) for seqs in (prompt_ids, [g.token_ids for g in gens]))
    pids = torch.full((P, Lp), pad_id, dtype=torch.long)  # [P, Lp]
    pmask = torch.zeros(P, Lp, dtype=torch.bool)  # [P, Lp]
    for i, p in enumerate(prompt_ids):
        pids[i, Lp - len(p):] = torch.tensor(p, dtype=torch.long)
        pmask[i, Lp - len(p):] = True
    cids = torch.full((N, Lc), pad_id, dtype=torch.long)  # [N, Lc]
    old = torch.zeros(N, Lc)  # [N, Lc]
    for r, g in enumerate(gens):
        cids[r, :len(g.token_ids)] = torch.tensor(g.token_ids, dtype=torch.long)
        old[r, :len(g.logprobs)] = torch.tensor(g.logprobs, dtype=torch.float32)
    lens = torch.tensor([len(g.token_ids) for g in gens])  # [N]
    real = torch.arange(Lc).unsqueeze(0) < lens.unsqueeze(1)  # [N, Lc]
    loss_mask = real.float()  # [N, Lc]
    if drop_truncated:
        loss_mask = mask_truncated(loss_mask, torch.tensor([g.finish_reason == "length" for g in gens]))  # [N, Lc]
    group = torch.arange(N) // group_size  # [N]
    return TrainBatch(pids.to(device), pmask.to(device), cids.to(device), real.to(device), loss_mask.to(device),
                      group.to(device), old.to(device), advantages.float().to(device), old.to(device))


def completion_values(critic: ValueModel, b: TrainBatch) -> Tensor:
    """V(s_t) of the state before each completion token t (the prompt's last state for t = 0).

    The critic reads prompt + completion as one row (prompt left-padded, completion right-padded:
    positions and key mask from `lm.logprobs.padding_layout`), once per completion.

    Returns:
        [N, Lc] float32 values, 0 on padding.
    """
    ids = torch.cat([b.prompt_ids[b.group], b.completion_ids], dim=1)  # [N, Lp+Lc]
    attn = torch.cat([b.prompt_mask[b.group], b.completion_real], dim=1)  # [N, Lp+Lc]
    positions, key_mask = padding_layout(attn)
    v = critic(ids, positions=positions, key_mask=key_mask)  # [N, Lp+Lc]
    Lp, Lc = b.prompt_ids.shape[1], b.completion_ids.shape[1]
    return v[:, Lp - 1:Lp - 1 + Lc] * b.completion_real  # [N, Lc]


# --------------------------------------------------------------------------------------------------
# One step


class PhaseTimer:
    """Wall seconds per named phase, summed over a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0


PHASES = ("generate", "ref_logprobs", "policy_fwd_bwd", "optimizer")

@dataclass
class GRPOParts:
    """What a GRPO step works on (plain parts; the loop is `grpo_step` / `train_grpo`)."""

    cfg: GRPOConfig
    policy: Transformer
    reference: Transformer | None  # None when beta == 0
    tokenizer: Tokenizer
    sampler: Sampler
    optimizer: torch.optim.Optimizer
    scorer: Scorer
    problems: list[Problem]  # the train split
    prompts: list[str]  # rendered, one per problem
    prompt_ids: list[list[int]]  # encoded, one per problem
    stream: PromptStream
    params: SamplingParams
    device: str = "cpu"
    dtype: str = "fp32"  # training precision: "bf16" = autocast for the training and reference forwards
    seed: int = 0
    updates: int = 0  # optimizer steps taken (drives the LR schedule)
    critic: ValueModel | None = None  # advantage = "gae" only; `optimizer` then also holds its parameters

    @property
    def trained(self) -> torch.nn.Module:
        """What the optimizer updates and the resume state holds: the policy, or policy + critic."""
        if self.critic is None:
            return self.policy
        return torch.nn.ModuleDict({"policy": self.policy, "critic": self.critic})

    @property
    def total_updates(self) -> int:
        return self.cfg.steps * self.cfg.updates_per_step


@dataclass
class StepResult:
    metrics: dict[str, float]
    rollouts: Rollouts
    advantages: list[float]  # per row of `rollouts`
    phases: dict[str, float] = field(default_factory=dict)


def collect_rollouts(tr: GRPOParts, step: int) -> tuple[Rollouts, dict[str, float]]:
    """P groups for this step; with dynamic sampling, zero-spread groups are replaced by groups
    of fresh prompts for up to `max_sampling_rounds` rounds (fewer than P groups may remain)."""
    cfg, G = tr.cfg, tr.cfg.group_size
    kept: list[Rollouts] = []
    have, rounds, sampled, zero = 0, 0, 0, 0
    while have < cfg.prompts_per_step and rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        idx = tr.stream.take(cfg.prompts_per_step - have)
        seed = stage_seed(tr.seed, f"grpo-sample:{step}:{rounds}")
        r = sample_groups(tr.sampler, tr.tokenizer, tr.scorer, [tr.problems[i] for i in idx],
                          [tr.prompts[i] for i in idx], [tr.prompt_ids[i] for i in idx], G, tr.params, seed)
        flags = zero_spread_groups(r.totals, G)
        zero += sum(flags)
        sampled += len(flags)
        rounds += 1
        if cfg.dynamic_sampling:
            r = r.groups([p for p, z in enumerate(flags) if not z], G)
        kept.append(r)
        have += r.num_groups
    info = {"zero_spread_frac": zero / max(sampled, 1), "sampling_rounds": float(rounds),
            "groups_trained": float(have)}
    return Rollouts.concat(kept), info


def grpo_step(tr: GRPOParts, step: int) -> StepResult:
    """Sample, score, and take `mu × minibatches` optimizer steps on one batch."""
    cfg, timer = tr.cfg, PhaseTimer()
    t0 = time.perf_counter()
    with timer("generate"):
        ro, info = collect_rollouts(tr, step)
    G = cfg.group_size
    metrics = dict(info) | rollout_metrics(ro)
    metrics["gen_tokens_per_s"] = sum(len(g.token_ids) for g in ro.gens) / max(timer.seconds["generate"], 1e-9)
    if ro.num_groups == 0:  # dynamic sampling found no signal: nothing to learn from this step
        metrics["step_time"] = time.perf_counter() - t0
        return StepResult(metrics, ro, [], dict(timer.seconds))

    rewards = torch.tensor(ro.totals, dtype=torch.float64).view(-1, G)  # [P, G]
    if tr.critic is None:
        adv = ADVANTAGES[cfg.advantage](rewards, cfg.advantage_eps).values.flatten()  # [P*G]
        batch = build_batch(ro.prompt_ids, ro.gens, G, adv, tr.tokenizer.pad_id, cfg.mask_truncated, tr.device)
    else:  # PPO: per-token GAE advantages from the critic
        batch = build_batch(ro.prompt_ids, ro.gens, G, torch.zeros(len(ro.gens)), tr.tokenizer.pad_id,
                            cfg.mask_truncated, tr.device)
        with timer("values"):
            gae_metrics = _gae_batch(tr, batch, rewards.flatten())
        metrics.update(gae_metrics)
        adv = batch.advantages[:, 0].detach().cpu()  # [N] the first token's, for rollouts.parquet

    own = own_rows(ro.num_groups, G).to(batch.group.device)  # this rank's rows (all in one process)
    ref_logp = None
    if cfg.beta > 0:
        with timer("ref_logprobs"):
            ref_logp = _no_grad_logprobs(tr.reference, batch, tr.device, tr.dtype, cfg.grad_accum, own)  # [N, Lc]
    sums: dict[str, float] = defaultdict(float)
    norms: list[float] = []
    entropy_sum = 0.0
    reuse_old = cfg.mu > 1 or cfg.minibatches > 1  # else the policy has not moved: ρ = 1 exactly
    # the sampler's fp32 log-probs would differ by bf16 rounding; with TIS the trainer's own old
    # log-probs are what the sampler's are compared with, so they are always recomputed
    if reuse_old and (tr.dtype != "fp32" or cfg.tis_cap is not None):
        with timer("old_logprobs"):
            batch.old_logp = _no_grad_logprobs(tr.policy, batch, tr.device, tr.dtype, cfg.grad_accum, own)  # [N, Lc]
    for pass_ in range(cfg.mu):
        for mb in _minibatch_rows(len(ro.gens), cfg.minibatches, tr.seed, step, pass_):
            # the normaliser counts the whole mini-batch (every rank holds all of it); each rank
            # backpropagates its own rows and the gradients are summed in `_optimizer_update`
            scale = LossScale.of(batch.loss_mask[mb], cfg.max_new_tokens)
            with timer("policy_fwd_bwd"):
                for micro in _micro_batches(batch, mb[torch.isin(mb, own.to(mb.device))], cfg.grad_accum):
                    if micro.numel() == 0:  # fewer rows than micro-batches (dynamic sampling)
                        continue
                    m = _backward_micro(tr, batch, micro, ref_logp, scale, reuse_old, step)
                    entropy_sum += m.pop("entropy_sum") if pass_ == 0 else 0.0
                    for k, v in m.items():
                        sums[k] += v
            with timer("optimizer"):
                norms.append(_optimizer_update(tr, step))
    names = sorted(sums)
    *totals, entropy_sum = distributed.all_reduce_sum([sums[k] for k in names] + [entropy_sum])  # over ranks
    for k, v in zip(names, totals):  # each mini-batch's figures are whole-mini-batch means: average them
        metrics[k] = v / cfg.updates_per_step
    metrics["entropy"] = entropy_sum / max(float(batch.loss_mask.sum()), 1.0)  # on-policy: pass 0
    metrics["grad_norm"] = float(np.mean(norms))
    metrics["lr"] = tr.optimizer.param_groups[0]["lr"]
    metrics["step_time"] = time.perf_counter() - t0
    return StepResult(metrics, ro, adv.tolist(), dict(timer.seconds))


def _gae_batch(tr: GRPOParts, batch: TrainBatch, rewards: Tensor) -> dict[str, float]:
    """Old values, GAE advantages (whitened over the loss tokens) and returns into `batch`."""
    cfg = tr.cfg
    rows = torch.arange(batch.completion_ids.shape[0], device=batch.completion_ids.device)  # [N]
    old = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.completion_ids.device)  # [N, Lc]
    with torch.inference_mode(), autocast_context(tr.device, tr.dtype):
        for idx in _micro_batches(batch, rows, cfg.grad_accum):
            if idx.numel():
                v = completion_values(tr.critic, batch.rows(idx))  # [n, lc]
                old[idx, :v.shape[1]] = v.float()
    real = batch.completion_real  # [N, Lc]
    token_r = outcome_token_rewards(rewards.float().to(old.device), real)  # [N, Lc]
    adv, returns = gae_advantages(token_r, old, real, cfg.gae_gamma, cfg.gae_lambda)  # [N, Lc] each
    batch.advantages = whiten(adv, batch.loss_mask)  # [N, Lc]
    batch.returns, batch.old_values = returns, old
    n = real.sum().clamp(min=1)
    return {"value_mean": float((old * real).sum() / n), "return_mean": float((returns * real).sum() / n)}


def _minibatch_rows(n: int, minibatches: int, seed: int, step: int, pass_: int) -> list[Tensor]:
    """Row indices of each mini-batch: all rows in order for one mini-batch, else a seeded shuffle."""
    if minibatches == 1:
        return [torch.arange(n)]
    g = torch.Generator().manual_seed(stage_seed(seed, f"grpo-shuffle:{step}:{pass_}"))
    return list(torch.tensor_split(torch.randperm(n, generator=g), minibatches))


def _micro_batches(batch: TrainBatch, rows: Tensor, n: int) -> list[Tensor]:
    """`rows` cut into n micro-batches of similar completion length (sorted first), so each is
    padded only to its own longest completion."""
    if n == 1:
        return [rows]
    lengths = batch.completion_real[rows].sum(dim=1)  # [r]
    return list(torch.tensor_split(rows[torch.argsort(lengths, stable=True)], n))


def _no_grad_logprobs(model: Transformer, batch: TrainBatch, device: str, dtype: str, chunks: int,
                      rows: Tensor | None = None) -> Tensor:
    """Completion log-probs under `model` without autograd, in `chunks` length-sorted pieces.

    In fp32 the model runs under `Transformer.fused_inference` (fused q/k/v and gate/up, weights
    pre-packed for oneDNN on CPU): 0.125 s against 0.184 s with plain modules for the benchmark's
    reference pass, single-threaded; a frozen model (the reference) keeps its packed weights across
    steps. Under bf16 autocast the plain modules run (the packed weights are fp32 and would bypass
    autocast)."""
    out = torch.zeros_like(batch.old_logp)  # [N, Lc] (rows not asked for stay 0)
    if rows is None:
        rows = torch.arange(batch.completion_ids.shape[0], device=batch.completion_ids.device)  # [N]
    frozen = not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode(), autocast_context(device, dtype), fast_fp32_matmul(device, dtype), \
            (model.fused_inference(batch.completion_ids.numel(), keep=frozen) if dtype == "fp32" else nullcontext()):
        for idx in _micro_batches(batch, rows, chunks):
            if idx.numel():
                lp = completion_logprobs(model, batch.rows(idx))  # [n, lc]
                out[idx, :lp.shape[1]] = lp
    return out


def _backward_micro(tr: GRPOParts, batch: TrainBatch, idx: Tensor, ref_logp: Tensor | None, scale: LossScale,
                    reuse_old: bool, step: int) -> dict[str, float]:
    """Forward + backward of one micro-batch; returns its additive metrics."""
    cfg = tr.cfg
    sub = batch.rows(idx)
    Lc = sub.completion_ids.shape[1]
    with fast_fp32_matmul(tr.device, tr.dtype):
        with autocast_context(tr.device, tr.dtype):
            logp = completion_logprobs(tr.policy, sub)  # [n, Lc]
        old = sub.old_logp if reuse_old else logp.detach()  # [n, Lc]
        ref = ref_logp[idx, :Lc] if ref_logp is not None else None  # [n, Lc]
        loss, m = grpo_loss(logp, old, sub.advantages, sub.loss_mask, scale=scale,
                            aggregate=AGGREGATIONS[cfg.loss_aggregation], eps_low=cfg.eps_low,
                            eps_high=cfg.eps_high, ref_logp=ref, beta=cfg.beta,
                            policy_loss=POLICY_LOSSES[cfg.policy_loss], sampler_logp=sub.sampler_logp,
                            tis_cap=cfg.tis_cap)
        check_finite("GRPO loss", loss, step)
        loss.backward()
        if tr.critic is not None:
            with autocast_context(tr.device, tr.dtype):
                values = completion_values(tr.critic, sub)  # [n, Lc]
            vloss, vm = clipped_value_loss(values, sub.old_values, sub.returns, sub.loss_mask, clip=cfg.value_clip,
                                           scale=scale, aggregate=AGGREGATIONS[cfg.loss_aggregation])
            check_finite("value loss", vloss, step)
            (cfg.vf_coef * vloss).backward()
            m = m | vm
    out = {k: float(v) for k, v in m.items()}
    out["loss"] = out["policy_loss"] + out.get("kl_loss", 0.0)
    out["entropy_sum"] = float(-(logp.detach() * sub.loss_mask).sum())
    return out


def _optimizer_update(tr: GRPOParts, step: int) -> float:
    """Clip, guard, set the scheduled LR, step, zero the gradients; returns the pre-clip norm."""
    cfg = tr.cfg
    distributed.all_reduce_grads(tr.trained)  # several ranks: the sum of their rows' gradients
    norm = clip_grad(tr.trained, cfg.max_grad_norm)
    check_finite("gradient norm", norm, step)
    warmup = cfg.warmup_steps * cfg.updates_per_step
    set_lr(tr.optimizer, cfg.lr * lr_at(tr.updates, warmup, tr.total_updates, cfg.min_lr_ratio))
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.updates += 1
    return norm


# --------------------------------------------------------------------------------------------------
# Metrics and rows

# Headline rates: metric name -> (reward component, how it is read)
_RATES: dict[str, tuple[str, str]] = {
    "accuracy": ("accuracy", "rate"),  # fraction fully correct
    "format_rate": ("format", "rate"),  # fraction well formed
    "language_consistency": ("language_consistency", "mean"),
}


def _mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def rollout_metrics(ro: Rollouts) -> dict[str, float]:
    """Reward and length figures of a batch of rollouts."""
    lens = [len(g.token_ids) for g in ro.gens]
    if not lens:
        return {}
    out = {
        "reward_mean": float(np.mean(ro.totals)),
        "reward_std": float(np.std(ro.totals)),
        "completion_len_mean": float(np.mean(lens)),
        "completion_len_max": float(max(lens)),
        "truncated_frac": float(np.mean([g.finish_reason == "length" for g in ro.gens])),
    }
    for name, scores in ro.components.items():
        out[f"reward/{name}"] = _mean(scores)
    for metric, (comp, how) in _RATES.items():
        if comp in ro.components:
            scores = ro.components[comp]
            out[metric] = (_mean([None if s is None else float(s >= 1.0) for s in scores]) if how == "rate"
                           else _mean(scores))
    return out


def rollout_rows(step: int, ro: Rollouts, advantages: Sequence[float], group_size: int,
                 reward_names: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for r, (g, text) in enumerate(zip(ro.gens, ro.texts)):
        p = r // group_size
        row = {"step": step, "problem_id": ro.problems[p].id, "sample_index": r % group_size,
               "prompt": ro.prompts[p], "completion": text, "num_tokens": len(g.token_ids),
               "finish_reason": g.finish_reason, "reward": ro.totals[r], "advantage": float(advantages[r])}
        for name in reward_names:
            v = ro.components.get(name, [None] * len(ro.gens))[r]
            row[f"reward_{name}"] = None if v is None else float(v)
        rows.append(row)
    return rows


def metric_rows(step: int, metrics: dict[str, float]) -> list[dict[str, Any]]:
    return [{"step": step, "name": k, "value": float(v)} for k, v in sorted(metrics.items())]


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(tr: GRPOParts, problems: Sequence[Problem], prompts: Sequence[str], prompt_ids: Sequence[list[int]],
             seed: int) -> dict[str, float]:
    """pass@1 on the test split as DeepSeek-R1 reports it: k samples per problem at the eval
    temperature, pass@1 = mean correctness (accuracy score 1). Also reward, format, length."""
    cfg = tr.cfg
    params = sampling_params(tr.tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature,
                             top_p=cfg.eval_top_p, stop_at_answer=cfg.stop_at_answer)
    samples = sample_completions(tr.sampler, tr.tokenizer, prompt_ids, n=cfg.eval_samples, params=params,
                                 batch_size=cfg.eval_batch_size, seed=seed)
    flat = [(i, c) for i, row in enumerate(samples) for c in row]
    scores = score(tr.scorer, [problems[i] for i, _ in flat], [prompts[i] for i, _ in flat],
                   [c.text for _, c in flat], [c.token_ids for _, c in flat])
    out = {"eval/reward_mean": _mean([0.0 if t is None else t for t in scores.total]),
           "eval/mean_length": float(np.mean([c.n_tokens for _, c in flat]))}
    if "accuracy" in scores.components:
        out["eval/pass@1"] = _mean([float(s is not None and s >= 1.0) for s in scores.components["accuracy"]])
    if "format" in scores.components:
        out["eval/format_rate"] = _mean([float(s is not None and s >= 1.0) for s in scores.components["format"]])
    return out


# --------------------------------------------------------------------------------------------------
# Resume state

RESUME_DIR = "grpo_resume"


def save_resume(run_dir: Path, tr: GRPOParts, step: int, rollouts: list[dict], metrics: list[dict]) -> None:
    """Policy (and critic) + optimizer + step + prompt cursor + rows so far (`lm.checkpoint.save_resume`)."""
    extra = {"cursor": tr.stream.cursor, "updates": tr.updates, "rollouts": rollouts, "metrics": metrics}
    save_resume_state(run_dir / RESUME_DIR, tr.trained, tr.optimizer, step, extra)


def load_resume(run_dir: Path, tr: GRPOParts) -> tuple[int, list[dict], list[dict]] | None:
    """Restore the newest resume state into `tr`; returns (step, rollout rows, metric rows) or None."""
    resumed = load_resume_state(run_dir / RESUME_DIR, tr.trained, tr.optimizer)
    if resumed is None:
        return None
    step, extra = resumed
    tr.stream.cursor, tr.updates = int(extra["cursor"]), int(extra["updates"])
    return step, list(extra["rollouts"]), list(extra["metrics"])


# --------------------------------------------------------------------------------------------------
# The loop


def make_parts(cfg: GRPOConfig, policy: Transformer, tokenizer: Tokenizer, problems: list[Problem],
               scorer: Scorer, *, seed: int, device: str = "cpu", dtype: str = "fp32",
               sampler: Sampler | None = None) -> GRPOParts:
    """Wire the parts: reference copy (if β > 0), optimizer, sampler, encoded prompts."""
    policy.to(device)
    reference = None
    if cfg.beta > 0:
        reference = copy.deepcopy(policy).eval()
        reference.requires_grad_(False)
    prompts = [tokenizer.render_prompt(p.question, cfg.template) for p in problems]
    prompt_ids = encode_prompts(tokenizer, [p.question for p in problems], cfg.template)
    check_prompt_lengths(prompt_ids, cfg.max_new_tokens, policy.config.max_seq_len, [p.id for p in problems])
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay, cfg.adam_betas)
    if sampler is None:
        sampler = TorchSampler(policy, tokenizer, max_batch_size=cfg.prompts_per_step * cfg.group_size)
    params = sampling_params(tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, stop_at_answer=cfg.stop_at_answer)
    critic = None
    if cfg.advantage == "gae":  # PPO's critic: a copy of the starting policy with a value head
        critic = ValueModel(copy.deepcopy(policy)).to(device).train()
        optimizer = make_optimizer(torch.nn.ModuleDict({"policy": policy, "critic": critic}), cfg.lr,
                                   cfg.weight_decay, cfg.adam_betas)
    return GRPOParts(cfg, policy, reference, tokenizer, sampler, optimizer, scorer, problems, prompts, prompt_ids,
                   PromptStream(len(problems), stage_seed(seed, "grpo-prompts")), params, device,
                   training_precision(device, resolve_dtype_name(dtype, device), cfg.autocast), seed,
                   critic=critic)


def train_grpo(cfg: GRPOConfig, policy: Transformer, tokenizer: Tokenizer, train: list[Problem],
               test: list[Problem], out: Path, ctx: StageContext, *, schema: pa.Schema,
               scorer: Scorer | None = None, stage: str = "grpo") -> dict[str, Any]:
    """Run GRPO for `cfg.steps` steps; write rollouts.parquet, metrics.parquet and checkpoint/ into
    `out`; return the summary. Steps are numbered from 1; eval rows at step 0 are the start.

    `scorer` None scores with `rewards.combine(cfg.rewards)`; the rollouts then get a column per
    configured reward besides those `schema` declares. A custom scorer (tests, benchmarks) gets
    exactly the reward columns `schema` declares.
    """
    seed = stage_seed(ctx.seed, stage)
    reward_names = set(_reward_columns(schema))
    if scorer is None:
        from rewards.registry import reward_labels

        scorer = reward_scorer(cfg.rewards, reward_options(cfg))
        scorer.state.max_steps = cfg.steps
        reward_names |= set(reward_labels(list(cfg.rewards)).values())
    reward_names = sorted(reward_names)
    tr = make_parts(cfg, policy, tokenizer, train, scorer, seed=seed, device=ctx.device, dtype=ctx.dtype)
    schema = rollouts_schema(reward_names)
    eval_idx = choose(len(test), cfg.eval_problems, stage_seed(seed, "grpo-eval-set"))
    eval_set = [test[i] for i in eval_idx]
    eval_prompts = [tokenizer.render_prompt(p.question, cfg.template) for p in eval_set]
    eval_ids = encode_prompts(tokenizer, [p.question for p in eval_set], cfg.template)

    def run_eval(step: int) -> dict[str, float]:
        m = evaluate(tr, eval_set, eval_prompts, eval_ids, stage_seed(seed, "grpo-eval"))
        ctx.log(f"{stage} eval @ step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in m.items()))
        return m

    start, rollouts, metrics = 0, [], []
    resumed = load_resume(ctx.run_dir, tr) if ctx.run_dir is not None else None
    if resumed is not None:
        start, rollouts, metrics = resumed
        ctx.log(f"{stage}: resuming after step {start} from {ctx.run_dir / RESUME_DIR}")
    else:
        first = run_eval(0)
        metrics += metric_rows(0, first)
        if distributed.is_main():
            ctx.track(0, first)
    bar = ctx.progress(range(start + 1, cfg.steps + 1), desc=stage, total=cfg.steps - start)
    for step in bar:
        if isinstance(scorer, RewardScorer):
            scorer.state.global_step = step - 1  # TRL's count of steps finished when rewards run
        res = grpo_step(tr, step)
        m = res.metrics
        if isinstance(scorer, RewardScorer):
            m = m | scorer.pop_metrics()
        if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps:
            m = m | run_eval(step)
        metrics += metric_rows(step, m)
        if distributed.is_main():  # every rank holds the same metrics: rank 0 reports them
            ctx.track(step, m)
            if step % cfg.log_every == 0:
                ctx.flush_metrics(pa.Table.from_pylist(metrics, schema=METRICS_SCHEMA))
        rollouts += rollout_rows(step, res.rollouts, res.advantages, cfg.group_size, reward_names)
        _show(bar, m)
        if ctx.run_dir is not None and step % cfg.checkpoint_every == 0 and step < cfg.steps and distributed.is_main():
            save_resume(ctx.run_dir, tr, step, rollouts, metrics)
    write_table(pa.Table.from_pylist(rollouts, schema=schema), out / "rollouts.parquet", schema)
    write_table(pa.Table.from_pylist(metrics, schema=METRICS_SCHEMA), out / "metrics.parquet", METRICS_SCHEMA)
    save_checkpoint(out / "checkpoint", tr.policy, tokenizer,
                    {"stage": stage, "steps": cfg.steps, "config": cfg.model_dump(mode="json")})
    return summarize(metrics, cfg.steps)


def _show(bar: Any, m: dict[str, float]) -> None:
    """Key metrics on the progress bar (a plain iterable without `set_postfix` is left alone)."""
    if hasattr(bar, "set_postfix"):
        keys = ("reward_mean", "accuracy", "kl", "completion_len_mean", "step_time")
        bar.set_postfix({k: f"{m[k]:.3g}" for k in keys if k in m}, refresh=False)


def summarize(metrics: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Headline numbers: reward over the last tenth of training (the `final_reward_mean` headline),
    the first step's reward, final KL and eval pass@1, the median step time."""
    by: dict[str, dict[int, float]] = defaultdict(dict)
    for r in metrics:
        by[r["name"]][r["step"]] = r["value"]
    tail = max(1, steps // 10)
    reward = by.get("reward_mean", {})
    last = [v for s, v in reward.items() if s > steps - tail]
    out: dict[str, Any] = {
        "steps": steps,
        "final_reward_mean": float(np.mean(last)) if last else None,
        "initial_reward_mean": reward.get(1),
        "median_step_s": statistics.median(by["step_time"].values()) if by.get("step_time") else None,
    }
    for name, key in (("kl", "final_kl"), ("accuracy", "final_accuracy")):
        vals = [v for s, v in by.get(name, {}).items() if s > steps - tail]
        if vals:
            out[key] = float(np.mean(vals))
    for name in ("eval/pass@1", "eval/format_rate"):
        if by.get(name):
            first, final = min(by[name]), max(by[name])
            out[f"initial_{name.split('/')[1]}"] = by[name][first]
            out[f"final_{name.split('/')[1]}"] = by[name][final]
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def run_stage(cfg: GRPOConfig, init_dir: Path, problems_dir: Path, out: Path, ctx: StageContext, *,
              stage: str, schema: pa.Schema) -> dict[str, Any]:
    """A GRPO stage: load the starting checkpoint and the problems, train, write the outputs."""
    policy, tokenizer = load_policy(init_dir, ctx.device, "fp32")  # fp32 master weights; bf16 via autocast
    if tokenizer is None:
        raise ValueError(f"{init_dir}: the checkpoint has no tokenizer")
    train, test = read_problems(problems_dir, "train"), read_problems(problems_dir, "test")
    ctx.log(f"{stage}: {len(train)} train / {len(test)} test problems, {cfg.steps} steps of "
            f"{cfg.prompts_per_step}×{cfg.group_size}, β={cfg.beta}, μ={cfg.mu}, rewards {cfg.rewards}")
    return train_grpo(cfg, policy, tokenizer, train, test, out, ctx, schema=schema, stage=stage)
