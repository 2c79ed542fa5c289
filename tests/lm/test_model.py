"""The Llama model: config, presets, parameter names, GQA, KV cache and padding equivalences."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import torch.nn.functional as F

from lm import model as model_module
from lm.model import MODEL_PRESETS, KVCache, ModelConfig, Transformer, apply_rope, grouped_attention, rope_table


def test_config_dict_round_trip_and_validation(make_config):
    cfg = make_config(qkv_bias=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_experts": 8})
    with pytest.raises(ValueError, match="n_heads 4 is not a multiple of n_kv_heads 3"):
        make_config(n_kv_heads=3)


def test_presets_sizes():
    vocab = 2048
    sizes = {name: dataclasses.replace(cfg, vocab_size=vocab).num_params() for name, cfg in MODEL_PRESETS.items()}
    assert 0.5e6 < sizes["micro"] < 1.5e6
    assert 2e6 < sizes["tiny"] < 6e6
    assert sizes["tiny-student"] <= sizes["tiny"] / 3
    smol = MODEL_PRESETS["smollm2-135m"]
    assert (smol.dim, smol.n_layers, smol.n_heads, smol.n_kv_heads, smol.ffn_dim, smol.vocab_size) == \
        (576, 30, 9, 3, 1536, 49152)
    # SmolLM2-135M has 134,515,008 parameters (tied embeddings).
    assert smol.num_params() == 134_515_008


def test_state_dict_uses_meta_names(make_config):
    model = Transformer(make_config(qkv_bias=True, tie_embeddings=False))
    sd = model.state_dict()
    hd = 8
    assert sd["tok_embeddings.weight"].shape == (96, 32)
    assert sd["layers.1.attention.wq.weight"].shape == (4 * hd, 32)
    assert sd["layers.1.attention.wk.weight"].shape == (2 * hd, 32)
    assert sd["layers.1.attention.wk.bias"].shape == (2 * hd,)
    assert sd["layers.0.attention.wo.weight"].shape == (32, 4 * hd)
    assert sd["layers.0.feed_forward.w1.weight"].shape == (64, 32)
    assert sd["layers.0.feed_forward.w2.weight"].shape == (32, 64)
    assert sd["layers.0.attention_norm.weight"].shape == (32,)
    assert sd["norm.weight"].shape == (32,) and sd["output.weight"].shape == (96, 32)
    assert model.num_params() == model.config.num_params()
    tied = Transformer(make_config()).state_dict()
    assert "output.weight" not in tied and not any("rope" in k for k in tied)


def test_rope_rotates_interleaved_pairs():
    # Pair (x0, x1) = (1, 0) at position p with head_dim 2 rotates by angle p: (cos p, sin p).
    freqs = rope_table(head_dim=2, max_len=4, theta=10000.0)
    x = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2).expand(1, 4, 1, 2)  # [B, T, H, hd]
    out = apply_rope(x, freqs.view(1, 4, 1, 1))
    p = torch.arange(4.0)
    torch.testing.assert_close(out[0, :, 0], torch.stack([p.cos(), p.sin()], dim=-1))


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_kv_cache_matches_full_forward(make_model, n_kv_heads):
    """GQA with n_kv_heads = 1 (MQA), between, and = n_heads (MHA)."""
    model = make_model(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(tokens)  # [3, 20, V]
        cache = KVCache.for_model(model.config, 3, 24)
        pieces = [model(tokens[:, :9], cache=cache)]
        for t in range(9, 20):
            pieces.append(model(tokens[:, t:t + 1], cache=cache))
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [1, 4])
def test_left_padding_matches_unpadded(make_model, n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    seq = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), seq], dim=1)  # [1, 17]
    key_mask = torch.ones(1, 17, dtype=torch.bool)
    key_mask[:, :5] = False
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        ref = model(seq)
        out = model(padded, positions=positions, key_mask=key_mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 5:], ref, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads(make_model):
    """n_kv_heads=1 is MHA whose k/v heads are all the same head."""
    mqa = make_model(n_kv_heads=1)
    mha = Transformer(dataclasses.replace(mqa.config, n_kv_heads=4)).eval()
    sd = mqa.state_dict()
    for i in range(mqa.config.n_layers):
        for name in ("wk", "wv"):
            key = f"layers.{i}.attention.{name}.weight"
            sd[key] = sd[key].repeat(4, 1)  # [4*hd, dim]: the single head copied to every head
    mha.load_state_dict(sd)
    tokens = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(mha(tokens), mqa(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1), (4, 4)])
def test_grouped_attention_equals_sdpa_values_and_gradients(heads, kv_heads):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, heads, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(3, kv_heads, 9, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(3, kv_heads, 9, 8, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(3, 1, 5, 9, generator=g) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    ours = grouped_attention(q, k, v, mask)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_padded_training_forward_same_with_either_attention_kernel(make_model, monkeypatch):
    """The masked (left-padded) forward gives the same logits and gradients through the batched-
    matmul attention and through SDPA."""
    model = make_model(n_kv_heads=2).train()
    tokens = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(5))
    key_mask = torch.ones(3, 12, dtype=torch.bool)
    key_mask[0, :4] = False
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(tokens, positions=positions, key_mask=key_mask)
        out[key_mask].square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(model_module, "BMM_ATTENTION_MAX_SCORES", 1 << 20)
    out_bmm, grads_bmm = run()
    monkeypatch.setattr(model_module, "BMM_ATTENTION_MAX_SCORES", 0)
    out_sdpa, grads_sdpa = run()
    torch.testing.assert_close(out_bmm, out_sdpa, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_bmm, grads_sdpa):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_max_seq_len_is_enforced(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_bf16_forward_runs_and_keeps_rope_table(make_model):
    model = make_model().to(torch.bfloat16)
    assert model.rope_freqs.dtype == torch.complex64
    with torch.inference_mode():
        out = model(torch.randint(0, 96, (2, 8)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_training_forward_backward(make_model):
    model = make_model().train()
    tokens = torch.randint(0, 96, (2, 16))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), tokens[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_matches_transformers_llama(make_model):
    """Same logits as transformers' LlamaForCausalLM given the Meta->HF rope permutation."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from sampler import to_hf_llama  # bench/sampler.py

    model = make_model(tie_embeddings=False, n_kv_heads=2)
    hf = to_hf_llama(model)
    tokens = torch.randint(0, 96, (2, 12))
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("onednn", [True, False])
def test_fused_inference_matches_plain_forward_and_cleans_up(make_model, onednn, monkeypatch):
    from lm.model import InferenceLinear

    monkeypatch.setattr(InferenceLinear, "use_onednn", onednn)
    model = make_model(qkv_bias=True, tie_embeddings=False)
    tokens = torch.randint(0, 96, (3, 10))
    with torch.inference_mode():
        plain = model(tokens)
        with model.fused_inference(batch_size=3):
            assert model.layers[0].attention.fast is not None and model.fast_output is not None
            fused = model(tokens)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert model.fast_output is None and all(l.attention.fast is None and l.feed_forward.fast is None
                                             for l in model.layers)
    with pytest.raises(RuntimeError, match="inference-mode generation only"):
        with model.fused_inference():
            pass


def test_kept_fused_weights_are_reused_until_a_weight_changes_and_never_copied(make_model):
    """keep=True: one packing serves every block of the same batch-size bucket; an optimizer step or
    a loaded state dict (both bump the version counters) repacks; copies leave the snapshot behind."""
    import copy

    model = make_model()
    tokens = torch.randint(0, 96, (3, 6))
    with torch.inference_mode():
        with model.fused_inference(3, keep=True):
            first = model(tokens)
        kept = model._kept_fused
        with model.fused_inference(4, keep=True):  # 3 and 4 round up to the same bucket
            torch.testing.assert_close(model(tokens), first)
        assert model._kept_fused is kept and model.fast_output is None
        with model.fused_inference(5, keep=True):
            pass
        assert model._kept_fused is not kept
    clone = copy.deepcopy(model)
    assert clone._kept_fused is None

    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(tokens).sum().backward()
    opt.step()
    with torch.inference_mode():
        with model.fused_inference(3, keep=True):
            stepped = model(tokens)
        torch.testing.assert_close(stepped, model(tokens), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(stepped, first)
        model.load_state_dict(clone.state_dict())
        with model.fused_inference(3, keep=True):
            torch.testing.assert_close(model(tokens), first, atol=1e-5, rtol=1e-5)
    model.drop_fused()
    assert model._kept_fused is None


def test_fused_inference_snapshot_is_dropped_after_weight_updates(make_model):
    """Weights changed between generations are seen by the next one (nothing cached across)."""
    model = make_model()
    tokens = torch.randint(0, 96, (2, 6))
    with torch.inference_mode(), model.fused_inference(2):
        before = model(tokens)
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight.data.mul_(3.0)  # .data: no version-counter bump
    with torch.inference_mode():
        plain = model(tokens)
        with model.fused_inference(2):
            after = model(tokens)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, plain, atol=1e-5, rtol=1e-5)
