"""Stages on several processes (pipeline/launch.py, lm/distributed.py): torchrun with 2 gloo ranks
on the CPU must reproduce the single-process artifacts, name a failing rank, and publish nothing
when a rank fails."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import launch
from pipeline.config import RunSettings
from stages.context import StageContext
from tests.stages.test_distill import inputs  # noqa: F401  (fixture)
from tests.stages.test_sft import base_dir, write_cold_start  # noqa: F401  (fixture)

TWO = RunSettings(nproc_per_node=2)


def quiet(run_dir: Path | None = None) -> StageContext:
    return StageContext(seed=0, run_dir=run_dir, log=lambda _: None, progress=lambda it, **_: it)


def in_process(stage: str, section: dict, inputs: dict[str, Path], tmp: Path) -> tuple[Path, dict]:
    from pipeline.config import stage_module

    out = tmp / f"{stage}-1proc"
    out.mkdir()
    module = stage_module(stage)
    summary = module.run(module.Config(**section), inputs, out, quiet(tmp / f"{stage}-1proc-work"))
    return out, summary


def two_procs(stage: str, section: dict, inputs: dict[str, Path], tmp: Path, run: RunSettings = TWO,
              **kw) -> tuple[Path, dict]:
    tag = "2proc" if run.shard == "none" else f"2proc-{run.shard}"
    out, scratch = tmp / f"{stage}-{tag}", tmp / f"{stage}-{tag}-work"
    out.mkdir()
    scratch.mkdir()
    kw.setdefault("log", lambda _: None)
    summary = launch.launch_stage(stage, {"run": run.model_dump(), stage: section}, None, inputs, out, scratch,
                                  run=run, seed=0, device="cpu", dtype="fp32", timeout_s=240, **kw)
    return out, summary


def losses(out: Path, name: str = "loss") -> list[float]:
    t = pq.read_table(out / "metrics.parquet").to_pylist()
    return [r["value"] for r in t if r["name"] == name]


def close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))


SFT = {"autocast": False, "max_steps": 4, "batch_size": 5, "eval_every": 2, "checkpoint_every": 2, "log_every": 2,
       "warmup_steps": 1, "template": None}


def test_sft_on_two_processes_matches_one(tmp_path, base_dir):
    cold = write_cold_start(tmp_path / "cold", 18)  # 16 train rows in 5-row batches: 5, 5, 5, 1 (a placeholder on rank 1)
    inputs = {"base": base_dir, "cold_start": cold}
    one, s1 = in_process("sft", SFT, inputs, tmp_path)
    two, s2 = two_procs("sft", SFT, inputs, tmp_path)
    assert close(losses(one), losses(two), 1e-4), (losses(one), losses(two))
    assert close(losses(one, "val_loss"), losses(two, "val_loss"), 1e-4)
    assert math.isclose(s1["final_train_loss"], s2["final_train_loss"], rel_tol=1e-4)
    assert losses(one, "tokens") == losses(two, "tokens")  # the same global batches
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not list((tmp_path / "sft-2proc-work").glob("launch-*/rank-1-out"))  # rank 1's files are gone


def test_sft_sharded_by_fsdp_on_two_processes_matches_one(tmp_path, base_dir):
    """run.shard = "fsdp": FSDP2 shards the training copy; the losses, the resume state and the
    published checkpoint (gathered back to full tensors) are the single-process ones."""
    from lm.checkpoint import read_safetensors

    cold = write_cold_start(tmp_path / "cold", 18)
    inputs = {"base": base_dir, "cold_start": cold}
    one, s1 = in_process("sft", SFT, inputs, tmp_path)
    lines: list[str] = []
    two, s2 = two_procs("sft", SFT, inputs, tmp_path, run=RunSettings(nproc_per_node=2, shard="fsdp"), log=lines.append)
    assert any("sharded over 2 ranks (FSDP2)" in line for line in lines), lines
    assert close(losses(one), losses(two), 1e-4), (losses(one), losses(two))
    assert close(losses(one, "val_loss"), losses(two, "val_loss"), 1e-4)
    assert losses(one, "tokens") == losses(two, "tokens")
    w1, w2 = (read_safetensors(d / "checkpoint" / "model.safetensors") for d in (one, two))
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


@pytest.mark.parametrize("shard", ["none", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_distill_with_token_level_kd_on_two_processes_matches_one(tmp_path, inputs, shard):
    """The student's loss calls the teacher and `student.logits` (inside the `LossModule`'s forward)."""
    section = {"students": [{"name": "micro"}], "steps": 4, "pretrain_steps": 0, "batch_size": 5, "seq_len": 128,
               "autocast": False, "val_fraction": 0.25, "val_max": 4, "baseline": False, "kd_weight": 0.5,
               "checkpoint_every": 2, "log_every": 2}
    one, s1 = in_process("distill", section, inputs, tmp_path)
    two, s2 = two_procs("distill", section, inputs, tmp_path, run=RunSettings(nproc_per_node=2, shard=shard))
    assert len(losses(one)) == 4 and close(losses(one), losses(two), 1e-4), (losses(one), losses(two))
    assert close(losses(one, "val_loss"), losses(two, "val_loss"), 1e-4)


def sampling_inputs(root: Path) -> dict[str, Path]:
    """problems (5 train, 7 test) and two random tiny checkpoints (base, a distilled student)."""
    from tests.stages.sampling_fakes import save_tiny_checkpoint, tiny_tokenizer, write_problems

    tok = tiny_tokenizer()
    save_tiny_checkpoint(root / "base" / "checkpoint", tok, seed=1)
    save_tiny_checkpoint(root / "distill" / "students" / "small" / "checkpoint", tok, seed=2, dim=16)
    write_problems(root / "problems", [
        {"id": f"t{i}", "prompt": f"What is {i} + {i * 3}?", "answer": str(4 * i), "split": "test" if i < 7 else "train"}
        for i in range(12)])
    return {"problems": root / "problems", "base": root / "base", "distill": root / "distill"}


def test_evaluate_on_two_processes_writes_the_identical_eval_table(tmp_path):
    inputs = sampling_inputs(tmp_path / "run")
    section = {"max_problems": 7, "k": 3, "max_new_tokens": 8, "batch_size": 4}  # 6 sampled + 2 greedy batches
    one, s1 = in_process("evaluate", section, inputs, tmp_path)
    two, s2 = two_procs("evaluate", section, inputs, tmp_path)
    assert s1 == s2
    for name in ("eval.parquet", "summary.parquet"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.slow  # the same path as evaluate (stages.sampling), ~60 s here
def test_cold_start_on_two_processes_writes_the_identical_rows(tmp_path):
    inputs = sampling_inputs(tmp_path / "run")
    inputs = {"problems": inputs["problems"], "rl_zero": inputs["base"]}
    section = {"samples_per_prompt": 3, "max_new_tokens": 8, "batch_size": 4, "checks": []}
    one, s1 = in_process("cold_start", section, inputs, tmp_path)
    two, s2 = two_procs("cold_start", section, inputs, tmp_path)
    assert s1 == s2
    for f in sorted(one.glob("*.parquet")):
        assert pq.read_table(f).equals(pq.read_table(two / f.name)), f.name


GRPO = {"steps": 3, "prompts_per_step": 3, "group_size": 4, "max_new_tokens": 10, "warmup_steps": 1,
        "eval_every": 3, "eval_problems": 3, "eval_samples": 2, "eval_batch_size": 4, "checkpoint_every": 1,
        "autocast": False, "beta": 0.04, "minibatches": 2, "mu": 2, "loss_aggregation": "token_mean"}


def grpo_inputs(root: Path) -> dict[str, Path]:
    inputs = sampling_inputs(root)
    return {"base": inputs["base"], "problems": inputs["problems"]}


def test_grpo_on_two_processes_samples_the_same_rollouts_and_loss(tmp_path):
    """3 groups on 2 ranks (2 + 1), μ = 2 passes of 2 shuffled mini-batches, a reference model."""
    inputs = grpo_inputs(tmp_path / "run")
    one, _ = in_process("rl_zero", GRPO, inputs, tmp_path)
    two, _ = two_procs("rl_zero", GRPO, inputs, tmp_path)
    r1, r2 = pq.read_table(one / "rollouts.parquet"), pq.read_table(two / "rollouts.parquet")
    assert r1.drop(["advantage"]).equals(r2.drop(["advantage"]))  # same completions, rewards
    assert r1.column("advantage").to_pylist() == pytest.approx(r2.column("advantage").to_pylist(), abs=1e-12)
    for name in ("loss", "policy_loss", "kl", "grad_norm"):
        a, b = losses(one, name), losses(two, name)
        assert len(a) == 3 and a == pytest.approx(b, rel=1e-5, abs=1e-7), (name, a, b)
    assert losses(one, "eval/reward_mean") == losses(two, "eval/reward_mean")


# ------------------------------------------------------------------------------- a failing rank

HOOK = '''
import os, pathlib, signal, threading, time, _thread
flag = os.environ.get("R1FLOW_TEST_RANK1_FLAG")
if os.environ.get("RANK") == "1" and flag:
    def watch():
        while not pathlib.Path(flag).exists():
            time.sleep(0.02)
        if os.environ["R1FLOW_TEST_RANK1_MODE"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        _thread.interrupt_main()
    threading.Thread(target=watch, daemon=True).start()
'''


@pytest.fixture
def rank1_fails(tmp_path, monkeypatch):
    """Rank 1 of the next launch fails once `flag` exists: SIGKILL ("kill") or an exception."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))

    def arm(flag: Path, mode: str) -> None:
        monkeypatch.setenv("R1FLOW_TEST_RANK1_FLAG", str(flag))
        monkeypatch.setenv("R1FLOW_TEST_RANK1_MODE", mode)

    return arm


def test_a_rank_that_raises_is_named(tmp_path, base_dir, rank1_fails):
    cold = write_cold_start(tmp_path / "cold", 18)
    work = tmp_path / "sft-2proc-work"
    rank1_fails(work / "sft" / "LATEST", "raise")  # after the first resume checkpoint
    with pytest.raises(launch.RankFailed, match=r"failed on rank 1 of 2: KeyboardInterrupt") as e:
        two_procs("sft", SFT | {"max_steps": 8, "checkpoint_every": 1}, {"base": base_dir, "cold_start": cold},
                  tmp_path)
    assert e.value.rank == 1


def stage_in_a_run(root: Path, stage: str, raw: dict, upstream: dict[str, Path]):
    """A run record at `root` whose upstream entries are published copies of `upstream`; returns
    (validated config, the stage's scratch directory)."""
    from artifacts import ArtifactStore, RunStore, StageEntry, cache_key
    from pipeline.config import validate
    from pipeline.runner import stage_key

    store = ArtifactStore(root)
    cfg = validate(raw, stages=(stage,))
    record = RunStore(root).create(cfg.to_dict(), (*upstream, stage), run_id="r")
    for up, src in upstream.items():
        key = cache_key(up, {}, {}, "tests")
        m = store.write(up, key, {}, {}, lambda out, src=src: shutil.copytree(src, out, dirs_exist_ok=True) and {})
        record.stages[up] = StageEntry(status="ran", path=str(store.path_for(up, key)), content_hash=m.content_hash)
    RunStore(root).save(record)
    key, _ = stage_key(stage, cfg, {u: record.stages[u].content_hash for u in upstream})
    return cfg, root / "work" / stage / key[:24]


def kill_rank1_then_resume(tmp_path: Path, rank1_fails, stage: str, section: dict, upstream: dict[str, Path],
                           flag: str, resumed_line: str, shard: str = "none") -> Path:
    """Run `stage` on 2 processes, SIGKILL rank 1 once `flag` (in the scratch dir) exists, check the
    failure, rerun; returns the published artifact of the rerun."""
    from artifacts import ArtifactStore, RunStore
    from pipeline.runner import StageError, execute_stage

    root = tmp_path / "root"
    raw = {"run": {"device": "cpu", "dtype": "fp32", "nproc_per_node": 2, "shard": shard}, stage: section}
    cfg, scratch = stage_in_a_run(root, stage, raw, upstream)
    rank1_fails(scratch / flag, "kill")
    with pytest.raises((StageError, launch.RankFailed), match=r"rank 1 of 2 died \(killed by signal 9\)"):
        execute_stage(stage, cfg, "r", root, log=lambda _: None)
    assert not list((root / "artifacts" / stage).glob("*"))  # nothing published, no temp dir left
    assert RunStore(root).load("r").stages[stage].status == "failed"
    assert (scratch / flag).exists()  # rank 0's resume state survived

    rank1_fails(tmp_path / "never", "kill")
    lines: list[str] = []
    outcome = execute_stage(stage, cfg, "r", root, log=lines.append)
    assert outcome.status == "ran" and any(resumed_line in line for line in lines), lines
    assert ArtifactStore(root).lookup(stage, RunStore(root).load("r").stages[stage].cache_key) is not None
    return outcome.path


@pytest.mark.slow  # three launches, ~80 s on the shared 2-core machine
@pytest.mark.parametrize("shard", ["none", "fsdp"])  # fsdp: the moments go back into the sharded copy
def test_a_killed_sft_rank_fails_the_stage_publishes_nothing_and_a_rerun_resumes(tmp_path, base_dir, rank1_fails,
                                                                                 shard):
    cold = write_cold_start(tmp_path / "cold", 18)
    section = SFT | {"max_steps": 6, "checkpoint_every": 1}
    out = kill_rank1_then_resume(tmp_path, rank1_fails, "sft", section, {"base": base_dir, "cold_start": cold},
                                 "sft/LATEST", "sft: resuming at step", shard=shard)
    one, _ = in_process("sft", section, {"base": base_dir, "cold_start": cold}, tmp_path)
    assert close(losses(one), losses(out), 1e-4)  # resumed = uninterrupted, as in one process


@pytest.mark.slow  # three launches of a GRPO stage
def test_a_killed_two_process_grpo_resumes(tmp_path, rank1_fails):
    inputs = grpo_inputs(tmp_path / "run")
    section = GRPO | {"steps": 4}
    out = kill_rank1_then_resume(tmp_path, rank1_fails, "rl_zero", section, inputs, "grpo_resume",
                                 "rl_zero: resuming after step")
    one, _ = in_process("rl_zero", section, inputs, tmp_path)
    assert pq.read_table(one / "rollouts.parquet").drop(["advantage"]).equals(
        pq.read_table(out / "rollouts.parquet").drop(["advantage"]))
    assert losses(one, "loss") == pytest.approx(losses(out, "loss"), rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------- the whole flow


@pytest.mark.slow  # every model stage launches 2 processes: minutes on a 2-core machine
def test_micro_flow_on_two_processes_completes_with_valid_artifacts(prefect_harness, tmp_path):
    from artifacts import RunStore, verify
    from pipeline.config import STAGES
    from pipeline.inspect import inspect_dataset, resolve
    from tests.pipeline.cli_helpers import cli_json

    root = tmp_path / "root"
    summary = cli_json("run", "--preset", "micro", "--set", "run.nproc_per_node=2", "--root", str(root),
                       "--run-id", "two", "--json")
    assert summary["status"] == "succeeded" and list(summary["stages"]) == list(STAGES)
    record = RunStore(root).load("two")
    for name in STAGES:
        manifest = verify(record.stages[name].path)
        for dataset in manifest.rows:
            assert inspect_dataset(resolve(f"two/{name}/{dataset}", root), rows=1)["rows"] == manifest.rows[dataset]
    assert not list((root / "work").rglob("rank-*-out"))  # the other ranks' throwaway files are gone
    ev = record.stages["evaluate"].summary
    assert all(0.0 <= ev[c]["pass@1"] <= 1.0 for c in ("base", "rl_zero", "sft", "rl_reasoning"))


# ------------------------------------------------------------------------------- reading failures

TORCHRUN_REPORT = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
pipeline.launch FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_22:10:01
  host      : box
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 11)
  error_file: <N/A>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_22:10:00
  host      : box
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 12)
  error_file: <N/A>
============================================================"""


def test_failure_names_the_rank_where_it_started(tmp_path):
    """The consequence (rank 0 stopped by torchrun's SIGTERM, or its collective losing a peer) is
    never blamed; a rank's own error beats torchrun's report."""
    errors = tmp_path / "errors"
    errors.mkdir()
    tail = TORCHRUN_REPORT.splitlines()
    e = launch._failure("sft", errors, tail, 1, 2)
    assert e.rank == 1 and "rank 1 of 2 died (killed by signal 9)" in str(e)
    (errors / "rank-0.json").write_text(
        '{"rank": 0, "type": "RuntimeError", "message": "Connection closed by peer [127.0.0.1]:1", "time": 1.0}')
    assert launch._failure("sft", errors, tail, 1, 2).rank == 1
    (errors / "rank-1.json").write_text('{"rank": 1, "type": "ValueError", "message": "no rows", "time": 2.0}')
    e = launch._failure("sft", errors, tail, 1, 2)
    assert str(e) == "stage sft failed on rank 1 of 2: ValueError: no rows" and e.user_facing
    assert "exited with 7" in str(launch._failure("sft", tmp_path / "none", ["boom"], 7, 2))


def test_torchrun_options_follow_the_run_settings():
    assert launch.torchrun_args(RunSettings(nproc_per_node=4))[-1] == "--standalone"
    multi = launch.torchrun_args(RunSettings(nproc_per_node=2, nnodes=2, node_rank=1, rdzv_endpoint="h0:29400"))
    assert multi[multi.index("--rdzv_endpoint") + 1] == "h0:29400" and multi[multi.index("--node_rank") + 1] == "1"
    for bad, message in (({"nnodes": 2}, "needs rdzv_endpoint"), ({"node_rank": 1}, "must be below nnodes"),
                         ({"rdzv_endpoint": "nohost"}, "host:port"), ({"shard": "zero3"}, "'none' or 'fsdp'")):
        with pytest.raises(ValueError, match=message):
            RunSettings(**bad)
