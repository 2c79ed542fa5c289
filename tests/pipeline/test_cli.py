"""The CLI a new user meets first: --version, help, config show/keys, refusals, records and reports
that work from any directory. Nothing here starts Prefect."""
from __future__ import annotations

import argparse
import json
import tomllib

import pytest

from artifacts import RunStore, StageEntry
from pipeline.cli import build_parser, main
from pipeline.config import STAGES, load_config
from pipeline.runner import execute_stage
from tests.pipeline.cli_helpers import cli

SMALL = ["problems.n_train=8", "problems.n_test=4", "problems.corpus_docs=20"]


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("r1flow ")


def test_every_option_has_help_and_shows_its_default():
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["generate"].format_help().split())
    for shown in ("--max-new-tokens MAX_NEW_TOKENS most tokens generated (default: 128)",
                  "(default: 0.0)", "(default: 1.0)", "(default: auto)", "(default: fp32)"):
        assert shown in help_text


def test_config_show_prints_the_resolved_config_as_toml(tmp_path):
    code, out = cli("config", "show", "--preset", "micro", "--set", "sft.lr=0.001")
    assert code == 0
    shown = tomllib.loads(out)
    assert shown["sft"]["lr"] == 0.001 and shown["run"]["device"] == "cpu"
    (tmp_path / "c.toml").write_text(out)  # what `show` prints, `--config` reads back unchanged
    code, again = cli("config", "show", "--preset", "micro", "--config", str(tmp_path / "c.toml"))
    assert code == 0 and tomllib.loads(again) == shown


def test_yaml_config_files_are_accepted(tmp_path):
    (tmp_path / "c.yaml").write_text("rl_zero:\n  steps: 3\n  rewards: {accuracy: 1.0}\nrun:\n  seed: 7\n")
    code, out = cli("config", "show", "--preset", "micro", "--config", str(tmp_path / "c.yaml"), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["rl_zero"]["steps"] == 3 and data["rl_zero"]["rewards"] == {"accuracy": 1.0}
    assert data["run"]["seed"] == 7
    (tmp_path / "bad.yaml").write_text("rl_zero: [unclosed\n")
    assert cli("config", "show", "--config", str(tmp_path / "bad.yaml"))[0] == 2


def test_config_keys_lists_type_default_and_description():
    code, out = cli("config", "keys", "rl_zero", "--json")
    assert code == 0
    keys = {k["key"]: k for k in json.loads(out)}
    assert keys["rewards"]["type"] == "dict[str, float]" and keys["rewards"]["default"] == {"accuracy": 1.0,
                                                                                             "format": 0.5}
    assert keys["steps"]["default"] == 100
    code, out = cli("config", "keys")
    assert code == 0
    assert "problems.n_train" in out and "run.seed" in out and "evaluate.k" in out
    assert "samples per problem for pass@1, maj@k, pass@k" in out  # descriptions come from the models
    # a nested table's keys are listed one by one, as --set sets them
    assert "rejection_sampling.orm.enabled" in out and "rejection_sampling.orm.steps" in out


@pytest.mark.parametrize("override, names", [
    ("rl_zero.rewards={accuracyy=1}", "unknown reward 'accuracyy'"),
    ('rl_reasoning.template="r1zero"', "unknown template 'r1zero'"),
    ('evaluate.template="chatml"', "unknown template 'chatml'"),
    ('rl_zero.advantage="grpo"', "rl_zero.advantage"),
])
def test_names_are_checked_when_the_config_loads(tmp_path, capsys, override, names):
    code, _ = cli("run", "--preset", "micro", "--root", str(tmp_path), "--set", override)
    assert code == 2
    assert names in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any run was recorded


def test_run_refuses_to_overwrite_an_existing_run(tmp_path, capsys):
    record = RunStore(tmp_path).create({"run": {}}, STAGES, preset="micro", run_id="mine")
    code, _ = cli("run", "--preset", "micro", "--root", str(tmp_path), "--run-id", "mine")
    assert code == 2
    err = capsys.readouterr().err
    assert "run 'mine' already exists" in err and "--overwrite" in err
    assert RunStore(tmp_path).load("mine").created == record.created  # untouched


def _problems_run(root, run_id="r1"):
    cfg = load_config("micro", None, SMALL)
    RunStore(root).create(cfg.to_dict(), STAGES, preset="micro", run_id=run_id)
    return execute_stage("problems", cfg, run_id, root, log=lambda _: None)


def test_records_made_with_a_relative_root_work_from_anywhere(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    _problems_run(__import__("pathlib").Path("r1flow-data"))
    stored = json.loads((tmp_path / "here/r1flow-data/runs/r1/run.json").read_text())
    assert stored["stages"]["problems"]["path"].startswith("artifacts/problems/")  # relative to the root
    monkeypatch.chdir(tmp_path / "elsewhere")
    root = str(tmp_path / "here/r1flow-data")
    code, out = cli("inspect", "r1/problems", "--root", root, "--json")
    assert code == 0 and json.loads(out)["rows"] > 0
    code, out = cli("report", "r1", "--root", root)
    assert code == 0 and "report:" in out


def test_report_on_a_run_it_cannot_read_is_an_error(tmp_path, capsys):
    RunStore(tmp_path).create({"run": {}}, STAGES, preset="micro", run_id="empty")
    assert cli("report", "empty", "--root", str(tmp_path))[0] == 2
    assert "has no artifacts yet" in capsys.readouterr().err
    outcome = _problems_run(tmp_path)
    for f in outcome.path.iterdir():
        f.unlink()
    outcome.path.rmdir()
    assert cli("report", "r1", "--root", str(tmp_path))[0] == 2
    assert "artifact recorded at" in capsys.readouterr().err


def test_report_on_a_corrupt_artifact_is_an_error(tmp_path, capsys):
    outcome = _problems_run(tmp_path)
    data = outcome.path / "problems.parquet"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, still a file: only its hash (and mtime) tell
    data.write_bytes(bytes(raw))
    assert cli("report", "r1", "--root", str(tmp_path))[0] == 2
    assert "problems.parquet" in capsys.readouterr().err


def test_report_says_which_stages_are_stale(tmp_path, capsys):
    outcome = _problems_run(tmp_path)
    runs = RunStore(tmp_path)
    record = runs.load("r1")
    record.stages["base"] = StageEntry(status="stale", path=str(outcome.path))
    runs.save(record)
    code, out = cli("report", "r1", "--root", str(tmp_path))
    assert code == 0
    assert "stale stages (base)" in capsys.readouterr().err
    report = (tmp_path / "runs/r1/report/report.md").read_text()
    assert "**Stale:** base" in report and "--downstream" in report
