"""Shared fixtures for the model-engine tests: tiny random models and a small trained tokenizer."""
from __future__ import annotations

import random

import pytest
import torch

from lm.model import ModelConfig, Transformer
from lm.tokenizer import Tokenizer, train_bpe

# One thread: these models are tiny, and on a shared, loaded machine a second OpenMP thread mostly
# waits at barriers (a 2-layer forward measured 10-100x slower with 2 threads under load).
torch.set_num_threads(1)


def small_config(vocab_size: int = 96, n_kv_heads: int = 2, **overrides) -> ModelConfig:
    """A 2-layer, 4-head, 32-dim model: a few thousand parameters, milliseconds per forward."""
    fields = dict(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=64,
                  max_seq_len=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def small_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(small_config(**overrides))
    # Larger-than-default weights give peaked, well-separated logits, so greedy decoding has no
    # near-ties that float rounding could flip.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0 if "tok_embeddings" in name else 4.0)
    return model.eval()


def corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"User: What is {a} + {b}?\nAssistant: <think> {a} plus {b} is {a + b} </think> "
                     f"<answer> {a + b} </answer> 数学题：{a}加{b}等于{a + b}。 x^2 + y^2 = z^2, ∫ f(x) dx")
    return lines


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_bpe(corpus(), vocab_size=400)


@pytest.fixture
def make_model():
    """Factory fixture: make_model(seed=0, **ModelConfig overrides) -> eval-mode Transformer."""
    return small_model


@pytest.fixture
def make_config():
    return small_config
