"""How the GRPO stages call rewards: TRL's keyword arguments, user references, per-reward options,
token lengths, conversational problems, and the rollout column per reward."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from lm.tokenizer import train_bpe
from rewards.penalties import overlong_value
from stages.grpo import GRPOConfig, reward_options, rollouts_schema, train_grpo
from stages.sampling import Problem
from tests.stages.test_grpo import TOY, quiet_ctx, toy_model

CHECKING_REWARD = textwrap.dedent('''
    EXPECTED = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                "id", "answer", "language", "data_source", "extra_info"}

    def token_count(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **columns):
        got = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"} | set(columns)
        missing = EXPECTED - got
        if missing:
            raise AssertionError(f"missing keyword arguments {sorted(missing)}")
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions), completions[0]
        assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts), prompts[0]
        assert columns["data_source"][0] == "openai/gsm8k" and columns["extra_info"][0]["index"] >= 0
        assert trainer_state.max_steps == 2 and trainer_state.global_step in (0, 1)
        log_metric("calls", 1.0)
        log_extra("note", ["x"] * len(completions))
        return [float(len(ids)) for ids in completion_ids]
''')


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["User: add one and two\nAssistant: <think> one plus two </think> <answer> 3 </answer>"] * 4,
                     256 + 8 + 16)


def chat_problems(n: int) -> list[Problem]:
    return [Problem(f"p{i}", f"q{i}", "0", "en",
                    ({"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"}),
                    {"data_source": "openai/gsm8k", "extra_info": {"index": i}}) for i in range(n)]


def test_user_reward_gets_trl_kwargs_and_fills_its_column(tok, tmp_path):
    torch.set_num_threads(1)
    path = tmp_path / "checks.py"
    path.write_text(CHECKING_REWARD)
    cfg = GRPOConfig(**(TOY | dict(steps=2, eval_every=0)),
                     rewards={f"{path}:token_count": 0.0, "format": 1.0, "overlong_penalty": 1.0},
                     reward_options={"overlong_penalty": {"cache_length": 2}})
    problems = chat_problems(12)
    out = tmp_path / "out"
    out.mkdir()
    train_grpo(cfg, toy_model(tok), tok, problems[:8], problems[8:], out, quiet_ctx(), schema=rollouts_schema([]))
    table = pq.read_table(out / "rollouts.parquet")
    assert {"reward_token_count", "reward_format", "reward_overlong_penalty"} <= set(table.column_names)
    n_tokens = table.column("num_tokens").to_pylist()
    assert table.column("reward_token_count").to_pylist() == [float(n) for n in n_tokens]
    # the overlong limit defaults to max_new_tokens (8), counted in tokens; cache_length from the config
    assert table.column("reward_overlong_penalty").to_pylist() == [overlong_value(n, 8, 2) for n in n_tokens]
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    assert any(r["name"] == "reward_log/calls" and r["value"] == 1.0 for r in metrics)
    # prompts were rendered from the messages: the system turn comes first
    assert table.column("prompt").to_pylist()[0].startswith("System: Be brief.\nUser: q")


def test_overlong_defaults_follow_max_new_tokens():
    cfg = GRPOConfig(rewards={"accuracy": 1.0, "overlong_penalty": 0.5}, max_new_tokens=64)
    assert reward_options(cfg) == {"overlong_penalty": {"max_length": 64, "cache_length": 16}}
    cfg = GRPOConfig(rewards={"accuracy": 1.0, "overlong_penalty": 0.5},
                     reward_options={"overlong_penalty": {"max_length": 40}})
    assert reward_options(cfg) == {"overlong_penalty": {"max_length": 40, "cache_length": 10}}
    assert reward_options(GRPOConfig()) == {}


def test_editing_a_reward_file_changes_the_stage_key(tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.runner import stage_key

    path = tmp_path / "r.py"
    path.write_text("def f(completions, **kw):\n    return [0.0] * len(completions)\n")
    cfg = load_config("micro", overrides=[f'rl_zero.rewards={{accuracy = 1.0, "{path}:f" = 1.0}}'])
    before, payload = stage_key("rl_zero", cfg, {"base": "b", "problems": "p"})
    assert f"{path}:f" in payload["external"]
    assert stage_key("rl_zero", cfg, {"base": "b", "problems": "p"})[0] == before
    path.write_text("def f(completions, **kw):\n    return [1.0] * len(completions)\n")
    assert stage_key("rl_zero", cfg, {"base": "b", "problems": "p"})[0] != before
    plain = load_config("micro")
    assert "external" not in stage_key("rl_zero", plain, {"base": "b", "problems": "p"})[1]


def test_a_conversational_prompt_that_opened_think_counts_the_tag_as_written():
    """chat_think with chat-message problems: the rewards see the prefilled `<think>` as the
    assistant turn it opened (TRL's continue_final_message form), so the format reward pays."""
    from stages.grpo import reward_scorer

    p = Problem("a", "What is 2 + 2?", "4", "en", ({"role": "user", "content": "What is 2 + 2?"},))
    scorer = reward_scorer({"accuracy": 1.0, "format": 0.5})
    done = "2 + 2 = 4.\n</think>\n<answer>4</answer>"
    assert scorer([p], ["<|im_start|>assistant\n<think>\n"], [done]).total == [1.5]
    assert scorer([p], ["<|im_start|>assistant\n"], [done]).total == [1.0]  # no <think> anywhere: malformed
