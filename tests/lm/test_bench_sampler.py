"""bench/sampler.py and bench/train_step.py run and end with one JSON line (tiny sizes here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_sampler_prints_json_last():
    cmd = [sys.executable, str(ROOT / "bench" / "sampler.py"), "--d-model", "32", "--layers", "1", "--heads", "4",
           "--kv-heads", "2", "--ffn", "64", "--vocab", "64", "--batch", "2", "--prompt-len", "3",
           "--new-tokens", "5", "--threads", "1", "--repeats", "1", "--skip-transformers"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["tokens_per_s_no_cache"] > 0
    assert result["batch"] == 2 and result["new_tokens"] == 5


def test_bench_train_step_times_ours_and_transformers_on_the_same_weights():
    """bench/train_step.py checks transformers' logits against ours, then prints both step times
    and their (equal) losses as the last JSON line."""
    pytest.importorskip("transformers")
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--preset", "micro", "--batch", "2",
           "--seq", "9", "--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["seconds"]["ours"] > 0 and result["seconds"]["transformers"] > 0
    assert abs(result["losses"]["ours"] - result["losses"]["transformers"]) < 1e-4
    assert result["ratio_vs_transformers"] > 0
