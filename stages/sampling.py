"""Sampling shared by cold_start, rejection_sampling and evaluate: n completions per prompt, batched.

Each question is rendered with the tokenizer's chat template (the stage's `template` field,
CONTRACTS "Stage wiring") and encoded the way the training stages encode prompts
(`stages.lm_training.encode_prompt`: the think/answer tags and chat-turn markers as their single
ids, any other special string as plain text). The (question, sample) requests are sorted by prompt length, so a batch
holds prompts of similar length and left padding wastes little, then cut into batches of
`batch_size`; batch b is generated with seed `seed + b`. The result is therefore a pure function of
(model, questions, n, params, batch_size, seed): the same config and seed give the same samples,
also when the batches are shared out over several ranks (torchrun; `lm.distributed`).

The sampler is injected: stages build a `lm.sampler.TorchSampler` through `torch_sampler`, or,
when the run sends sampling to an OpenAI-compatible server (`run.sampler`, `ctx.sampler`), an
`lm.openai_sampler.OpenAISampler` through `server_sampler`; tests pass any object with the
`lm.sampler.Sampler` interface (a scripted fake), so the filters and the bookkeeping downstream
are testable without a trained model. `pick_sampler` decides which, in one place.

Also here, because every model-sampling stage needs it (the GRPO stages use it too): reading a
split of problems.parquet (`read_problems`), seeded prompt subsets (`choose`), per-stage seed
streams (`stage_seed`), loading a checkpoint without unpickling (`load_policy`), and the
train-prompt sampling loop of cold_start and rejection_sampling (`sample_train_rows`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import AfterValidator

from lm import distributed
from lm.chat_template import known_template
from lm.sampler import Generation, Sampler, SamplingParams, completion_text
from lm.tokenizer import ANSWER_END, Tokenizer
from stages.lm_training import encode_prompt

if TYPE_CHECKING:
    from lm.openai_sampler import ServerSettings

TemplateName = Annotated[str, AfterValidator(known_template)]
"""A config field naming a prompt template, checked when the config loads."""

SamplerFactory = Callable[[Any, Tokenizer, int], Sampler]
"""(model, tokenizer, batch_size) -> Sampler; stages take one so tests can inject a fake."""


@dataclass(frozen=True)
class Completion:
    """One sampled completion of question `prompt_index`.

    Attributes:
        prompt_index: index into the questions passed to `sample_completions`.
        sample: 0..n-1, the sample's number for its question.
        text: the decoded completion (without a final end-of-text token).
        n_tokens: generated tokens, the stop token included.
        finish_reason: "stop" (end-of-text or a stop token) or "length" (cut at max_new_tokens).
        token_ids: the generated ids (what TRL passes rewards as `completion_ids`).
        logprob_mean: mean log-probability of the generated tokens under the model (temperature 1,
            as the sampler reports them); None when the sampler reported none.
    """

    prompt_index: int
    sample: int
    text: str
    n_tokens: int
    finish_reason: str
    token_ids: tuple[int, ...] = ()
    logprob_mean: float | None = None


def stage_seed(seed: int, stream: str) -> int:
    """A reproducible 63-bit seed for one random stream of a stage (e.g. "cold_start")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "big") >> 1


def sampling_params(tokenizer: Tokenizer, *, max_new_tokens: int, temperature: float, top_p: float,
                    stop_at_answer: bool = True) -> SamplingParams:
    """SamplingParams for R1-format completions.

    With `stop_at_answer`, generation also stops after "</answer>" (its single id when the
    tokenizer has one, else the string): nothing after the answer is graded, and on a CPU the
    tokens a model would ramble on for are the dominant cost.
    """
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    if stop_at_answer:
        if ANSWER_END in tokenizer.special_tokens:
            stop_ids = (tokenizer.special_tokens[ANSWER_END],)
        else:
            stop_strings = (ANSWER_END,)
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          stop_token_ids=stop_ids, stop_strings=stop_strings)


def torch_sampler(model: Any, tokenizer: Tokenizer, batch_size: int) -> Sampler:
    """The default SamplerFactory: lm's TorchSampler with one KV cache sized for `batch_size`; the
    stages that use it only sample from the model, so its packed weights are kept across batches."""
    from lm.sampler import TorchSampler

    model.eval()
    return TorchSampler(model, tokenizer, max_batch_size=batch_size, frozen=True)


def server_sampler(settings: "ServerSettings") -> SamplerFactory:
    """A SamplerFactory for an OpenAI-compatible server: the model argument is unused (the server
    holds its own), the tokenizer renders prompts and re-tokenizes completions the way the stages
    encode model text (`stages.lm_training.encode_text`: think/answer tags as their single ids)."""
    from lm.openai_sampler import OpenAISampler
    from stages.lm_training import encode_text

    def factory(model: Any, tokenizer: Tokenizer, batch_size: int) -> Sampler:
        return OpenAISampler(settings, tokenizer, encode=lambda text: encode_text(tokenizer, text))

    return factory


def pick_sampler(explicit: SamplerFactory | None, ctx: Any) -> SamplerFactory:
    """The factory a sampling stage uses: the one passed to its `run` (tests), else the context's
    external backend (`ctx.sampler`, set from `run.sampler`), else the local torch sampler."""
    if explicit is not None:
        return explicit
    return getattr(ctx, "sampler", None) or torch_sampler


def encode_prompts(tokenizer: Tokenizer, questions: Sequence[str], template: str) -> list[list[int]]:
    """Token ids of each question rendered with the template: the same encoding SFT and distill
    train on (`stages.lm_training.encode_prompt`: chat-turn markers as single ids)."""
    return [encode_prompt(tokenizer, tokenizer.render_prompt(q, template)) for q in questions]


def check_prompt_lengths(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int,
                         names: Sequence[str] | None = None) -> None:
    """Raise a clear error if a prompt leaves less than max_new_tokens of the context window."""
    room = max_seq_len - max_new_tokens
    for i, ids in enumerate(prompt_ids):
        if len(ids) > room:
            who = names[i] if names is not None else f"#{i}"
            raise ValueError(f"prompt {who} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                             f"it exceeds the model's max_seq_len {max_seq_len}: lower max_new_tokens "
                             f"or shorten the problems")


def sample_completions(
    sampler: Sampler,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n: int,
    params: SamplingParams,
    batch_size: int,
    seed: int,
    progress: Callable[..., Iterable[Any]] | None = None,
    desc: str = "sampling",
) -> list[list[Completion]]:
    """n completions for each encoded prompt, generated in batches.

    Under several ranks (`lm.distributed`) each rank generates every W-th batch, with the batch's
    own rows and seed, and every rank receives all of them: the result is the single-process
    one (same batches, same seeds), whatever the number of ranks.

    Args:
        sampler: anything with `generate(prompts, params, seed) -> list[Generation]`.
        tokenizer: decodes the generated ids.
        prompt_ids: one encoded prompt per question (see `encode_prompts`).
        n: samples per prompt.
        params: sampling parameters (temperature 0 = greedy, then n = 1 is enough).
        batch_size: rows per `generate` call.
        seed: batch b uses seed + b.
        progress: wraps the batch iterator (ctx.progress), optional.

    Returns:
        result[i][j] = sample j of prompt i.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    requests = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
    requests.sort(key=lambda r: len(prompt_ids[r[0]]))  # stable: ties keep (prompt, sample) order
    batches = [requests[s:s + batch_size] for s in range(0, len(requests), batch_size)]
    mine = distributed.shard_indices(len(batches))  # several ranks: whole batches, round-robin
    it: Iterable[int] = mine
    if progress is not None:
        it = progress(it, desc=desc, total=len(mine))
    done: list[list[Completion]] = []
    for b in it:
        batch = batches[b]
        gens = sampler.generate([list(prompt_ids[i]) for i, _ in batch], params, seed + b)
        if len(gens) != len(batch):
            raise RuntimeError(f"sampler returned {len(gens)} generations for {len(batch)} prompts")
        done.append([_completion(tokenizer, g, i, j) for (i, j), g in zip(batch, gens)])
    out: list[list[Completion | None]] = [[None] * n for _ in prompt_ids]
    for part in distributed.gather_shards(done, len(batches)):  # every rank gets every batch
        for c in part:
            out[c.prompt_index][c.sample] = c
    return out  # type: ignore[return-value]  # every slot filled above


def _completion(tokenizer: Tokenizer, g: Generation, i: int, j: int) -> Completion:
    lp = list(g.logprobs or [])
    return Completion(prompt_index=i, sample=j, text=completion_text(tokenizer, g),
                      n_tokens=len(g.token_ids), finish_reason=g.finish_reason, token_ids=tuple(g.token_ids),
                      logprob_mean=sum(lp) / len(lp) if lp else None)


def find_checkpoint(directory: Path) -> Path:
    """The lm checkpoint directory inside a stage artifact: `<dir>/checkpoint` if present, else
    `<dir>` itself (distill's students/<name>/ may be either)."""
    directory = Path(directory)
    inner = directory / "checkpoint"
    return inner if inner.is_dir() else directory


# ------------------------------------------------------------------------- shared stage plumbing

PROBLEM_COLUMNS = ("id", "prompt", "answer", "split", "language")


@dataclass(frozen=True)
class Problem:
    """The fields of a problems.parquet row the sampling stages use.

    Attributes:
        prompt: the question (for a chat-message problem, its last user turn).
        messages: the problem's chat messages when it came as a conversation (verl, TRL), else
            empty; prompts are then rendered from them (`question_of`).
        columns: the row's other columns (source, difficulty, data_source, extra_info parsed from
            its JSON, ...), passed to rewards as TRL passes dataset columns.
    """

    id: str
    prompt: str
    answer: str
    language: str
    messages: tuple[dict[str, str], ...] = ()
    columns: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def question(self) -> "str | list[dict[str, str]]":
        """What a template renders: the messages when there are some, else the prompt text."""
        return [dict(m) for m in self.messages] if self.messages else self.prompt


def read_problems(problems_dir: Path, split: str) -> list[Problem]:
    """The problems of one split, in file order, from the problems artifact directory.

    Raises ArtifactError (naming the file and the missing column) on a malformed file, and
    ValueError when the split is empty.
    """
    import json

    import pyarrow as pa

    from artifacts.store import read_table

    path = Path(problems_dir) / "problems.parquet"
    schema = pa.schema([(c, pa.string()) for c in PROBLEM_COLUMNS])
    table = read_table(path, schema)
    rows = []
    for r in table.to_pylist():
        if r["split"] != split:
            continue
        columns = {k: v for k, v in r.items() if k not in (*PROBLEM_COLUMNS, "messages")}
        if isinstance(columns.get("extra_info"), str):
            columns["extra_info"] = json.loads(columns["extra_info"])
        messages = tuple({"role": m["role"], "content": m["content"]} for m in r.get("messages") or ())
        rows.append(Problem(r["id"], r["prompt"], r["answer"], r["language"], messages, columns))
    if not rows:
        raise ValueError(f"{problems_dir}/problems.parquet has no {split!r} problems")
    return rows


def choose(n_total: int, max_n: int | None, seed: int) -> list[int]:
    """Indices of a seeded random subset of size max_n (all when None or larger), in order."""
    import numpy as np

    if max_n is None or max_n >= n_total:
        return list(range(n_total))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_total, size=max_n, replace=False))


def load_policy(checkpoint_dir: Path, device: str, dtype: str) -> tuple[Any, Tokenizer]:
    """Model and tokenizer of an lm checkpoint (safetensors + JSON: nothing is unpickled)."""
    from lm.checkpoint import load_checkpoint

    where = find_checkpoint(checkpoint_dir)
    model, tokenizer, _meta = load_checkpoint(where, device=device, dtype=dtype)
    if tokenizer is None:
        raise ValueError(f"checkpoint {where} has no tokenizer/: cannot render prompts or decode samples")
    return model, tokenizer


class TrainSamplingConfig(Protocol):
    """The Config fields cold_start and rejection_sampling share (both Configs have them)."""

    template: str
    max_prompts: int | None
    samples_per_prompt: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_at_answer: bool
    batch_size: int
    seed_offset: int


def sample_train_rows(cfg: TrainSamplingConfig, checkpoint_dir: Path, problems_dir: Path, ctx: Any,
                      sampler_factory: SamplerFactory | None, *, stage: str,
                      origin: str) -> tuple[list[dict[str, Any]], int]:
    """`samples_per_prompt` completions for each of a seeded subset of train prompts.

    `sampler_factory` None picks the context's (`pick_sampler`). Returns candidate rows
    (problem_id, prompt, completion, answer, language, sample, n_tokens, finish_reason, origin) in
    (prompt, sample) order, and the number of prompts sampled. `origin` names the checkpoint sampled
    from, or the server's model ("server:<model>") when the sampler has an `origin` of its own.
    """
    problems = read_problems(problems_dir, "train")
    seed = stage_seed(ctx.seed + cfg.seed_offset, stage)
    chosen = [problems[i] for i in choose(len(problems), cfg.max_prompts, seed)]
    model, tok = load_policy(checkpoint_dir, ctx.device, ctx.dtype)
    ids = encode_prompts(tok, [p.question for p in chosen], cfg.template)
    check_prompt_lengths(ids, cfg.max_new_tokens, model.config.max_seq_len, [p.id for p in chosen])
    params = sampling_params(tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, stop_at_answer=cfg.stop_at_answer)
    sampler = pick_sampler(sampler_factory, ctx)(model, tok, cfg.batch_size)
    origin = getattr(sampler, "origin", origin)
    ctx.log(f"{stage}: sampling {cfg.samples_per_prompt} x {len(chosen)} prompts from {origin}")
    samples = sample_completions(sampler, tok, ids,
                                 n=cfg.samples_per_prompt, params=params, batch_size=cfg.batch_size,
                                 seed=seed, progress=ctx.progress, desc=f"{stage} sampling")
    rows = [{"problem_id": p.id, "prompt": p.prompt, "completion": c.text, "answer": p.answer,
             "language": p.language, "sample": c.sample, "n_tokens": c.n_tokens,
             "finish_reason": c.finish_reason, "origin": origin, "messages": list(p.messages) or None}
            for p, per_prompt in zip(chosen, samples) for c in per_prompt]
    return rows, len(chosen)


# ------------------------------------------------------------------ TRL's conversational form

def messages_type() -> Any:
    """Arrow type of a chat-message list: list<struct<role: string, content: string>>."""
    import pyarrow as pa

    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def conversational(row: dict[str, Any], template: str, texts: Sequence[str]) -> dict[str, Any]:
    """A sampled row in TRL's conversational form, for SFTTrainer / DPOTrainer as they are.

    `prompt` becomes the chat messages of what the model was prompted with
    (`lm.chat_template.r1_conversation`: the problem's messages or its question, under the
    template's system turn) and each column in `texts` (``completion``, ``chosen``,
    ``rejected``) one assistant message; the plain strings stay as ``<name>_text``.
    """
    from lm.chat_template import r1_conversation

    out = dict(row)
    out["prompt_text"] = row["prompt"]
    out["prompt"] = r1_conversation(row.get("messages") or row["prompt"], template)
    for name in texts:
        out[f"{name}_text"] = row[name]
        out[name] = [{"role": "assistant", "content": row[name]}]
    return out
