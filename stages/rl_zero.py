"""The `rl_zero` stage: pure-RL GRPO from the base model (DeepSeek-R1-Zero, DeepSeek-AI 2025 §2.2).

R1-Zero's rewards are rule-based only: accuracy (the answer inside <answer> matches) and format
(the reasoning inside <think> tags). No supervised data; the loop is `stages.grpo`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field

from stages.context import StageContext
from stages.grpo import GRPOConfig, reward_sources, rollouts_schema, run_stage
from stages.metrics import METRICS_SCHEMA

INPUTS: tuple[str, ...] = ("base", "problems")
SCHEMAS: dict[str, pa.Schema] = {
    "rollouts.parquet": rollouts_schema(["accuracy", "format"]),
    "metrics.parquet": METRICS_SCHEMA,
}


class Config(GRPOConfig):
    """GRPO knobs (see `stages.grpo.GRPOConfig`); R1-Zero's reward weights."""

    rewards: dict[str, float] = Field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})


def external_inputs(cfg: Config) -> dict[str, str]:
    """User reward files' hashes: editing one reruns this stage (`pipeline.runner.stage_key`)."""
    return reward_sources(cfg)


def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext) -> dict[str, Any]:
    return run_stage(cfg, inputs["base"], inputs["problems"], out, ctx, stage="rl_zero",
                     schema=SCHEMAS["rollouts.parquet"])
