"""GRPO-shaped work on completions of natural, varied length: each saving measured on and off.

    python bench/rollouts.py --run RUN_ID --root DIR      # a finished `r1flow run` (tiny preset)

`bench/grpo_step.py` and `bench/sampler.py` force every completion to full length (to compare with
TRL and transformers on equal terms), so they cannot show what only completions that stop at
different lengths gain. This script takes a trained policy (the run's rl_zero checkpoint) and its
train prompts and times, alternating the two ways `--repeats` times and keeping each one's best:

- `generate`: one GRPO step's rollouts (`--prompts` x `--group`, T 1.0, up to `--new-tokens`)
  with the sampler dropping finished rows (`TorchSampler.drop_finished`) and without;
- `train`: the policy's forward/backward plus the reference's forward on those rollouts, with
  padding skipped (`Transformer.forward(packed=...)`, `lm.logprobs.PACK_MIN_PADDING`) and without;
- `evaluate`: `--eval-rows` completions at T 0.6 / top-p 0.95 decoded 64 at a time (the old
  default batch) and 256 at a time (the new one).

Each case also checks that both ways give the same tokens (log-probs to 1e-5). The last line
printed is one JSON object, with the load average before and after (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from artifacts import RunStore  # noqa: E402
from lm import logprobs  # noqa: E402
from lm.checkpoint import load_checkpoint  # noqa: E402
from lm.logprobs import completion_logprobs  # noqa: E402
from lm.sampler import TorchSampler  # noqa: E402
from stages.grpo import build_batch  # noqa: E402
from stages.sampling import encode_prompts, sampling_params  # noqa: E402


def best_of(ways: dict, repeats: int) -> dict[str, float]:
    """Alternate the ways `repeats` times; each one's best seconds."""
    best = {name: float("inf") for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: round(s, 4) for name, s in best.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a finished tiny-preset run")
    p.add_argument("--root", type=Path, default=REPO / "r1flow-data")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--eval-rows", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    record = RunStore(args.root).load(args.run)
    rl_zero = args.root / record.stages["rl_zero"].path
    problems = args.root / record.stages["problems"].path / "problems.parquet"
    policy, tok, _ = load_checkpoint(rl_zero / "checkpoint")
    reference = load_checkpoint(rl_zero / "checkpoint")[0].eval()
    questions = [r["prompt"] for r in pq.read_table(problems).to_pylist() if r["split"] == "train"]
    template = record.config.get("rl_zero", {}).get("template", "r1_zero_short")
    prompt_ids = encode_prompts(tok, questions, template)
    out: dict = {"run": args.run, "threads": args.threads}

    # one GRPO step's rollouts, sampled as the rl_zero stage does
    G, P = args.group, args.prompts
    rows = [prompt_ids[i] for i in range(P) for _ in range(G)]
    seeds = [i // G for i in range(P * G)]
    params = sampling_params(tok, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0)
    policy.eval()
    gens = {}

    def generate(drop: bool):
        def fn():
            TorchSampler.drop_finished = drop
            gens[drop] = TorchSampler(policy, tok, max_batch_size=P * G).generate(rows, params, seeds)
        return fn

    out["generate_s"] = best_of({"drop_finished": generate(True), "keep_finished": generate(False)}, args.repeats)
    TorchSampler.drop_finished = True
    assert [g.token_ids for g in gens[True]] == [g.token_ids for g in gens[False]], "dropping changed a sample"
    lengths = [len(g.token_ids) for g in gens[True]]
    out["completion_len"] = {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)}

    # the policy's forward/backward and the reference's forward on them
    batch = build_batch([prompt_ids[i] for i in range(P)], gens[True], G, torch.zeros(P * G), tok.pad_id,
                        False, "cpu")
    out["padding_share"] = round(1 - float(batch.completion_real.float().mean()), 3)
    policy.train()
    values = {}

    def train(packed: bool):
        def fn():
            logprobs.PACK_MIN_PADDING = 0.1 if packed else 2.0  # 2.0: never, the padded batch as it is
            policy.zero_grad(set_to_none=True)
            lp = completion_logprobs(policy, batch)
            lp.sum().backward()
            with torch.inference_mode():
                values[packed] = (lp.detach(), completion_logprobs(reference, batch))
        return fn

    out["train_s"] = best_of({"packed": train(True), "padded": train(False)}, args.repeats)
    logprobs.PACK_MIN_PADDING = 0.1
    for a, b in zip(values[True], values[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    # evaluation-style decoding at two batch sizes
    policy.eval()
    n = args.eval_rows
    eval_rows = [prompt_ids[P + i // 4] for i in range(n)]
    eval_params = sampling_params(tok, max_new_tokens=128, temperature=0.6, top_p=0.95)
    tokens = {}

    def evaluate(batch_size: int):
        def fn():
            gs = TorchSampler(policy, tok, max_batch_size=batch_size, frozen=True).generate(eval_rows, eval_params, 0)
            tokens[batch_size] = sum(len(g.token_ids) for g in gs)
        return fn

    out["evaluate_s"] = best_of({"batch_64": evaluate(64), "batch_256": evaluate(256)}, max(1, args.repeats // 2))
    out["evaluate_tokens"] = tokens
    out["speedup"] = {"generate": round(out["generate_s"]["keep_finished"] / out["generate_s"]["drop_finished"], 2),
                      "train": round(out["train_s"]["padded"] / out["train_s"]["packed"], 2),
                      "evaluate": round(out["evaluate_s"]["batch_64"] / out["evaluate_s"]["batch_256"], 2)}
    out["loadavg_before"] = [round(x, 2) for x in load_before]
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
