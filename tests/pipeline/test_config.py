import pytest

from pipeline.config import (
    STAGES,
    ConfigError,
    apply_overrides,
    available_presets,
    load_config,
    load_raw,
    parse_value,
    validate,
)


@pytest.mark.parametrize("preset", available_presets())
def test_every_shipped_preset_loads_and_validates(preset):
    cfg = load_config(preset)
    assert set(cfg.stages) == set(STAGES)
    assert cfg.to_dict()["run"]["seed"] == cfg.run.seed


def test_presets_include_the_documented_ones():
    assert {"tiny", "micro", "smollm2-135m"} <= set(available_presets())


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; available presets: .*micro"):
        load_raw("huge")


def test_malformed_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sft\nlr = ")
    with pytest.raises(ConfigError, match="bad.toml is malformed"):
        load_raw("micro", bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_raw("micro", tmp_path / "missing.toml")


def test_user_file_merges_over_preset(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text("[run]\nseed = 7\n")
    assert load_config("micro", f).run.seed == 7


def test_unknown_section_and_key_are_named():
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['sftt'\]"):
        validate({"sftt": {}})
    with pytest.raises(ConfigError, match="problems.bogus: unknown key"):
        validate({"problems": {"bogus": 1}}, stages=("problems",))


def test_bad_value_is_named_with_what_was_given():
    raw = apply_overrides({}, ["run.seed=abc"])
    with pytest.raises(ConfigError, match=r"run.seed: .*integer.*\(got 'abc'\)"):
        validate(raw, stages=())
    with pytest.raises(ConfigError, match="run.dtype"):
        validate({"run": {"dtype": "fp8"}}, stages=())


@pytest.mark.parametrize("text, value", [
    ("1e-4", 1e-4), ("3", 3), ("true", True), ("[1, 2]", [1, 2]), ('"x y"', "x y"),
    ("synthetic", "synthetic"), ('[{"name": "s", "model": "s"}]', [{"name": "s", "model": "s"}]),
])
def test_set_values_parse_as_toml_then_json_then_string(text, value):
    assert parse_value(text) == value


@pytest.mark.parametrize("item, message", [
    ("sft.lr", "expected stage.key=value"),
    ("lr=1", "expected stage.key=value"),
    ("nostage.lr=1", "unknown stage 'nostage'"),
])
def test_malformed_overrides(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides({}, [item])


def test_overrides_apply_and_validate():
    cfg = load_config("micro", overrides=["run.seed=5", "sft.lr=0.002"])
    assert cfg.run.seed == 5 and cfg.stage("sft").lr == 0.002
    with pytest.raises(ConfigError, match="sft.nope: unknown key"):
        load_config("micro", overrides=["sft.nope=1"])


@pytest.mark.parametrize("override,message", [
    ("run.device=quantum", "run.device: Value error, expected auto, cpu, cuda or cuda:N (got 'quantum')"),
    ("run.seed=true", "run.seed: expected a number, got true"),
    ("run.seed=-1", "run.seed: Input should be greater than or equal to 0"),
    ("base.steps=false", "base.steps: expected a number, got false"),
])
def test_strict_types_for_run_and_stage_fields(override, message):
    """Issue 20: `--set run.device=quantum` ran problems, then a torch traceback; `run.seed=true` was seed 1."""
    with pytest.raises(ConfigError) as e:
        load_config("micro", overrides=[override])
    assert message in str(e.value)
    assert load_config("micro", overrides=["run.device=cuda:1"]).run.device == "cuda:1"


def test_reward_names_and_references_are_checked_at_load(tmp_path):
    from pipeline.config import ConfigError, load_config

    good = tmp_path / "my_rewards.py"
    good.write_text("def bonus(completions, **kw):\n    return [0.0 for _ in completions]\n")
    cfg = load_config("micro", overrides=[f'rl_zero.rewards={{accuracy = 1.0, "{good}:bonus" = 0.5}}'])
    assert f"{good}:bonus" in cfg.stage("rl_zero").rewards
    for ref, named in ((f"{good}:missing", "has no function 'missing'"),
                       (f"{tmp_path}/absent.py:bonus", "absent.py does not exist"),
                       ("accuracyy", "unknown reward 'accuracyy'")):
        with pytest.raises(ConfigError) as e:
            load_config("micro", overrides=[f'rl_reasoning.rewards={{"{ref}" = 1.0}}'])
        assert "rl_reasoning" in str(e.value) and named in str(e.value)
    with pytest.raises(ConfigError, match="reward_options names rewards without a weight"):
        load_config("micro", overrides=["rl_zero.reward_options={repetition_penalty = {ngram_size = 2}}"])


# ------------------------------------------------------------------ run.sampler (OpenAI server)

SERVER = ["run.sampler.backend=openai", "run.sampler.base_url=http://127.0.0.1:8000/v1/", "run.sampler.model=teacher"]


def test_the_sampler_defaults_to_torch_and_a_server_is_set_with_set():
    assert load_config("micro").run.sampler.backend == "torch"
    s = load_config("micro", None, [*SERVER, "run.sampler.extra_body={top_k = 0, min_p = 0.0}"]).run.sampler
    assert (s.backend, s.base_url, s.model, s.extra_body) == ("openai", "http://127.0.0.1:8000/v1", "teacher",
                                                              {"top_k": 0, "min_p": 0.0})


@pytest.mark.parametrize("overrides, message", [
    (["run.sampler.backend=openai"], r"run.sampler: .*backend = \"openai\" needs base_url and model"),
    (["run.sampler.backend=openai", "run.sampler.base_url=http://h:1/v1"], r"run.sampler: .*needs model"),
    (["run.sampler.backend=vllm"], r"run.sampler.backend: Input should be 'torch' or 'openai'"),
    ([*SERVER, "run.sampler.base_url=h:8000"], r"run.sampler.base_url: .*expected http\(s\)://host:port/v1"),
    ([*SERVER, "run.sampler.concurrency=0"], r"run.sampler.concurrency: .*greater than or equal to 1"),
    ([*SERVER, "run.sampler.max_retries=true"], r"run.sampler.max_retries: expected a number, got true"),
    ([*SERVER, "run.sampler.extra_body={seed = 1}"], r"run.sampler.extra_body: .*\['seed'\] come from"),
    ([*SERVER, "run.sampler.url=x"], r"run.sampler.url: unknown key"),
])
def test_bad_sampler_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("micro", None, overrides)


def test_a_bad_sampler_setting_exits_2_on_the_cli():
    from tests.pipeline.cli_helpers import cli

    assert cli("config", "show", "--preset", "micro", "--set", "run.sampler.backend=openai")[0] == 2
    code, out = cli("config", "show", "--preset", "micro", *[a for s in SERVER for a in ("--set", s)])
    assert code == 0 and 'backend = "openai"' in out
