"""Every built-in reward under TRL's exact call (`GRPOTrainer._calculate_rewards`): plain and
conversational completions give the same scores; token ids reach the length-based rewards."""
from __future__ import annotations

import math

import pytest

import rewards
from rewards import REGISTRY, combine
from rewards.registry import RewardError, completion_texts

GOOD = "<think>we add the two numbers and check it twice</think><answer>4</answer>"
WRONG = "<think>we add the two numbers and check it twice</think><answer>5</answer>"
MIXED = "<think>we add 两个 numbers 然后 check</think><answer>4</answer>"
LOOP = "<think>" + "the same words again " * 12 + "</think><answer>4</answer>"
TEXTS = [GOOD, WRONG, MIXED, LOOP, "4"]
PROMPT = "User: What is 2 + 2?\nAssistant:"


class _State:  # what TRL passes as trainer_state (a transformers TrainerState)
    global_step = 3
    max_steps = 10


def trl_kwargs(conversational: bool) -> dict:
    """The keyword arguments TRL 1.x passes a reward function, for a batch of five completions."""
    n = len(TEXTS)
    logged: list = []
    if conversational:
        prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * n
        completions = [[{"role": "assistant", "content": t}] for t in TEXTS]
    else:
        prompts, completions = [PROMPT] * n, list(TEXTS)
    return dict(prompts=prompts, completions=completions,
                completion_ids=[list(range(len(t) // 4)) for t in TEXTS],
                answer=["4"] * n, language=["en"] * n, id=[f"p{i}" for i in range(n)],
                trainer_state=_State(), log_extra=lambda column, values: logged.append(column),
                log_metric=lambda name, value: logged.append(name))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_builtin_reward_same_on_conversational_and_plain(name):
    plain = REGISTRY[name](**trl_kwargs(False))
    conv = REGISTRY[name](**trl_kwargs(True))
    assert len(plain) == len(TEXTS)
    assert plain == conv, name


def test_values_under_trl_call_are_the_rewards_values():
    kw = trl_kwargs(True)
    assert rewards.accuracy_reward(**kw) == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert rewards.format_reward(**kw) == [1.0, 1.0, 1.0, 1.0, 0.0]
    lang = rewards.language_consistency_reward(**kw)
    assert lang[0] == 1.0 and lang[2] < 1.0


def test_overlong_penalty_counts_completion_ids_not_characters():
    # 20 tokens against a limit of 16 (soft zone 4): over the limit -> -1; 13 tokens: in the soft
    # zone, (12 - 13) / 4 = -0.25; 5 tokens: 0. Characters (80) would say -1 for all three.
    texts = ["x" * 80] * 3
    ids = [[0] * 20, [0] * 13, [0] * 5]
    out = rewards.overlong_penalty(completions=texts, completion_ids=ids, max_length=16, cache_length=4)
    assert out == [-1.0, -0.25, 0.0]
    conv = rewards.overlong_penalty(completions=[[{"role": "assistant", "content": t}] for t in texts],
                                    completion_ids=ids, max_length=16, cache_length=4)
    assert conv == out


def test_combine_takes_trl_kwargs_and_options():
    kw = trl_kwargs(True)
    completions = kw.pop("completions")
    out = combine({"accuracy": 1.0, "overlong_penalty": 1.0}, completions,
                  options={"overlong_penalty": {"max_length": 10, "cache_length": 2}}, **kw)
    # lengths in tokens: len(text) // 4 -> GOOD 18 tokens > 10 -> -1
    assert out.components["overlong_penalty"][0] == -1.0
    assert out.components["accuracy"] == [1.0, 0.0, 1.0, 1.0, 1.0]


def test_accuracy_reads_open_r1_solution_and_verl_reward_model():
    sol = ["We compute 2 + 2 = 4, so the answer is $\\boxed{4}$."] * 2
    assert rewards.accuracy_reward([GOOD, WRONG], solution=sol) == [1.0, 0.0]
    rm = [{"ground_truth": "4", "style": "rule"}] * 2
    assert rewards.accuracy_reward([GOOD, WRONG], reward_model=rm) == [1.0, 0.0]


def test_completion_texts_rejects_what_is_not_text_or_messages():
    assert completion_texts([[{"role": "assistant", "content": "a"}], "b"]) == ["a", "b"]
    assert completion_texts([[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]]) == ["ab"]
    assert completion_texts([42]) == [42]  # not text: passed on, the rewards score it 0
    assert rewards.format_reward(completions=[42, [{"role": "assistant", "content": GOOD}]]) == [0.0, 1.0]
    with pytest.raises(TypeError, match="must be a list"):
        completion_texts("one string")


def test_combine_names_a_reward_that_raises_or_miscounts():
    from rewards.registry import REGISTRY as reg

    def boom(completions, **_):
        raise ZeroDivisionError("oops")

    def short(completions, **_):
        return [1.0]

    def nan(completions, **_):
        return [math.nan, 1]

    reg.update({"_boom": boom, "_short": short, "_nan": nan})
    try:
        with pytest.raises(RewardError, match=r"reward '_boom' raised ZeroDivisionError: oops"):
            combine({"_boom": 1.0}, ["a", "b"])
        with pytest.raises(RewardError, match=r"reward '_short' returned 1 scores for 2 completions"):
            combine({"_short": 1.0}, ["a", "b"])
        assert combine({"_nan": 1.0}, ["a", "b"]).components["_nan"] == [None, 1.0]  # NaN = not applicable
    finally:
        for k in ("_boom", "_short", "_nan"):
            reg.pop(k)
