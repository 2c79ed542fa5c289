"""LoRA / DoRA: merged forward equals unmerged, exact unmerge, adapters-only saving and loading."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lm.checkpoint import load_checkpoint, save_checkpoint
from lm.lora import (LoraConfig, LoRALinear, apply_lora, load_adapters, lora_parameters, merge_lora,
                     save_adapters, unmerge_lora)


def _adapted(make_model, dora: bool):
    model = make_model()
    cfg = LoraConfig(r=4, alpha=8, targets=("wq", "wv", "w2"), dora=dora)
    wrapped = apply_lora(model, cfg)
    assert wrapped == [f"layers.{i}.{n}" for i in range(2)
                       for n in ("attention.wq", "attention.wv", "feed_forward.w2")]
    with torch.no_grad():  # as if trained: B away from zero, magnitudes changed
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
            if "lora_magnitude" in name:
                p.mul_(1.3)
    return model, cfg


def test_fresh_adapters_leave_the_model_unchanged(make_model):
    ids = torch.randint(0, 96, (2, 8))
    base = make_model()
    with torch.no_grad():
        ref = base(ids)
    for dora in (False, True):
        model = make_model()
        apply_lora(model, LoraConfig(r=4, dora=dora))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_equals_unmerged_forward_and_unmerge_is_exact(make_model, dora):
    model, _ = _adapted(make_model, dora)
    ids = torch.randint(0, 96, (2, 8))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
        unmerge_lora(model)
        again = model(ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, unmerged)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n.endswith("weight"))


@pytest.mark.parametrize("dora", [False, True])
def test_only_adapters_train(make_model, dora):
    model, _ = _adapted(make_model, dora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = {"lora_A", "lora_B"} | ({"lora_magnitude"} if dora else set())
    assert trainable and all(n.rsplit(".", 1)[-1] in kinds for n in trainable)
    assert len(lora_parameters(model)) == len(trainable)
    ids = torch.randint(0, 96, (2, 8))
    model(ids).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert model.tok_embeddings.weight.grad is None


@pytest.mark.parametrize("dora", [False, True])
def test_save_adapters_alone_and_load_them(make_model, dora, tmp_path):
    model, cfg = _adapted(make_model, dora)
    save_adapters(tmp_path / "ad", model, cfg)
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")  # PEFT's names
    assert tensors and all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")) for k in tensors)
    fresh = make_model()  # same base weights (same seed)
    loaded_cfg = load_adapters(tmp_path / "ad", fresh)
    assert loaded_cfg == cfg
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), atol=0, rtol=0)


def test_checkpoint_of_adapted_model_is_a_plain_merged_model(make_model, tmp_path):
    model, _ = _adapted(make_model, dora=True)
    save_checkpoint(tmp_path / "ck", model, None)
    plain, _, _ = load_checkpoint(tmp_path / "ck")
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_no_matching_target(make_model):
    with pytest.raises(ValueError, match="no linear layer matches"):
        apply_lora(make_model(), LoraConfig(targets=("nope",)))


@pytest.mark.parametrize("dora", [False, True])
def test_sampling_an_adapted_model_equals_sampling_it_merged(make_model, dora):
    from lm.sampler import SamplingParams, TorchSampler

    model, _ = _adapted(make_model, dora)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    prompts = [[1, 2, 3], [4, 5]]
    adapted = TorchSampler(model, None).generate(prompts, params, seed=0)
    merge_lora(model)
    merged = TorchSampler(model, None).generate(prompts, params, seed=0)
    assert [g.token_ids for g in adapted] == [g.token_ids for g in merged]
