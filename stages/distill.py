"""The `distill` stage: smaller students trained on the teacher's reasoning traces.

Where from: DeepSeek-R1 (DeepSeek-AI 2025), sec. 2.4: small dense models fine-tuned on the ~800k
samples curated with the RL-trained model (its rejection-sampled reasoning data) beat the same
small models trained with RL directly. That is sequence-level knowledge distillation (Kim & Rush
2016): plain SFT on the teacher's outputs, here `rejection_sampling`'s `reasoning_sft.parquet`
(prompt, completion), loss on completion tokens only. Optionally (`kd_weight > 0`) the token-level
term of Hinton et al. (2015) is added: KL from the teacher's (the rl_reasoning checkpoint's)
temperature-softened next-token distribution, which needs the teacher's vocabulary.

Students (`students`, each a `StudentSpec`) start from scratch, an lm preset with the teacher's
tokenizer and vocabulary, or from a checkpoint (`init`) with that checkpoint's own tokenizer
(sequence-level distillation works across vocabularies; token-level KD does not and says so), or
from the teacher itself with some blocks dropped (`init = "teacher"`, `keep_layers = [0, 2, ...]`):
depth pruning then distillation, as Minitron (Muralidharan et al. 2024) compresses a pretrained
model, for when no smaller pretrained model of the teacher's family is at hand.

With `baseline = true` each student architecture is also trained from the same starting weights,
for the same number of optimizer steps and batch size, on the base pretraining corpus alone
(problems' `corpus.parquet`): the control that shows what the teacher's data adds (issue 8's
outcome: the distilled student beats it). A problem set without a corpus skips the baselines and
says so in the log and the summary (`baselines = 0`).

R1 distilled into *pretrained* small models (Qwen2.5, Llama 3). `pretrain_steps > 0` does the same
at toy scale: each student is first pretrained on the corpus for that many steps (phase 1, shared:
it is also the baseline's start), then the student trains `steps` steps on the teacher's traces
while its baseline trains `steps` more steps on the corpus, continuing where phase 1 stopped. The
two then differ only in the data of those last `steps` steps. With `pretrain_steps = 0` students
start untrained, which on a few hundred traces teaches the format but little arithmetic.

`mode = "on_policy"` replaces SFT on the traces with on-policy distillation (GKD, Agarwal et al.
2024; Lu et al. 2025, `stages/distill_loss.py`): each step the student samples one completion
(temperature 1, up to `max_new_tokens`) for each of `batch_size` train prompts, the teacher scores
every sampled token, and the per-token reverse KL log π_s − log π_t is the loss's per-token
penalty. The teacher must read the student's ids as the same strings: a student whose tokenizer
differs from the teacher's is an error. The held-out validation loss is still the cross-entropy on
the teacher's traces, so the two modes are measured alike; the step budget (`steps`) is the same.

Outputs: `students/<name>/` and `baselines/<name>/` (lm.checkpoint directories),
`metrics.parquet` (student, step, name, value) with `student` = "<name>", "baseline:<name>" or
"pretrain:<name>" (phase 1).
Each training resumes from its own folder of `ctx.run_dir`; a finished one is not redone.
"""
from __future__ import annotations

import dataclasses
import re
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from artifacts.store import write_table
from lm.checkpoint import load_checkpoint, save_checkpoint
from lm.model import MODEL_PRESETS, Transformer
from lm.logprobs import token_logprobs
from lm.sampler import TorchSampler
from lm.tokenizer import Tokenizer
from lm.train import autocast_context, check_finite, clip_grad, make_optimizer, resolve_device, set_lr
from stages.context import StageContext
from stages.distill_loss import reverse_kl_loss
from stages.lm_training import (Batch, BatchPlan, Example, LossFn, Metrics, collate, distill_loss_sum, encode_prompt,
                                fixed_batches, lm_loss_sum, lr_schedule, new_model, read_pairs, read_text_columns,
                                render_prompts, save_resume, split_by_group, start_or_resume, tokenize_documents,
                                train_loop, validation_loss)
from stages.metrics import METRICS_FIELDS
from stages.sampling import TemplateName, check_prompt_lengths, read_problems, sampling_params, stage_seed

INPUTS: tuple[str, ...] = ("rejection_sampling", "rl_reasoning", "problems")
METRICS_SCHEMA = pa.schema([pa.field("student", pa.string(), nullable=False), *METRICS_FIELDS])
SCHEMAS: dict[str, pa.Schema] = {"metrics.parquet": METRICS_SCHEMA}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


TEACHER = "teacher"  # StudentSpec.init: a depth-pruned copy of the teacher


class StudentSpec(BaseModel):
    """One student: its name (the output folder), its lm preset, and an optional starting point:
    a checkpoint directory, or `init = "teacher"` with `keep_layers` (the teacher with only those
    transformer blocks, initialised from the teacher's weights: depth pruning as in Minitron,
    Muralidharan et al. 2024, before distillation)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    model: str | None = Field(None, description="lm MODEL_PRESETS name; defaults to `name`")
    init: str | None = Field(None, description="checkpoint directory to start from instead of scratch, "
                                               "or \"teacher\" (with keep_layers)")
    keep_layers: list[int] | None = Field(None, description="init = \"teacher\": the teacher's blocks the "
                                                            "student keeps, e.g. every other one [0, 2, 4, ...]")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _SAFE_NAME.fullmatch(v):
            raise ValueError(f"student name {v!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
        return v

    @model_validator(mode="after")
    def _preset(self) -> "StudentSpec":
        if (self.init == TEACHER) != (self.keep_layers is not None):
            raise ValueError(f"student {self.name!r}: keep_layers goes with init = \"teacher\" (a pruned copy of "
                             "the teacher), and init = \"teacher\" needs keep_layers")
        if self.keep_layers is not None:
            keep = self.keep_layers
            if not keep or any(i < 0 for i in keep) or keep != sorted(set(keep)):
                raise ValueError(f"student {self.name!r}: keep_layers must be distinct block indices >= 0 in "
                                 f"increasing order, got {keep}")
        if self.model is None:
            self.model = self.name
        if self.init is None and self.model not in MODEL_PRESETS:
            raise ValueError(f"student {self.name!r}: unknown model preset {self.model!r}; "
                             f"the presets are: {', '.join(MODEL_PRESETS)} (or give `init`)")
        return self


class Config(BaseModel):
    """Knobs of the distill stage; defaults train the tiny preset's student (and its baseline): 300
    shared corpus steps, then 600 steps each: 4.5-6 minutes on 2 CPU cores in fp32 (279-342 s measured)."""

    model_config = ConfigDict(extra="forbid")

    students: list[StudentSpec] = Field(default_factory=lambda: [StudentSpec(name="tiny-student")])
    mode: Literal["sft", "on_policy"] = Field("sft", description="sft: SFT on the teacher's traces; on_policy: "
                                                                "the student samples, the teacher scores its tokens")
    max_new_tokens: int = Field(128, ge=1, description="on_policy: tokens the student samples per prompt")
    baseline: bool = Field(True, description="also train each student on the base corpus alone")
    template: TemplateName | None = Field("r1_zero_short", description="chat template for the prompt column; "
                                                             "None = prompts are already rendered")
    seq_len: int = Field(256, ge=8)
    pretrain_steps: int = Field(300, ge=0, description="corpus steps before distillation, shared by each "
                                                   "student and its baseline (0: students start untrained)")
    loss_after: str | None = Field("Assistant:", description="corpus documents: loss only after this marker "
                                                              "(as in base pretraining); None = every token")
    steps: int = Field(600, ge=1, description="distillation steps per student (and corpus steps per baseline)")
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    clip: float = Field(1.0, ge=0)
    autocast: bool = Field(True, description="bf16 autocast for forward/backward (fp32 master weights) where the device does bf16 natively")
    kd_weight: float = Field(0.0, ge=0, description="weight of token-level KL to the teacher (0: off)")
    kd_temperature: float = Field(1.0, gt=0)
    val_fraction: float = Field(0.05, ge=0, lt=1, description="held-out share of the teacher's traces")
    val_max: int = Field(64, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _mode(self) -> "Config":
        if self.mode == "on_policy" and self.kd_weight > 0:
            raise ValueError("kd_weight is the token-level KD term of mode = 'sft'; on_policy already "
                             "matches the teacher token by token: set kd_weight = 0")
        return self

    @field_validator("students")
    @classmethod
    def _unique(cls, v: list[StudentSpec]) -> list[StudentSpec]:
        names = [s.name for s in v]
        if not names:
            raise ValueError("distill needs at least one student")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"student names must be unique; repeated: {dup}")
        return v


def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext) -> dict[str, Any]:
    """Train every configured student (and its baseline) and write their checkpoints and metrics."""
    t0 = time.perf_counter()
    device = resolve_device(ctx.device)
    teacher, teacher_tok, _ = load_checkpoint(inputs["rl_reasoning"] / "checkpoint", device=device, dtype="fp32")
    if teacher_tok is None:
        raise ValueError(f"{inputs['rl_reasoning'] / 'checkpoint'} has no tokenizer")
    teacher.requires_grad_(False)
    traces_path = inputs["rejection_sampling"] / "reasoning_sft.parquet"
    corpus = None
    if cfg.baseline or cfg.pretrain_steps > 0:
        corpus = _read_corpus(inputs["problems"] / "corpus.parquet", cfg, ctx)

    summary: dict[str, Any] = {"students": len(cfg.students), "teacher_params": teacher.num_params(),
                               "mode": cfg.mode}
    tables = []
    prompt_ids: list[list[int]] | None = None  # on_policy: the train prompts, encoded once
    for spec in cfg.students:
        seed = _student_seed(ctx.seed, spec.name)
        student, tok = _init_student(spec, teacher, teacher_tok, device, seed)
        if student.num_params() >= teacher.num_params():
            ctx.log(f"distill: warning: student {spec.name!r} has {student.num_params():,} parameters, not fewer "
                    f"than the teacher's {teacher.num_params():,}: this is not distillation into a smaller model")
        if cfg.kd_weight > 0 and student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"student {spec.name!r}: token-level KD (kd_weight > 0) needs the teacher's "
                             f"vocabulary ({teacher.config.vocab_size}), the student has "
                             f"{student.config.vocab_size}; set kd_weight = 0 for sequence-level only")
        max_len = min(cfg.seq_len, student.config.max_seq_len)
        examples, _ = read_pairs(traces_path, tok, cfg.template, max_len, "distill")
        train_idx, val_idx = split_by_group([e.group for e in examples], cfg.val_fraction, cfg.val_max, ctx.seed)
        train = [examples[i] for i in train_idx]
        val_batches = fixed_batches([examples[i] for i in val_idx], cfg.batch_size, tok.pad_id)
        docs = tokenize_documents(tok, corpus, max_len, cfg.loss_after)[0] if corpus is not None else None

        if cfg.pretrain_steps > 0:  # phase 1, shared by the student and its baseline
            name = f"pretrain:{spec.name}"
            metrics = _train(name, student, tok, docs, val_batches, lm_loss_sum, seed, cfg.pretrain_steps, cfg, ctx)
            tables.append(metrics.table(student=name))
            summary[f"{name}.val_loss"] = metrics.last("val_loss")
        start_weights = {k: v.detach().clone() for k, v in student.state_dict().items()}

        def loss_fn(model: Transformer, batch: Batch) -> torch.Tensor:
            return distill_loss_sum(model, teacher, batch, kd_weight=cfg.kd_weight, temperature=cfg.kd_temperature)

        if cfg.mode == "on_policy":
            check_same_tokenizer(spec.name, tok, teacher_tok)
            if prompt_ids is None:
                prompt_ids = _train_prompt_ids(inputs["problems"], tok, cfg)
            check_prompt_lengths(prompt_ids, cfg.max_new_tokens, student.config.max_seq_len)
            metrics = _train_on_policy(spec.name, student, teacher, tok, prompt_ids, val_batches, seed, cfg, ctx)
        else:
            metrics = _train(spec.name, student, tok, train, val_batches, loss_fn, seed, cfg.steps, cfg, ctx)
        save_checkpoint(out / "students" / spec.name, student.eval(), tok,
                        {"stage": "distill", "role": "student", "model": spec.model, "init": spec.init,
                         "keep_layers": spec.keep_layers,
                         "template": cfg.template, "kd_weight": cfg.kd_weight, "pretrain_steps": cfg.pretrain_steps,
                         "steps": cfg.steps, "mode": cfg.mode})
        tables.append(metrics.table(student=spec.name))
        summary.update(_headline(spec.name, student, metrics, teacher))
        summary[f"{spec.name}.examples"] = len(train)

        if cfg.baseline and docs is not None:
            baseline, _ = _init_student(spec, teacher, teacher_tok, device, seed)
            baseline.load_state_dict(start_weights)  # the student's starting point, phase 1 included
            name = f"baseline:{spec.name}"
            metrics = _train(name, baseline, tok, docs, val_batches, lm_loss_sum, seed, cfg.steps, cfg, ctx,
                             data_offset=cfg.pretrain_steps)
            save_checkpoint(out / "baselines" / spec.name, baseline.eval(), tok,
                            {"stage": "distill", "role": "baseline", "model": spec.model, "init": spec.init,
                             "keep_layers": spec.keep_layers,
                             "pretrain_steps": cfg.pretrain_steps, "steps": cfg.steps, "data": "corpus.parquet"})
            tables.append(metrics.table(student=name))
            summary.update(_headline(name, baseline, metrics, teacher))

    summary["baselines"] = len(cfg.students) if cfg.baseline and corpus is not None else 0
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_table(pa.concat_tables(tables), out / "metrics.parquet", METRICS_SCHEMA)
    return summary


def _train(name: str, model: Transformer, tok: Tokenizer, train: list[Example], val_batches: list[Batch],
           loss_fn: LossFn, seed: int, steps: int, cfg: Config, ctx: StageContext, data_offset: int = 0) -> Metrics:
    """The training loop of one phase of one student: `steps` steps of warmup + cosine AdamW.

    Args:
        data_offset: optimizer steps of this data already consumed by an earlier phase (the
            baseline continues the corpus where the shared pretraining phase stopped).

    The validation loss is always the plain cross-entropy on the held-out teacher traces, so a
    student and its baseline are measured on the same thing.
    """
    device = resolve_device(ctx.device)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    plan = BatchPlan([len(e) for e in train], cfg.batch_size, seed)
    state_dir, start, metrics = start_or_resume(ctx, name.replace(":", "-"), model, optimizer, steps,
                                                f"distill {name}")
    return train_loop(model, optimizer, train, plan, loss_fn, cfg, steps=steps, start=start, metrics=metrics,
                      pad_id=tok.pad_id, val_batches=val_batches, device=device, ctx=ctx,
                      label=f"distill {name}", state_dir=state_dir, data_offset=data_offset)


def check_same_tokenizer(name: str, student: Tokenizer, teacher: Tokenizer) -> None:
    """On-policy distillation scores the student's token ids with the teacher: both must map every
    id to the same bytes (and the same special tokens). ValueError naming the first difference."""
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(f"distill.mode = 'on_policy': student {name!r} has a tokenizer of {student.vocab_size} ids, "
                         f"the teacher's has {teacher.vocab_size}; on-policy distillation needs the teacher's "
                         "tokenizer (use mode = 'sft', which works across vocabularies)")
    if student.special_tokens != teacher.special_tokens:
        raise ValueError(f"distill.mode = 'on_policy': student {name!r} and the teacher have different special "
                         "tokens; on-policy distillation needs the teacher's tokenizer (use mode = 'sft')")
    for i in range(student.vocab_size):
        if student.token_bytes(i) != teacher.token_bytes(i):
            raise ValueError(f"distill.mode = 'on_policy': student {name!r}'s token {i} is "
                             f"{student.token_bytes(i)!r}, the teacher's {teacher.token_bytes(i)!r}; on-policy "
                             "distillation needs the teacher's tokenizer (use mode = 'sft')")


def _train_prompt_ids(problems_dir: Path, tok: Tokenizer, cfg: Config) -> list[list[int]]:
    """The train split's questions, rendered and encoded as sampling does."""
    questions = [p.prompt for p in read_problems(problems_dir, "train")]
    if not questions:
        raise ValueError(f"{problems_dir}: no train problems for on-policy distillation to sample from")
    return [encode_prompt(tok, text) for text in render_prompts(tok, questions, cfg.template)]


def on_policy_batch(prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """Prompt + sampled completion per row, right-padded; loss on the completion's tokens."""
    examples = [Example(np.asarray(p + c, dtype=np.int64),
                        np.concatenate([np.zeros(len(p), dtype=bool), np.ones(len(c), dtype=bool)]))
                for p, c in zip(prompt_ids, completions)]
    return collate(examples, pad_id)


def _train_on_policy(name: str, student: Transformer, teacher: Transformer, tok: Tokenizer,
                     prompt_ids: list[list[int]], val_batches: list[Batch], seed: int, cfg: Config,
                     ctx: StageContext) -> Metrics:
    """`cfg.steps` steps of on-policy distillation (see the module docstring).

    Step s draws its prompts and sampling seed from (seed, s) alone, so a resumed run continues
    exactly; warmup + cosine AdamW, gradient clipping, the resume state every `checkpoint_every`
    steps, the validation loss at the end, as `lm_training.train_loop` does for SFT.
    """
    device = resolve_device(ctx.device)
    student.to(device).train()
    optimizer = make_optimizer(student, cfg.lr, cfg.weight_decay)
    state_dir, start, metrics = start_or_resume(ctx, name.replace(":", "-"), student, optimizer, cfg.steps,
                                                f"distill {name}")
    sampler = TorchSampler(student, tok, max_batch_size=cfg.batch_size)
    params = sampling_params(tok, max_new_tokens=cfg.max_new_tokens, temperature=1.0, top_p=1.0, stop_at_answer=True)
    dtype = "bf16" if cfg.autocast else "fp32"
    n = min(cfg.batch_size, len(prompt_ids))
    for step in ctx.progress(range(start, cfg.steps), desc=f"distill {name} (on-policy)", total=cfg.steps - start):
        lr = lr_schedule(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        idx = np.random.default_rng([seed, step]).choice(len(prompt_ids), size=n, replace=False)
        prompts = [prompt_ids[int(i)] for i in idx]
        student.eval()
        gens = sampler.generate(prompts, params, stage_seed(seed, f"on-policy:{step}"))
        student.train()
        batch = on_policy_batch(prompts, [list(g.token_ids) for g in gens], tok.pad_id).to(device)
        optimizer.zero_grad(set_to_none=True)
        t = time.perf_counter()
        with autocast_context(device, dtype):
            s_logp = token_logprobs(student, batch.ids, batch.attention, batch.loss_mask)  # [B, T]
            with torch.no_grad():
                t_logp = token_logprobs(teacher, batch.ids, batch.attention, batch.loss_mask)  # [B, T]
        loss, m = reverse_kl_loss(s_logp, t_logp, batch.loss_mask, batch.n_targets)
        check_finite("on-policy distillation loss", loss, step)
        loss.backward()
        grad_norm = clip_grad(student, cfg.clip)
        check_finite("grad_norm", grad_norm, step)
        optimizer.step()
        done = step + 1
        metrics.add(step, loss=float(m["loss"]), reverse_kl=float(m["reverse_kl"]), lr=lr, grad_norm=grad_norm,
                    completion_len=batch.n_targets / n, tokens=batch.n_tokens,
                    tokens_per_s=batch.n_tokens / (time.perf_counter() - t))
        if val_batches and done == cfg.steps:
            metrics.add(done, val_loss=validation_loss(student, val_batches, autocast=cfg.autocast, device=device))
        if done % cfg.log_every == 0:
            ctx.log(f"distill {name}: step {done}/{cfg.steps} reverse KL "
                    f"{metrics.tail_mean('reverse_kl', cfg.log_every):.4f} lr {lr:.2e}")
        if state_dir is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_resume(state_dir, student, optimizer, done, metrics)
    student.eval()
    return metrics


def _init_student(spec: StudentSpec, teacher: Transformer, teacher_tok: Tokenizer, device: str,
                  seed: int) -> tuple[Transformer, Tokenizer]:
    """A scratch student (preset shape, the teacher's vocabulary), the `init` checkpoint, or the
    teacher pruned to `keep_layers`."""
    if spec.init == TEACHER:
        return prune_layers(teacher, spec.keep_layers or []).to(device), teacher_tok
    if spec.init is None:
        return new_model(spec.model, teacher.config.vocab_size, seed).to(device), teacher_tok
    model, tok, _ = load_checkpoint(spec.init, device=device, dtype="fp32")
    return model, tok if tok is not None else teacher_tok


def prune_layers(model: Transformer, keep: list[int]) -> Transformer:
    """A copy of `model` with only the transformer blocks `keep` (in that order), every weight
    taken from `model`: embeddings, final norm and head as they are, kept block i's weights from
    block keep[i]. Depth pruning keeps the width, so the student shares the teacher's vocabulary
    (token-level KD works) and starts from what the teacher knows rather than from noise."""
    n = model.config.n_layers
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ValueError(f"keep_layers {bad} out of range: the teacher has {n} blocks (0..{n - 1})")
    student = Transformer(dataclasses.replace(model.config, n_layers=len(keep)))
    source = model.state_dict()
    weights = {}
    for name in student.state_dict():
        parts = name.split(".")
        if parts[0] == "layers":
            parts[1] = str(keep[int(parts[1])])
        weights[name] = source[".".join(parts)].detach().clone()
    student.load_state_dict(weights)
    return student.to(next(model.parameters()).dtype)


def _read_corpus(path: Path, cfg: Config, ctx: StageContext) -> list[str] | None:
    if not path.exists():
        if cfg.pretrain_steps > 0:
            raise FileNotFoundError(f"distill.pretrain_steps = {cfg.pretrain_steps} pretrains each student on "
                                    f"the problems corpus, but {path} does not exist (a user problem file has "
                                    "none): set distill.pretrain_steps = 0")
        ctx.log(f"distill: no {path.name} in the problems artifact (a user problem file has none): "
                "baselines skipped")
        return None
    return read_text_columns(path, ["text"], "the distill baseline")["text"]


def _headline(name: str, model: Transformer, metrics: Metrics, teacher: Transformer) -> dict[str, Any]:
    params = model.num_params()
    return {f"{name}.params": params,
            f"{name}.params_ratio": round(params / teacher.num_params(), 4),
            f"{name}.final_loss": metrics.tail_mean("loss", 10),
            f"{name}.val_loss": metrics.last("val_loss")}


def _student_seed(seed: int, name: str) -> int:
    """Initial weights and data order of one student (and its baseline): a function of the run
    seed and the student's name, so adding a student does not change the others."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)

