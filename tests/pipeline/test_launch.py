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


def two_procs(stage: str, section: dict, inputs: dict[str, Path], tmp: Path, **kw) -> tuple[Path, dict]:
    out, scratch = tmp / f"{stage}-2proc", tmp / f"{stage}-2proc-work"
    out.mkdir()
    scratch.mkdir()
    summary = launch.launch_stage(stage, {"run": TWO.model_dump(), stage: section}, None, inputs, out, scratch,
                                  run=TWO, seed=0, device="cpu", dtype="fp32", log=lambda _: None,
                                  timeout_s=240, **kw)
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


@pytest.mark.slow  # three launches, ~80 s on the shared 2-core machine
def test_a_killed_rank_fails_the_stage_publishes_nothing_and_a_rerun_resumes(tmp_path, base_dir, rank1_fails):
    from artifacts import ArtifactStore, RunStore, StageEntry, cache_key
    from pipeline.config import validate
    from pipeline.runner import StageError, execute_stage, stage_key

    root = tmp_path / "root"
    store = ArtifactStore(root)
    cold = write_cold_start(tmp_path / "cold", 18)
    raw = {"run": {"device": "cpu", "dtype": "fp32", "nproc_per_node": 2},
           "sft": SFT | {"max_steps": 6, "checkpoint_every": 1}}
    cfg = validate(raw, stages=("sft",))
    record = RunStore(root).create(cfg.to_dict(), ("base", "cold_start", "sft"), run_id="r")
    for up, src in (("base", base_dir), ("cold_start", cold)):
        key = cache_key(up, {}, {}, "tests")
        m = store.write(up, key, {}, {}, lambda out, src=src: shutil.copytree(src, out, dirs_exist_ok=True) and {})
        record.stages[up] = StageEntry(status="ran", path=str(store.path_for(up, key)), content_hash=m.content_hash)
    RunStore(root).save(record)
    key, _ = stage_key("sft", cfg, {u: record.stages[u].content_hash for u in ("base", "cold_start")})
    scratch = root / "work" / "sft" / key[:24]

    rank1_fails(scratch / "sft" / "LATEST", "kill")
    with pytest.raises((StageError, launch.RankFailed), match=r"rank 1 of 2 died \(killed by signal 9\)"):
        execute_stage("sft", cfg, "r", root, log=lambda _: None)
    assert store.lookup("sft", key) is None and not list((root / "artifacts" / "sft").glob(".tmp-*"))
    assert RunStore(root).load("r").stages["sft"].status == "failed"
    assert (scratch / "sft" / "LATEST").is_file()  # rank 0's resume state survived

    rank1_fails(tmp_path / "never", "kill")
    lines: list[str] = []
    outcome = execute_stage("sft", cfg, "r", root, log=lines.append)
    assert outcome.status == "ran" and any("sft: resuming at step" in l for l in lines), lines
    one, _ = in_process("sft", raw["sft"], {"base": base_dir, "cold_start": cold}, tmp_path)
    assert close(losses(one), losses(outcome.path), 1e-4)  # resumed = uninterrupted, as in one process
