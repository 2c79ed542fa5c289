"""A user reward file drives rl_zero; editing it reruns rl_zero and downstream; a broken
reference stops `r1flow run` at once (exit 2, the file and function named)."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from artifacts import RunStore
from pipeline.config import STAGES
from tests.pipeline.cli_helpers import cli


REWARD = '''
def short_answer(completions, completion_ids, answer, trainer_state=None, **kwargs):
    """1 for completions of at most LIMIT tokens."""
    return [1.0 if len(ids) <= LIMIT else 0.0 for ids in completion_ids]

LIMIT = {limit}
'''


def _run(root, run_id, *sets):
    args = ["run", "--preset", "micro", "--root", str(root), "--run-id", run_id, "--json"]
    for s in sets:
        args += ["--set", s]
    code, out = cli(*args)
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow  # two micro runs from rl_zero on (minutes on a loaded 2-core machine)
@pytest.mark.usefixtures("prefect_harness")
def test_user_reward_file_drives_rl_zero_and_an_edit_reruns_downstream(micro_copy, tmp_path):
    root, _ = micro_copy
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD.format(limit=1000))
    rewards = f'rl_zero.rewards={{accuracy = 1.0, format = 0.5, "{path}:short_answer" = 1.0}}'
    first = _run(root, "user-1", rewards)
    assert first["stages"]["problems"]["status"] == "cached" and first["stages"]["base"]["status"] == "cached"
    assert first["stages"]["rl_zero"]["status"] == "ran"
    rollouts = pq.read_table(RunStore(root).load("user-1").stages["rl_zero"].path + "/rollouts.parquet")
    assert rollouts.column("reward_short_answer").to_pylist() == [1.0] * rollouts.num_rows  # every one short
    assert {"reward_accuracy", "reward_format"} <= set(rollouts.column_names)

    path.write_text(REWARD.format(limit=3))  # the user edits the reward
    second = _run(root, "user-2", rewards)
    assert second["stages"]["problems"]["status"] == "cached" and second["stages"]["base"]["status"] == "cached"
    for name in STAGES[STAGES.index("rl_zero"):]:
        assert second["stages"][name]["status"] == "ran", name
    rollouts = pq.read_table(RunStore(root).load("user-2").stages["rl_zero"].path + "/rollouts.parquet")
    lengths = rollouts.column("num_tokens").to_pylist()
    assert rollouts.column("reward_short_answer").to_pylist() == [1.0 if n <= 3 else 0.0 for n in lengths]


def test_broken_reward_reference_fails_before_any_stage(tmp_path, capsys):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD.format(limit=3))
    code, _ = cli("run", "--preset", "micro", "--root", str(tmp_path / "root"), "--set",
                  f'rl_zero.rewards={{accuracy = 1.0, "{path}:short_answr" = 1.0}}')
    assert code == 2  # config validation fails: no flow starts, nothing is written (below)
    err = capsys.readouterr().err
    assert str(path) in err and "no function 'short_answr'" in err and "short_answer" in err
    assert not (tmp_path / "root" / "artifacts").exists() and not (tmp_path / "root" / "runs").exists()
