"""Steps per second of the sft and GRPO (rl_zero) stages on 1 and on N processes (torchrun, gloo).

    python bench/scaling.py --procs 1 2 --sft-steps 20 --grpo-steps 4

`sft-fsdp` is sft again with `run.shard = "fsdp"` (FSDP2) on each process count above 1.

Builds its own inputs in a temporary folder (synthetic problems, a randomly initialised `micro`
model with a BPE tokenizer, clean cold-start traces), then runs each stage once per process count:
in this process for 1, through `pipeline.launch.launch_stage` (torchrun) for more. Reported per
stage and process count: wall seconds of the whole stage (launch, loading, training, writing) and
steps per second of it. The launch and the per-rank model loading are included on purpose: on a
small model they are the overhead that several processes add. On a 2-core CPU the gain is bounded
by the cores; the point of the numbers is correctness (the stages' tests check equality) and
overhead. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from lm.checkpoint import save_checkpoint  # noqa: E402
from lm.tokenizer import train_bpe  # noqa: E402
from pipeline.config import RunSettings, stage_module  # noqa: E402
from pipeline.launch import launch_stage  # noqa: E402
from stages import synthetic  # noqa: E402
from stages.context import StageContext  # noqa: E402
from stages.lm_training import new_model  # noqa: E402
from stages.problems import PROBLEMS_SCHEMA  # noqa: E402


def build_inputs(root: Path, n_train: int, n_test: int) -> dict[str, Path]:
    """problems/, base/checkpoint (random micro model), cold_start/ (clean traces)."""
    probs = synthetic.generate_problems(n_train + n_test, 0, difficulty_mix={1: 1.0})
    docs = synthetic.build_corpus(probs, synthetic.CorpusConfig(), 0)
    tok = train_bpe([d.text for d in docs], 300)
    save_checkpoint(root / "base" / "checkpoint", new_model("micro", tok.vocab_size, 0), tok, {"stage": "base"})
    rows = [{"id": f"p{i}", "prompt": p.question, "answer": p.answer, "split": "train" if i < n_train else "test",
             "source": "bench", "language": "en", "difficulty": 1} for i, p in enumerate(probs)]
    (root / "problems").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=PROBLEMS_SCHEMA), root / "problems" / "problems.parquet")
    (root / "cold_start").mkdir()
    pq.write_table(pa.table({"prompt": [p.question for p in probs[:n_train]],
                             "completion": [synthetic.render_clean_trace(p) for p in probs[:n_train]]}),
                   root / "cold_start" / "cold_start.parquet")
    return {"base": root / "base", "problems": root / "problems", "cold_start": root / "cold_start"}


def run_once(stage: str, section: dict, inputs: dict[str, Path], procs: int, work: Path, shard: str = "none") -> float:
    """Wall seconds of one run of `stage` on `procs` processes."""
    out, scratch = work / f"{stage}-{procs}-{shard}", work / f"{stage}-{procs}-{shard}-work"
    out.mkdir()
    scratch.mkdir()
    module = stage_module(stage)
    inputs = {k: inputs[k] for k in module.INPUTS}
    t0 = time.perf_counter()
    if procs == 1:
        ctx = StageContext(seed=0, run_dir=scratch, log=lambda _: None, progress=lambda it, **_: it)
        module.run(module.Config(**section), inputs, out, ctx)
    else:
        run = RunSettings(nproc_per_node=procs, shard=shard)
        launch_stage(stage, {"run": run.model_dump(), stage: section}, None, inputs, out, scratch, run=run,
                     seed=0, device="cpu", dtype="fp32", log=lambda _: None)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sft-steps", type=int, default=20)
    ap.add_argument("--grpo-steps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sections = {
        "sft": ({"max_steps": args.sft_steps, "batch_size": 8, "autocast": False, "template": None,
                 "eval_every": 10 ** 6, "checkpoint_every": 10 ** 6, "log_every": 10 ** 6}, args.sft_steps),
        "rl_zero": ({"steps": args.grpo_steps, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 32,
                     "eval_every": 0, "eval_problems": 4, "eval_samples": 1, "checkpoint_every": 10 ** 6,
                     "autocast": False}, args.grpo_steps),
    }
    result: dict = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "stages": {}}
    with tempfile.TemporaryDirectory(prefix="r1flow-scaling-") as tmp:
        inputs = build_inputs(Path(tmp) / "in", 64, 16)
        runs = [(stage, stage, "none", args.procs) for stage in sections]
        runs.append(("sft-fsdp", "sft", "fsdp", [p for p in args.procs if p > 1]))
        for label, stage, shard, counts in runs:
            section, steps = sections[stage]
            per = {}
            for procs in counts:
                seconds = run_once(stage, section, inputs, procs, Path(tmp), shard)
                per[str(procs)] = {"seconds": round(seconds, 2), "steps_per_s": round(steps / seconds, 3)}
                print(f"{label} x{procs}: {seconds:.1f} s", file=sys.stderr)
            result["stages"][label] = {"steps": steps, "procs": per}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
