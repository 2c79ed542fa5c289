"""Parity checks between an r1flow model + tokenizer and what transformers loads from an export:
token ids of the varied texts, next-token logits (fp32) and 32 greedy tokens."""
from __future__ import annotations

import torch

from lm.model import Transformer
from lm.sampler import SamplingParams, TorchSampler
from lm.tokenizer import Tokenizer
from tests.lm.varied_texts import varied_texts

# Bytes a tokenizer must handle too: controls, a lone combining mark, DEL, and a 4-byte character.
EXTRA_TEXTS = ["\x00\x01\x1f end", "e\u0301 \u0301", "\x7f", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕏", "\ufeffbom", " \n \n  \n "]


def assert_same_ids(tok: Tokenizer, hf_tok, specials: list[str] | None = None) -> int:
    """Every varied text encodes to the same ids (no BOS added by either); returns how many."""
    texts = varied_texts(specials if specials is not None else list(tok.special_tokens)) + EXTRA_TEXTS
    differ = [s for s in texts if hf_tok.encode(s, add_special_tokens=False) != tok.encode(s)]
    assert not differ, f"{len(differ)}/{len(texts)} texts encode differently, e.g. {differ[:3]!r}"
    return len(texts)


def assert_same_logits(model: Transformer, hf_model, prompts: list[list[int]], tol: float = 1e-4) -> float:
    """Next-token logits of every prompt agree within `tol`; returns the largest difference."""
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            diff = (model(x)[0, -1] - hf_model(x).logits[0, -1]).abs().max().item()
            assert diff < tol, (ids[:8], diff)
            worst = max(worst, diff)
    return worst


def assert_same_greedy(model: Transformer, tok: Tokenizer, hf_model, prompt: list[int], n: int = 32) -> list[int]:
    """r1flow's sampler and `hf_model.generate` pick the same `n` greedy tokens (no early stop)."""
    ours = TorchSampler(model, tok).generate([prompt], SamplingParams(max_new_tokens=n, temperature=0.0),
                                             seed=0)[0].token_ids
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=tok.pad_id)
    theirs = out[0, len(prompt):].tolist()
    assert len(ours) == n and ours == theirs, (ours, theirs)
    return ours
