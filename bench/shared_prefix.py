"""Seconds per training step with a batch's shared prompt prefix run once vs every row run whole.

    python bench/shared_prefix.py --model smollm2-135m --batch 8 --steps 3 --threads 2

SFT and distill batches under a chat template open with the same system turn and worked example
(`lm.logprobs.sequence_hidden` runs that prefix once when it skips >= 25% of the positions). The
batch here is the `smollm2-135m` preset's prompt (its system prompt and few-shot turn, template
chat_think) on distinct one-digit questions with short worked answers, as that preset's traces are.
Two steps are timed, each forward + backward, alternating shared / whole (the threshold set past 1),
best of --steps each: `sft` (cross-entropy, `lm_loss_sum`) and `distill` (the student = every other
block of the model, token-level KD to the whole model, `distill_loss_sum`). The losses of the two
ways are printed too (equal up to fp32 rounding). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import tomllib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lm import logprobs  # noqa: E402
from lm.loading import load_model  # noqa: E402
from stages.distill import prune_layers  # noqa: E402
from stages.lm_training import collate, distill_loss_sum, lm_loss_sum, render_prompts, tokenize_pairs  # noqa: E402


def preset_batch(tok, batch: int, seed: int):
    """`batch` rows of the smollm2-135m preset's prompt on distinct questions, right-padded."""
    problems = tomllib.loads((REPO / "pipeline/presets/smollm2-135m.toml").read_text())["problems"]
    turns = [{"role": "system", "content": problems["system_prompt"]}]
    for shot in problems["few_shot"]:
        turns += [{"role": "user", "content": shot["user"]}, {"role": "assistant", "content": shot["assistant"]}]
    pairs = random.Random(seed).sample([(a, b) for a in range(10) for b in range(10)], batch)
    questions = [turns + [{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in pairs]
    answers = [f"{a} + {b} = {a + b}.\n</think>\n<answer>{a + b}</answer>" for a, b in pairs]
    examples, _ = tokenize_pairs(tok, render_prompts(tok, questions, "chat_think"), answers, 512)
    return collate(examples, tok.pad_id)


def timed(loss_fn, model, batch, shared: bool) -> tuple[float, float]:
    logprobs.SHARED_PREFIX_MIN_SAVING = 0.25 if shared else 2.0  # 2.0: never worth it, every row whole
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = loss_fn(batch) / batch.n_targets
    loss.backward()
    return time.perf_counter() - t0, float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="what `lm.loading.load_model` takes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per way (best is kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    student = prune_layers(model, list(range(0, model.config.n_layers, 2))).train()
    batch = preset_batch(tok, args.batch, args.seed)
    Lp = logprobs.shared_prefix_length(batch.ids, batch.attention)
    cases = {"sft": (model, lambda b: lm_loss_sum(model, b)),  # the model trained, then frozen as the teacher
             "distill": (student, lambda b: distill_loss_sum(student, model, b, kd_weight=1.0, temperature=1.0))}
    out = {"model": args.model, "batch": list(batch.ids.shape), "shared_prefix": Lp, "threads": args.threads}
    for name, (trained, fn) in cases.items():
        model.train(name == "sft").requires_grad_(name == "sft")
        best = {"shared": float("inf"), "whole": float("inf")}
        losses = {}
        for _ in range(args.steps):
            for way in best:
                secs, losses[way] = timed(fn, trained, batch, way == "shared")
                best[way] = min(best[way], secs)
        out[name] = {"shared_s": round(best["shared"], 3), "whole_s": round(best["whole"], 3),
                     "speedup": round(best["whole"] / best["shared"], 2),
                     "loss_shared": round(losses["shared"], 6), "loss_whole": round(losses["whole"], 6)}
        print(name, out[name], flush=True)
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
