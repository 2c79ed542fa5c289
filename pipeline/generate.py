"""`r1flow generate`: sample from any model r1flow can load.

SOURCE is a run's stage (`RUN_ID/STAGE`), a distilled student (`RUN_ID/distill` when the run has
one student, `RUN_ID/student:NAME` as `evaluate` names it, or `RUN_ID/distill/NAME`), a checkpoint
directory, a `.gguf` file, a Hugging Face safetensors directory, or a preset (`smollm2-135m`).

The prompt is rendered the way the checkpoint was trained (`--template auto`, the default): the
template its stage recorded in the checkpoint's meta (or, for older checkpoints, the run's config
of that stage), so `--prompt "What is 38 + 47?"` reaches a tiny RL checkpoint as the
"User: ...\nAssistant:" it saw in training. `--template none` sends the text as given (special-token
strings honoured), `--template NAME` (or `--chat` for the model's own chat template) picks one. A BOS
token is added only if the tokenizer asks for one. `text` is the completion without control tokens
(end-of-text, padding); `--json` prints one object: text, token_ids, logprobs (one per generated
token), top_logprobs (the 5 most likely tokens at the first generated position) and the template.

A model inside the artifact store is verified against its manifest first (cheaply: see
`artifacts.store.HashCache`), so a corrupted checkpoint is an error, not output. Non-finite
log-probabilities (NaN weights in a file outside the store) are an error too, never printed.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from artifacts import ArtifactError, RunRecord, RunStore, verify_enclosing

STUDENT_PREFIX = "student:"


class GenerationError(ArtifactError):
    """The model produced something that is not a sample (non-finite log-probabilities)."""


def _student_dir(record: RunRecord, name: str | None) -> Path:
    """The checkpoint of a distilled student of `record` (the only one when `name` is None)."""
    entry = record.stages.get("distill")
    if entry is None or not entry.path:
        raise ArtifactError(f"run {record.run_id} has no distill artifact (distill is "
                            f"{entry.status if entry else 'absent'})")
    students = sorted(p.name for p in (Path(entry.path) / "students").iterdir() if p.is_dir()) \
        if (Path(entry.path) / "students").is_dir() else []
    if name is None:
        if len(students) != 1:
            raise ArtifactError(f"run {record.run_id} has {len(students)} students ({', '.join(students) or 'none'}); "
                                f"name one: {record.run_id}/student:NAME")
        name = students[0]
    if name not in students:
        raise ArtifactError(f"run {record.run_id} has no student {name!r}; its students: {', '.join(students) or 'none'}")
    return Path(entry.path) / "students" / name


def resolve_source(source: str, root: Path) -> tuple[str, str | None]:
    """(where to load from, the stage's template in the run's config or None) for SOURCE; a source
    that is not RUN_ID/... passes through."""
    parts = source.strip("/").split("/")
    if len(parts) < 2 or Path(source).exists() or not RunStore(root).exists(parts[0]):
        return source, None
    record = RunStore(root).load(parts[0])
    stage, rest = parts[1], parts[2:]
    if stage.startswith(STUDENT_PREFIX) and not rest:
        return str(_student_dir(record, stage[len(STUDENT_PREFIX):])), _stage_template(record, "distill")
    if stage == "distill" and (not rest or len(rest) == 1 or rest[0] == "students"):
        name = rest[-1] if rest else None
        return str(_student_dir(record, name)), _stage_template(record, "distill")
    entry = record.stages.get(stage)
    if entry is None or not entry.path:
        raise ArtifactError(f"run {parts[0]} has no {stage} checkpoint"
                            + (f" ({stage} is {entry.status})" if entry else f"; its stages: {', '.join(record.stages)}"))
    return str(Path(entry.path, *rest)), _stage_template(record, stage)


def check_finite(logprobs: list[float], where: str) -> None:
    bad = sum(not math.isfinite(x) for x in logprobs)
    if bad:
        raise GenerationError(f"the model produced {bad} non-finite log-probabilities {where}; "
                              "its weights are likely corrupt (NaN/inf)")


def _stage_template(record: RunRecord, stage: str) -> str | None:
    section = record.config.get(stage, {})
    return section.get("template") if isinstance(section, dict) else None


def checkpoint_template(source: str) -> str | None:
    """The template an r1flow checkpoint's stage recorded in its meta (None: not recorded / not r1flow)."""
    from lm.checkpoint import CheckpointError, is_checkpoint, read_meta

    for d in (Path(source), Path(source) / "checkpoint"):
        if d.is_dir() and is_checkpoint(d):
            try:
                meta = read_meta(d)
            except CheckpointError:
                return None
            template = meta.get("template") or (meta.get("config") or {}).get("template")
            return template if isinstance(template, str) else None
    return None


def pick_template(requested: str, chat: bool, recorded: str | None) -> str | None:
    """The template to render with: --chat, an explicit name, none, or (auto) the recorded one."""
    if chat:
        return "chat"
    if requested == "auto":
        return recorded
    return None if requested == "none" else requested


def build_prompt(tokenizer, prompt: str, template: str | None) -> list[int]:
    text = prompt if template is None else tokenizer.render_prompt(prompt, template)
    ids = tokenizer.encode(text, allow_special=True)
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


def visible_text(tokenizer, token_ids: list[int]) -> str:
    """The generated text without control tokens (end-of-text, padding, BOS); format tags such as
    <think> and <answer> are content and stay."""
    control = {t for t in (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id) if t is not None}
    return tokenizer.decode([t for t in token_ids if t not in control])


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from lm.loading import load_model
    from lm.sampler import SamplingParams, TorchSampler
    from lm.train import resolve_device

    device = resolve_device(args.device)
    source, run_template = resolve_source(args.model, Path(args.root))
    template = pick_template(args.template, args.chat, checkpoint_template(source) or run_template)
    if template is not None and template != "chat":
        from lm.chat_template import known_template

        try:
            known_template(template)
        except ValueError as e:
            raise ArtifactError(f"--template: {e} (or auto, none)") from e
    verify_enclosing(source)
    model, tokenizer = load_model(source, device=device, dtype=args.dtype)
    model.eval()
    if template == "chat" and not tokenizer.chat_template:
        template = "r1_zero"  # --chat on a model without its own chat template: R1-Zero's instruction
    ids = build_prompt(tokenizer, args.prompt, template)
    with torch.inference_mode():  # the first position first: NaN weights stop here, before sampling
        logits = model(torch.tensor([ids], device=device))[0, -1].float()  # [vocab]
        first = torch.log_softmax(logits, dim=-1)  # [vocab]
    check_finite(first.tolist(), "at the first position")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            stop_token_ids=tuple(t for t in (tokenizer.eos_id,) if t is not None))
    gen = TorchSampler(model, tokenizer).generate([ids], params, seed=args.seed)[0]
    check_finite(gen.logprobs, "for the generated tokens")
    text = visible_text(tokenizer, gen.token_ids)
    if not args.json:
        print(text)
        return 0
    top = first.topk(5)
    top_logprobs = [{"id": int(i), "token": tokenizer.decode([int(i)]), "logprob": float(v)}
                    for v, i in zip(top.values, top.indices)]
    print(json.dumps({"text": text, "token_ids": gen.token_ids, "logprobs": gen.logprobs,
                      "finish_reason": gen.finish_reason, "prompt_tokens": len(ids), "template": template,
                      "top_logprobs": top_logprobs}, ensure_ascii=False, allow_nan=False))
    return 0
