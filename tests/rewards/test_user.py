"""User rewards by reference: files, modules, verl scorers; their errors name file and function."""
from __future__ import annotations

import sys
import textwrap

import pytest

from rewards import combine
from rewards.registry import RewardError, reward_labels
from rewards.user import check_reward_name, load_reward, reward_sources

TRL_STYLE = textwrap.dedent('''
    def length_bonus(completions, completion_ids=None, answer=None, trainer_state=None, log_metric=None, **kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        if log_metric is not None:
            log_metric("bonus_calls", 1.0)
        return [min(len(ids), 10) / 10 for ids in completion_ids]
''')
VERL_STYLE = textwrap.dedent('''
    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        if data_source == "openai/gsm8k" and solution_str.strip().endswith("#### " + ground_truth):
            return {"score": 1.0, "acc": True}
        return 0.0
''')


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(TRL_STYLE)
    return path


def test_file_reference_is_called_with_trl_kwargs(reward_file):
    ref = f"{reward_file}:length_bonus"
    logged = []
    out = combine({ref: 1.0, "accuracy": 0.0}, ["<answer>4</answer>", "x"], answer=["4", "4"],
                  completion_ids=[[1] * 3, [1] * 30], log_metric=lambda k, v: logged.append(k))
    assert out.components["length_bonus"] == [0.3, 1.0]
    assert out.components["accuracy"] == [1.0, 0.0]
    assert out.total == [0.3, 1.0]
    assert logged == ["bonus_calls"]


def test_module_reference(tmp_path, monkeypatch):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "scoring.py").write_text(TRL_STYLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = load_reward("mypkg.scoring:length_bonus")
    assert r.fn(completions=["a"], completion_ids=[[0] * 5]) == [0.5]
    assert r.source is not None and r.source.name == "scoring.py"
    assert set(reward_sources(["mypkg.scoring:length_bonus", "accuracy"])) == {"mypkg.scoring:length_bonus"}
    sys.modules.pop("mypkg.scoring", None)
    sys.modules.pop("mypkg", None)


def test_verl_scorer_per_completion(tmp_path):
    path = tmp_path / "gsm8k_score.py"
    path.write_text(VERL_STYLE)
    ref = f"verl:{path}:compute_score"
    out = combine({ref: 1.0}, ["so 6 #### 72", "#### 71", [{"role": "assistant", "content": "#### 72"}]],
                  answer=["72"] * 3, data_source=["openai/gsm8k"] * 3, extra_info=[{"index": i} for i in range(3)])
    assert out.components["compute_score"] == [1.0, 0.0, 1.0]


def test_editing_the_file_changes_its_hash_and_behaviour(reward_file):
    ref = f"{reward_file}:length_bonus"
    before = reward_sources([ref])[ref]
    reward_file.write_text(TRL_STYLE.replace("/ 10", "/ 5"))
    assert reward_sources([ref])[ref] != before
    assert load_reward(ref).fn(completions=["a"], completion_ids=[[0] * 2]) == [0.4]


@pytest.mark.parametrize("ref, message", [
    ("nope", "unknown reward 'nope'; the built-in rewards are: accuracy"),
    ("missing_dir/none.py:f", "file missing_dir/none.py does not exist"),
    ("{file}:absent", "has no function 'absent' (it defines: length_bonus)"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("{file}:", "expected 'path/to/file.py:function'"),
])
def test_broken_references_are_named(reward_file, ref, message):
    ref = ref.replace("{file}", str(reward_file))
    with pytest.raises(ValueError) as e:
        check_reward_name(ref)
    assert message in str(e.value)
    if ":" in ref:
        assert ref in str(e.value)


def test_a_file_that_fails_to_import_is_named(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import not_a_real_module_abc\n")
    with pytest.raises(ValueError, match=r"bad\.py:f.*importing .*bad\.py failed: ModuleNotFoundError"):
        check_reward_name(f"{path}:f")


def test_user_reward_errors_name_the_reference(reward_file):
    reward_file.write_text("def f(completions, **kw):\n    return [1.0]\n\ndef g(completions, **kw):\n    return {}['x']\n")
    with pytest.raises(RewardError, match=r"my_rewards\.py:f' returned 1 scores for 2 completions"):
        combine({f"{reward_file}:f": 1.0}, ["a", "b"])
    with pytest.raises(RewardError, match=r"my_rewards\.py:g' raised KeyError"):
        combine({f"{reward_file}:g": 1.0}, ["a", "b"])


def test_labels_are_function_names_unless_they_clash(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(VERL_STYLE)
    b.write_text(VERL_STYLE)
    assert reward_labels(["accuracy", f"{a}:compute_score"]) == {"accuracy": "accuracy", f"{a}:compute_score": "compute_score"}
    assert reward_labels([f"{a}:compute_score", f"verl:{b}:compute_score"]) == {
        f"{a}:compute_score": "a_compute_score", f"verl:{b}:compute_score": "b_compute_score"}
