"""The sampling stages with `run.sampler.backend = "openai"`: the context's server sampler
(`stages.sampling.server_sampler`) against the in-process fake server, end to end through
rejection_sampling and evaluate; and evaluate's refusal to score several checkpoints with the one
model a server holds."""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lm.openai_sampler import ServerSettings
from stages import evaluate, rejection_sampling
from stages.context import StageContext
from stages.sampling import encode_prompts, pick_sampler, server_sampler, torch_sampler
from tests.lm.openai_fake import FakeServer, ok
from tests.stages.sampling_fakes import save_tiny_checkpoint, tiny_tokenizer, trace, write_problems

ANSWERS = {"What is 47 + 85?": ("132", -0.25), "What is 9 * 3?": ("27", -0.5), "What is 10 - 4?": ("5", -1.0)}


def answer(body: dict) -> tuple:
    """A vLLM-like answer: the trace of the question's scripted answer, stop string kept."""
    question = next(q for q in ANSWERS if q in body["prompt"])
    value, lp = ANSWERS[question]
    text = trace(f"{question} gives {value}.", value)
    return ok(text, "stop", stop_reason="</answer>",
              logprobs={"tokens": list(text), "token_logprobs": [lp] * len(text)})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("server")
    tok = tiny_tokenizer()
    save_tiny_checkpoint(root / "rl_reasoning" / "checkpoint", tok)
    save_tiny_checkpoint(root / "sft" / "checkpoint", tok, dim=16)
    write_problems(root / "problems", [
        {"id": "p1", "prompt": "What is 47 + 85?", "answer": "132", "split": "train"},
        {"id": "p2", "prompt": "What is 9 * 3?", "answer": "27", "split": "train"},
        {"id": "t1", "prompt": "What is 10 - 4?", "answer": "6", "split": "test"},
        {"id": "t2", "prompt": "What is 9 * 3?", "answer": "27", "split": "test"},
    ])
    return {s: root / s for s in ("rl_reasoning", "sft", "problems")}


def server_ctx(url: str) -> StageContext:
    return StageContext(seed=1, progress=lambda it, **_: it,
                        sampler=server_sampler(ServerSettings(base_url=url, model="teacher", concurrency=4)))


def test_pick_sampler_prefers_the_explicit_then_the_context_then_torch() -> None:
    explicit = lambda *a: None  # noqa: E731
    server = server_sampler(ServerSettings(base_url="http://h:1/v1", model="m"))
    assert pick_sampler(explicit, StageContext(sampler=server)) is explicit
    assert pick_sampler(None, StageContext(sampler=server)) is server
    assert pick_sampler(None, StageContext()) is torch_sampler


def test_rejection_sampling_samples_on_the_server(inputs, tmp_path) -> None:
    cfg = rejection_sampling.Config(samples_per_prompt=3, keep_per_prompt=1, max_prompts=None, batch_size=4)
    with FakeServer(answer, models=["teacher"]) as s:
        summary = rejection_sampling.run(cfg, inputs, tmp_path, server_ctx(s.url))
    rows = pq.read_table(tmp_path / "candidates.parquet").to_pylist()
    assert len(rows) == 6 and {r["origin"] for r in rows} == {"server:teacher"}
    assert all(r["completion"].endswith("</answer>") and r["finish_reason"] == "stop" for r in rows)
    kept = pq.read_table(tmp_path / "reasoning_sft.parquet").to_pylist()
    assert sorted(r["problem_id"] for r in kept) == ["p1", "p2"]  # both answers are right, one kept each
    assert summary["pass_rate_mean"] == 1.0
    # the prompts went out as the rendered template text, with per-row seeds, 6 requests in all
    tok = tiny_tokenizer()
    rendered = [tok.decode(ids) for ids in encode_prompts(tok, ["What is 47 + 85?", "What is 9 * 3?"],
                                                           cfg.template)]
    assert sorted({r["prompt"] for r in s.requests}) == sorted(rendered)
    assert len(s.requests) == 6 and len({r["seed"] for r in s.requests}) == 6


def test_evaluate_on_the_server_records_its_log_probs(inputs, tmp_path) -> None:
    cfg = evaluate.Config(k=2, greedy=True, checkpoints=["rl_reasoning"], max_new_tokens=64)
    with FakeServer(answer, models=["teacher"]) as s:
        summary = evaluate.run(cfg, inputs, tmp_path, server_ctx(s.url))
    rows = pq.read_table(tmp_path / "eval.parquet").to_pylist()
    assert {r["checkpoint"] for r in rows} == {"rl_reasoning"} and len(rows) == 2 * (2 + 1)
    lp = {r["problem_id"]: r["logprob_mean"] for r in rows}
    assert lp == {"t1": pytest.approx(-1.0), "t2": pytest.approx(-0.5)}  # the server's, averaged
    assert summary["rl_reasoning"]["pass@1"] == pytest.approx(0.5)  # t2 right, t1 wrong (5 != 6)
    assert {r["temperature"] for r in s.requests} == {0.6, 0.0}  # sampled and greedy


def test_evaluate_refuses_to_score_several_checkpoints_with_one_server_model(inputs, tmp_path) -> None:
    with FakeServer(answer, models=["teacher"]) as s:
        with pytest.raises(ValueError, match=re.escape("evaluate would score 2 checkpoints (sft, rl_reasoning)")
                           + ".*evaluate.checkpoints"):
            evaluate.run(evaluate.Config(k=1), inputs, tmp_path, server_ctx(s.url))
    assert s.requests == []
