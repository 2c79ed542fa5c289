"""`r1flow generate`: sample from any model r1flow can load.

SOURCE is a run's stage (`RUN_ID/STAGE`, or `RUN_ID/distill/students/NAME`), a checkpoint
directory, a `.gguf` file, a Hugging Face safetensors directory, or a preset (`smollm2-135m`).

Without `--chat` the prompt is encoded as given (special-token strings are honoured), with a BOS
token only if the model's tokenizer asks for one. With `--chat` the prompt is wrapped in the
model's own chat template when it has one (R1-Zero's instruction as the system turn), else in
r1flow's R1-Zero template. `--json` prints one object: text, token_ids, logprobs (one per generated
token) and top_logprobs (the 5 most likely tokens at the first generated position).

A model inside the artifact store is verified against its manifest first (cheaply: see
`artifacts.store.HashCache`), so a corrupted checkpoint is an error, not output. Non-finite
log-probabilities (NaN weights in a file outside the store) are an error too, never printed.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from artifacts import ArtifactError, RunStore, enclosing_artifact, verify


class GenerationError(ArtifactError):
    """The model produced something that is not a sample (non-finite log-probabilities)."""


def resolve_source(source: str, root: Path) -> str:
    """Map `RUN_ID/STAGE[/sub/path]` to the artifact directory; anything else passes through."""
    parts = source.strip("/").split("/")
    if len(parts) >= 2 and not Path(source).exists() and RunStore(root).exists(parts[0]):
        record = RunStore(root).load(parts[0])
        entry = record.stages.get(parts[1])
        if entry is None or not entry.path:
            raise ArtifactError(f"run {parts[0]} has no {parts[1]} checkpoint")
        return str(Path(entry.path, *parts[2:]))
    return source


def verify_if_artifact(source: str) -> None:
    """Check the artifact holding `source` (if it is in one) against its manifest's hashes."""
    if Path(source).exists():
        artifact = enclosing_artifact(source)
        if artifact is not None:
            verify(artifact)


def check_finite(logprobs: list[float], where: str) -> None:
    bad = sum(not math.isfinite(x) for x in logprobs)
    if bad:
        raise GenerationError(f"the model produced {bad} non-finite log-probabilities {where}; "
                              "its weights are likely corrupt (NaN/inf)")


def build_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.render_prompt(prompt, "chat" if tokenizer.chat_template else "r1_zero")
    else:
        text = prompt
    ids = tokenizer.encode(text, allow_special=True)
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from lm.loading import load_model
    from lm.sampler import SamplingParams, TorchSampler
    from lm.train import resolve_device

    device = resolve_device(args.device)
    source = resolve_source(args.model, Path(args.root))
    verify_if_artifact(source)
    model, tokenizer = load_model(source, device=device, dtype=args.dtype)
    model.eval()
    ids = build_prompt(tokenizer, args.prompt, args.chat)
    with torch.inference_mode():  # the first position first: NaN weights stop here, before sampling
        logits = model(torch.tensor([ids], device=device))[0, -1].float()  # [vocab]
        first = torch.log_softmax(logits, dim=-1)  # [vocab]
    check_finite(first.tolist(), "at the first position")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            stop_token_ids=tuple(t for t in (tokenizer.eos_id,) if t is not None))
    gen = TorchSampler(model, tokenizer).generate([ids], params, seed=args.seed)[0]
    check_finite(gen.logprobs, "for the generated tokens")
    text = tokenizer.decode(gen.token_ids)
    if not args.json:
        print(text)
        return 0
    top = first.topk(5)
    top_logprobs = [{"id": int(i), "token": tokenizer.decode([int(i)]), "logprob": float(v)}
                    for v, i in zip(top.values, top.indices)]
    print(json.dumps({"text": text, "token_ids": gen.token_ids, "logprobs": gen.logprobs,
                      "finish_reason": gen.finish_reason, "prompt_tokens": len(ids),
                      "top_logprobs": top_logprobs}, ensure_ascii=False, allow_nan=False))
    return 0
