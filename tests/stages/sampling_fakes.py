"""Test helpers for the sampling stages: a scripted sampler, tiny checkpoints and problem files.

`ScriptedSampler` implements lm.sampler.Sampler by replaying fixed completions per question, so
cold_start / rejection_sampling / evaluate can be tested deterministically without a trained
model; the checkpoints are real (random tiny models saved with lm.checkpoint), so the loading,
prompt rendering and decoding paths are the production ones.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lm.checkpoint import save_checkpoint
from lm.model import MODEL_PRESETS, Transformer
from lm.sampler import Generation, SamplingParams
from lm.tokenizer import Tokenizer, train_bpe
from stages import synthetic
from stages.lm_training import encode_text
from stages.problems import PROBLEMS_SCHEMA

TEMPLATE = "r1_zero_short"


def tiny_tokenizer() -> Tokenizer:
    """A 320-token BPE trained on 300 synthetic documents (~0.03 s)."""
    problems = synthetic.generate_problems(300, 1, synthetic.DEFAULT_TASK_MIX, synthetic.DEFAULT_DIFFICULTY_MIX)
    docs = [d.text for d in synthetic.build_corpus(problems, synthetic.CorpusConfig(), 0)]
    return train_bpe(docs, 320)


def save_tiny_checkpoint(directory: Path, tok: Tokenizer, seed: int = 0, dim: int = 32) -> Path:
    """A random 2-layer model (a few tens of thousands of parameters) saved as an lm checkpoint;
    `dim` (a multiple of 4) also tells checkpoints apart in tests."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(MODEL_PRESETS["micro"], vocab_size=tok.vocab_size, dim=dim, n_layers=2,
                              n_heads=2, n_kv_heads=1, ffn_dim=2 * dim, max_seq_len=256)
    return save_checkpoint(directory, Transformer(cfg), tok, {"stage": "test"})


def write_problems(directory: Path, rows: list[dict]) -> Path:
    """problems.parquet in `directory` from rows with id, prompt, answer, split (language "en")."""
    directory.mkdir(parents=True, exist_ok=True)
    full = [{"source": "test", "language": "en", "difficulty": None, **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=PROBLEMS_SCHEMA), directory / "problems.parquet")
    return directory


class ScriptedSampler:
    """Replays scripted completions: sample j of a question gets script[question][j % len].

    A script entry is a text (ends with end-of-text: finish "stop") or (text, "length") for a
    completion cut at max_new_tokens. Questions are recovered by decoding the prompt ids. Greedy
    calls (temperature 0) answer from `greedy[question]` when given.
    """

    def __init__(self, tok: Tokenizer, script: dict[str, list], template: str = TEMPLATE,
                 greedy: dict[str, str] | None = None) -> None:
        self.tok = tok
        self.script = script
        self.greedy = greedy or {}
        self.by_prompt = {tok.render_prompt(q, template): q for q in script}
        self.counters: dict[str, int] = {}
        self.calls: list[tuple[int, float, int]] = []  # (batch rows, temperature, seed)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Generation]:
        self.calls.append((len(prompts), params.temperature, seed))
        out = []
        for ids in prompts:
            question = self.by_prompt[self.tok.decode(ids)]
            if params.temperature == 0 and question in self.greedy:
                entry = self.greedy[question]
            else:
                j = self.counters.get(question, 0)
                self.counters[question] = j + 1
                entry = self.script[question][j % len(self.script[question])]
            text, finish = (entry, "stop") if isinstance(entry, str) else entry
            tokens = encode_text(self.tok, text) + ([self.tok.eos_id] if finish == "stop" else [])
            out.append(Generation(prompt_ids=list(ids), token_ids=tokens, logprobs=[0.0] * len(tokens),
                                  finish_reason=finish))
        return out

    def factory(self):
        """A SamplerFactory that ignores the model and returns this sampler."""
        return lambda model, tok, batch_size: self


def trace(steps: str, answer: str) -> str:
    """A completion in the corpus format: ' <think> {steps} </think> <answer> {answer} </answer>'."""
    return f" <think> {steps} </think> <answer> {answer} </answer>"
