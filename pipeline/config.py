"""The run config: one typed config per stage, composed, validated before any work.

Each stage module owns its `Config` (a pydantic model with `extra="forbid"`): that class is the
single source of truth for the stage's knobs and defaults. A run config is a preset file (TOML,
shipped under `pipeline/presets/`) or a user's TOML/YAML/JSON file, plus `--set stage.key=value`
overrides, validated section by section. Unknown stages, unknown keys and bad values are errors
that name the offending key.
"""
from __future__ import annotations

import importlib
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES: tuple[str, ...] = (
    "problems", "base", "rl_zero", "cold_start", "sft", "rl_reasoning",
    "rejection_sampling", "dpo", "distill", "evaluate",
)
PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the problem."""


SERVER_SAMPLING_STAGES: tuple[str, ...] = ("cold_start", "rejection_sampling", "evaluate")
"""The stages that only sample (no gradient step): `run.sampler` may send their generation to a
server. The training stages (GRPO's rollouts, on-policy distillation) sample from the weights they
are updating, so they always use the local torch sampler."""


class SamplerSettings(BaseModel):
    """Where the sampling-only stages generate (`[run.sampler]`): r1flow's own torch sampler, or an
    OpenAI-compatible completions server (vLLM, SGLang, llama.cpp) holding the model the user
    started it on (`lm/openai_sampler.py`, README "Scaling out")."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["torch", "openai"] = Field(
        "torch", description="torch: r1flow's sampler on the stage's checkpoint; openai: a /v1/completions server")
    base_url: str | None = Field(None, description="openai: the API root, e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="openai: the model name the server serves (checked at start)")
    concurrency: int = Field(8, ge=1, le=1024, description="openai: requests in flight at once")
    timeout_s: float = Field(600.0, gt=0, description="openai: per-request timeout in seconds")
    max_retries: int = Field(5, ge=0, le=20, description="openai: retries on connection errors, timeouts, 5xx, 429")
    backoff_s: float = Field(1.0, ge=0, le=60, description="openai: first retry's wait (doubles each retry)")
    logprobs: bool = Field(True, description="openai: ask the server for the sampled tokens' log-probs")
    server_stops: bool = Field(True, description="openai: send stop strings to the server (false: r1flow cuts)")
    extra_body: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="openai: further request fields, e.g. llama.cpp's top_k/min_p/repeat_penalty")
    api_key_env: str | None = Field(None, description="openai: environment variable holding a bearer token")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", v):
            raise ValueError("expected http(s)://host:port/v1")
        return v.rstrip("/") if v is not None else None

    @field_validator("extra_body")
    @classmethod
    def _no_core_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(v) & {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "n", "stream",
                                 "logprobs", "stop"})
        if owned:
            raise ValueError(f"{owned} come from the stage's config and run.sampler; extra_body may not set them")
        return v

    @model_validator(mode="after")
    def _server_named(self) -> "SamplerSettings":
        if self.backend == "openai":
            missing = [k for k in ("base_url", "model") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"backend = \"openai\" needs {' and '.join(missing)} "
                                 f"(run.sampler.{missing[0]} = ...)")
        return self

    def cache_payload(self) -> dict[str, Any] | None:
        """What joins the sampling stages' cache keys: None for the torch backend (today's keys
        stay as they are); for a server, the model's name and the settings that change what it
        returns. The address, concurrency, timeouts and retries do not change the samples."""
        if self.backend == "torch":
            return None
        return {"backend": self.backend, "model": self.model, "logprobs": self.logprobs,
                "server_stops": self.server_stops, "extra_body": dict(sorted(self.extra_body.items()))}


class RunSettings(BaseModel):
    """Settings shared by every stage of a run (the `[run]` section)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, lt=2**63)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # Data parallelism inside a stage (pipeline/launch.py): more than one process launches the
    # model stages through torchrun; gloo on CPU, NCCL on CUDA (one GPU per process).
    nproc_per_node: int = Field(1, ge=1, description="processes per host for the model stages")
    nnodes: int = Field(1, ge=1, description="hosts taking part in each model stage")
    node_rank: int = Field(0, ge=0, description="this host's rank among nnodes (0 publishes the artifact)")
    rdzv_endpoint: str | None = Field(None, description="host:port of node 0's rendezvous (several hosts)")
    # "fsdp": base, sft and distill shard their training copy (weights, gradients, AdamW moments)
    # over the ranks with FSDP2; the other training stages stay replicated. Not in any cache key.
    shard: Literal["none", "fsdp"] = Field("none", description="parameter sharding of the next-token training stages")
    # Where cold_start, rejection_sampling and evaluate generate (SERVER_SAMPLING_STAGES).
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)

    @model_validator(mode="after")
    def _check_nodes(self) -> "RunSettings":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint = \"host:port\" of node 0 (the same on every host)")
        if self.rdzv_endpoint is not None and not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d+", self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return v

    # Stages run as deployments on Prefect work pools (pipeline/pools.py), e.g.
    # {rl_zero = "gpu", distill = "gpu-small"}; the others run in the flow's own process.
    # Not part of any cache key (like `device`): where a stage runs does not change its bytes.
    work_pools: dict[str, str] = Field(
        default_factory=dict,
        description="stage -> Prefect work pool that runs it (needs a Prefect server and a shared root)")

    @field_validator("work_pools")
    @classmethod
    def _known_placements(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = [s for s in v if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; the stages are: {', '.join(STAGES)}")
        bad = {s: p for s, p in v.items() if not _POOL.fullmatch(p)}
        if bad:
            raise ValueError(f"work pool names {bad}: use letters, digits, '.', '-', '_'")
        return v

    # Live per-step scalars of the training stages; "tensorboard" writes event files under
    # <root>/runs/<run_id>/tensorboard/<stage>. Not part of any cache key.
    trackers: list[str] = []

    @field_validator("trackers")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        from pipeline.trackers import TRACKERS

        unknown = [t for t in v if t not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker(s) {unknown}; known: {sorted(TRACKERS)}")
        return v


_DEVICE = re.compile(r"auto|cpu|cuda(?::\d+)?")
_POOL = re.compile(r"[\w.-]+")


@dataclass
class RunConfig:
    run: RunSettings
    stages: dict[str, BaseModel]
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run": self.run.model_dump(mode="json")}
        out.update({name: cfg.model_dump(mode="json") for name, cfg in self.stages.items()})
        return out

    def stage(self, name: str) -> BaseModel:
        if name not in self.stages:
            raise ConfigError(f"stage {name!r} is not configured in this run")
        return self.stages[name]


def stage_sampler(run: RunSettings, name: str) -> Any:
    """The `StageContext.sampler` of a stage: a server SamplerFactory (`stages.sampling.server_sampler`)
    when `run.sampler.backend` is "openai" and the stage only samples; None otherwise (the stage's
    own torch sampler)."""
    s = run.sampler
    if s.backend == "torch" or name not in SERVER_SAMPLING_STAGES:
        return None
    from lm.openai_sampler import ServerSettings
    from stages.sampling import server_sampler

    # the same fields; SamplerSettings checked base_url and model for "openai"
    return server_sampler(ServerSettings(**s.model_dump(exclude={"backend"})))


def stage_module(name: str) -> ModuleType:
    """The module implementing a stage (every name in STAGES has one)."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; the stages are: {', '.join(STAGES)}")
    return importlib.import_module(f"stages.{name}")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)  # safe_load: plain data only, never Python objects
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is malformed: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of stage sections")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(preset: str | None = "tiny", file: Path | str | None = None) -> dict[str, Any]:
    """The preset's sections, with a user file's sections merged over them."""
    raw: dict[str, Any] = {}
    if preset is not None:
        path = PRESET_DIR / f"{preset}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}; available presets: {', '.join(available_presets())}")
        raw = _read_file(path)
    if file is not None:
        raw = _merge(raw, _read_file(Path(file)))
    return raw


def parse_value(text: str) -> Any:
    """A `--set` value: a TOML literal (1e-4, true, [1, 2], "x"), else JSON, else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `stage.key=value` (or `stage.key.sub=value`) overrides to a raw config."""
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected stage.key=value")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected stage.key=value, e.g. sft.lr=1e-4")
        section, *path, key = parts
        if section != "run" and section not in STAGES:
            raise ConfigError(f"--set {item!r}: unknown stage {section!r}; the stages are: run, {', '.join(STAGES)}")
        node = raw.setdefault(section, {})
        for p in path:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a table")
        node[key] = parse_value(value.strip())
    return raw


def _format_validation(section: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in (section, *e["loc"]))
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        else:
            got = e.get("input")
            lines.append(f"{loc}: {e['msg']} (got {got!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts_bool(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is Literal and any(isinstance(a, bool) for a in typing.get_args(annotation))


def _no_bool_numbers(section: str, cls: type[BaseModel], values: dict[str, Any]) -> None:
    """`--set run.seed=true` is a mistake, not seed 1: a boolean for a number field is an error
    (pydantic's lax mode would take it as 0/1)."""
    for key, value in values.items():
        field = cls.model_fields.get(key)
        if isinstance(value, bool) and field is not None and not _accepts_bool(field.annotation):
            raise ConfigError(f"invalid config:\n  {section}.{key}: expected a number, got {str(value).lower()}")


def validate(raw: dict[str, Any], stages: tuple[str, ...] | None = None, preset: str | None = None) -> RunConfig:
    """Validate a raw config into typed per-stage configs.

    Args:
        raw: sections keyed by stage name, plus an optional `run` section.
        stages: the stages that must be available (default: every stage in `raw` and STAGES);
            a listed stage without a section gets its Config's defaults.
    """
    unknown = [k for k in raw if k != "run" and k not in STAGES]
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; the sections are: run, {', '.join(STAGES)}")
    if not isinstance(raw.get("run", {}), dict):
        raise ConfigError(f"run: expected a table of settings, got {type(raw['run']).__name__}")
    _no_bool_numbers("run", RunSettings, raw.get("run", {}))
    if isinstance(raw.get("run", {}).get("sampler"), dict):
        _no_bool_numbers("run.sampler", SamplerSettings, raw["run"]["sampler"])
    try:
        run = RunSettings(**raw.get("run", {}))
    except ValidationError as e:
        raise ConfigError(_format_validation("run", e)) from e
    wanted = stages if stages is not None else STAGES
    configs: dict[str, BaseModel] = {}
    for name in STAGES:
        if name not in wanted:
            continue
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a table of settings, got {type(section).__name__}")
        cls = stage_module(name).Config
        _no_bool_numbers(name, cls, section)
        try:
            configs[name] = cls(**section)
        except ValidationError as e:
            raise ConfigError(_format_validation(name, e)) from e
    return RunConfig(run=run, stages=configs, preset=preset)


def load_config(
    preset: str | None = "tiny",
    file: Path | str | None = None,
    overrides: list[str] | None = None,
    stages: tuple[str, ...] | None = None,
) -> RunConfig:
    """Preset + file + overrides -> validated RunConfig (the one entry point the CLI uses)."""
    raw = apply_overrides(load_raw(preset, file), overrides or [])
    return validate(raw, stages=stages, preset=preset)
