"""`execute_stage` without Prefect: cache hits, corrupt caches, stale marking, failure records, keys."""
from __future__ import annotations

import pytest
import torch

import stages.problems
from artifacts import RunStore, StageEntry
from pipeline.config import STAGES, load_config
from pipeline.runner import StageError, execute_stage, stage_key

SMALL = ["problems.n_train=8", "problems.n_test=4", "problems.corpus_docs=20"]


def quiet(_: str) -> None:
    pass


def new_run(root, *overrides: str, run_id: str = "r1"):
    cfg = load_config("micro", None, [*SMALL, *overrides])
    RunStore(root).create(cfg.to_dict(), STAGES, preset="micro", run_id=run_id)
    return cfg


def test_second_execution_is_a_cache_hit(tmp_path):
    cfg = new_run(tmp_path)
    first = execute_stage("problems", cfg, "r1", tmp_path, log=quiet)
    second = execute_stage("problems", cfg, "r1", tmp_path, log=quiet)
    assert (first.status, second.status) == ("ran", "cached")
    assert second.path == first.path and second.seconds == 0.0
    entry = RunStore(tmp_path).load("r1").stages["problems"]
    # the hit found what the record already says: its "ran" entry (and time) stay as they were
    assert entry.status == "ran" and entry.seconds == round(first.seconds, 2) and entry.content_hash is not None
    new_run(tmp_path, run_id="r2")
    third = execute_stage("problems", cfg, "r2", tmp_path, log=quiet)
    entry = RunStore(tmp_path).load("r2").stages["problems"]
    assert third.status == "cached" and entry.status == "cached" and entry.seconds == 0.0
    assert not (tmp_path / "work" / "problems").exists() or not any((tmp_path / "work" / "problems").iterdir())


def test_corrupt_cached_artifact_is_recomputed(tmp_path):
    cfg = new_run(tmp_path)
    first = execute_stage("problems", cfg, "r1", tmp_path, log=quiet)
    victim = next(first.path.glob("*.parquet"))
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    logs: list[str] = []
    again = execute_stage("problems", cfg, "r1", tmp_path, log=logs.append)
    assert again.status == "ran"
    assert any("corrupt" in m and "recomputing" in m for m in logs)


def test_new_artifact_marks_downstream_stale(tmp_path):
    cfg = new_run(tmp_path)
    execute_stage("problems", cfg, "r1", tmp_path, log=quiet)
    runs = RunStore(tmp_path)
    record = runs.load("r1")
    record.stages["base"] = StageEntry(status="ran", path=str(tmp_path / "x"))
    record.stages["rl_zero"] = StageEntry(status="cached", path=str(tmp_path / "y"))
    runs.save(record)
    changed = load_config("micro", None, [*SMALL, "problems.n_train=9"])
    execute_stage("problems", changed, "r1", tmp_path, log=quiet)
    after = runs.load("r1")
    assert after.stages["problems"].status == "ran"
    assert after.stages["base"].status == "stale" and after.stages["rl_zero"].status == "stale"
    assert after.stages["sft"].status == "pending"  # never produced: nothing to call stale
    assert after.status == "stale"


def test_failure_is_recorded_with_its_message(tmp_path, monkeypatch):
    cfg = new_run(tmp_path)

    def broken(*_args, **_kwargs):
        raise ValueError("the corpus has no rows")

    monkeypatch.setattr(stages.problems, "run", broken)
    with pytest.raises(StageError, match="stage problems failed: the corpus has no rows"):
        execute_stage("problems", cfg, "r1", tmp_path, log=quiet)
    record = RunStore(tmp_path).load("r1")
    assert record.status == "failed"
    assert record.stages["problems"].status == "failed"
    assert "the corpus has no rows" in record.stages["problems"].error


def test_cache_key_records_the_dtype_the_stage_runs_in(monkeypatch):
    # a CUDA device without bf16: "auto" runs fp32, and the key must say so (it said bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = load_config("micro", None, ["run.device=cuda", "run.dtype=auto"])
    _, payload = stage_key("problems", cfg, {})
    assert payload["dtype"] == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    _, payload = stage_key("problems", cfg, {})
    assert payload["dtype"] == "bf16"


def test_a_scheduled_distill_keeps_the_runs_earlier_students():
    from pipeline.flows import merged_students

    earlier = [{"name": "micro", "model": "micro", "init": "scratch"}]
    assert merged_students(earlier, ["tiny-student", "micro", "tiny-student"]) == [
        earlier[0], {"name": "tiny-student", "model": "tiny-student"}]


def test_the_torch_sampler_leaves_cache_keys_as_they_were_and_a_server_names_its_model():
    from artifacts import cache_key, code_version
    from lm.train import resolve_device, resolve_dtype_name

    hashes = {"rl_reasoning": "a" * 64, "problems": "b" * 64}
    torch_cfg = load_config("micro")
    key, payload = stage_key("rejection_sampling", torch_cfg, hashes)
    # the payload of before run.sampler existed: stage config, seed, dtype, nothing else
    before = {"stage": torch_cfg.stage("rejection_sampling").model_dump(mode="json"), "seed": 0,
              "dtype": resolve_dtype_name(torch_cfg.run.dtype, resolve_device(torch_cfg.run.device))}
    assert payload == before and key == cache_key("rejection_sampling", before, hashes, code_version())

    server = ["run.sampler.backend=openai", "run.sampler.base_url=http://h:8000/v1", "run.sampler.model=teacher"]
    s_key, s_payload = stage_key("rejection_sampling", load_config("micro", None, server), hashes)
    assert s_key != key and s_payload["sampler"] == {"backend": "openai", "model": "teacher", "logprobs": True,
                                                     "server_stops": True, "extra_body": {}}
    # where the server is and how hard r1flow pushes it do not change the samples...
    moved = server + ["run.sampler.base_url=http://other:9000/v1", "run.sampler.concurrency=64",
                      "run.sampler.max_retries=0", "run.sampler.timeout_s=5"]
    assert stage_key("rejection_sampling", load_config("micro", None, moved), hashes)[0] == s_key
    # ...the model it serves and the request fields do
    for change in ("run.sampler.model=other", "run.sampler.extra_body={top_k = 0}", "run.sampler.server_stops=false"):
        assert stage_key("rejection_sampling", load_config("micro", None, server + [change]), hashes)[0] != s_key
    # the training stages never sample on the server: their keys ignore run.sampler
    assert stage_key("sft", load_config("micro", None, server), hashes) == stage_key("sft", torch_cfg, hashes)
    # nor does cold_start reading the user's traces from a file
    from_file = ["cold_start.source=file", "cold_start.path=traces.jsonl"]
    assert (stage_key("cold_start", load_config("micro", None, server + from_file), hashes)
            == stage_key("cold_start", load_config("micro", None, from_file), hashes))


def test_the_stage_context_carries_a_server_sampler_only_for_sampling_stages():
    from pipeline.config import SERVER_SAMPLING_STAGES, stage_sampler

    server = ["run.sampler.backend=openai", "run.sampler.base_url=http://h:8000/v1", "run.sampler.model=teacher"]
    run = load_config("micro", None, server).run
    assert SERVER_SAMPLING_STAGES == ("cold_start", "rejection_sampling", "evaluate")
    assert all(callable(stage_sampler(run, s)) for s in SERVER_SAMPLING_STAGES)
    assert [s for s in STAGES if stage_sampler(run, s) is not None] == list(SERVER_SAMPLING_STAGES)
    assert all(stage_sampler(load_config("micro").run, s) is None for s in STAGES)
