"""The `rl_reasoning` stage: GRPO again, from the cold-start SFT model (DeepSeek-R1 §2.3.2).

R1 adds a language-consistency reward (the share of the chain of thought in the prompt's
language) to accuracy and format, trading a little accuracy for readable, single-language
reasoning. The loop is `stages.grpo`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field

from stages.context import StageContext
from stages.grpo import GRPOConfig, reward_sources, rollouts_schema, run_stage
from stages.metrics import METRICS_SCHEMA

INPUTS: tuple[str, ...] = ("sft", "problems")
SCHEMAS: dict[str, pa.Schema] = {
    "rollouts.parquet": rollouts_schema(["accuracy", "format", "language_consistency"]),
    "metrics.parquet": METRICS_SCHEMA,
}


class Config(GRPOConfig):
    """GRPO knobs (see `stages.grpo.GRPOConfig`); R1's reasoning-RL reward weights."""

    rewards: dict[str, float] = Field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.5, "language_consistency": 0.5})


def external_inputs(cfg: Config) -> dict[str, str]:
    """User reward files' hashes: editing one reruns this stage (`pipeline.runner.stage_key`)."""
    return reward_sources(cfg)


def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext) -> dict[str, Any]:
    return run_stage(cfg, inputs["sft"], inputs["problems"], out, ctx, stage="rl_reasoning",
                     schema=SCHEMAS["rollouts.parquet"])
