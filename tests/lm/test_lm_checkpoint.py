"""Checkpoints (Hugging Face model directories): bit-exact round trip, clear errors on malformed
files, resumable training state."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lm.checkpoint import (CheckpointError, load_checkpoint, load_training_state, save_checkpoint,
                           save_training_state)
from lm.train import make_optimizer


def _trained_model(make_model, vocab_size):
    model = make_model(vocab_size=vocab_size, tie_embeddings=False, qkv_bias=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # norms and biases away from their init
    return model


def test_round_trip_is_bit_exact(make_model, tokenizer, tmp_path):
    model = _trained_model(make_model, tokenizer.vocab_size)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, {"stage": "sft", "step": 3})
    loaded, tok, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"stage": "sft", "step": 3}
    assert loaded.config == model.config
    assert tok.encode("数学 <think>") == tokenizer.encode("数学 <think>")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "r1flow.json",
                     "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "qwen2"  # q/k/v biases


def test_dtype_choice_and_bf16_round_trip(make_model, tmp_path):
    model = make_model()
    save_checkpoint(tmp_path / "a", model, None)
    half, tok, _ = load_checkpoint(tmp_path / "a", dtype="bf16")
    assert tok is None and half.tok_embeddings.weight.dtype == torch.bfloat16
    save_checkpoint(tmp_path / "b", half, None)
    again, _, _ = load_checkpoint(tmp_path / "b", dtype="auto")
    assert again.tok_embeddings.weight.dtype == torch.bfloat16
    assert all(torch.equal(x, y) for x, y in zip(half.state_dict().values(), again.state_dict().values()))


def test_overwrite_is_atomic_and_leaves_no_temporaries(make_model, tmp_path):
    save_checkpoint(tmp_path / "c", make_model(seed=0), None, {"v": 1})
    save_checkpoint(tmp_path / "c", make_model(seed=1), None, {"v": 2})
    assert load_checkpoint(tmp_path / "c")[2] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.fixture
def saved(make_model, tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, make_model(), None)
    return path


def _rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor(saved):
    _rewrite_weights(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.feed_forward\.w3\.weight"):
        load_checkpoint(saved)


def test_wrong_shape(saved):
    _rewrite_weights(saved, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"'norm.weight' has shape \(31,\), expected \(32,\)"):
        load_checkpoint(saved)


def test_wrong_dtype(saved):
    _rewrite_weights(saved, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.float16)}))
    with pytest.raises(CheckpointError, match=r"'norm.weight' has dtype torch.float16, expected torch.float32"):
        load_checkpoint(saved)


def test_unexpected_tensor(saved):
    _rewrite_weights(saved, lambda t: t.update({"model.layers.7.self_attn.q_proj.weight": torch.ones(2, 2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_checkpoint(saved)


def test_pickle_in_place_of_safetensors_is_refused(saved, make_model):
    torch.save(make_model().state_dict(), saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickle/zip .* will not be unpickled"):
        load_checkpoint(saved)


@pytest.mark.parametrize("length", [0x4B50 + (1 << 16), 0x80 + (1 << 8)])
def test_safetensors_whose_header_length_reads_as_a_magic_loads(tmp_path, length):
    """The header length comes first: 0x...4B50 reads "PK" and 0x...80 a pickle opcode; neither is one."""
    from safetensors.torch import save as st_save

    from lm.checkpoint import read_safetensors

    body = st_save({"w": torch.zeros(2)})
    n = int.from_bytes(body[:8], "little")
    header = body[8:8 + n].rstrip(b" ") + b" " * (length - len(body[8:8 + n].rstrip(b" ")))
    path = tmp_path / "m.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + header + body[8 + n:])
    assert path.read_bytes()[:2] == b"PK" or path.read_bytes()[:1] == b"\x80"
    assert torch.equal(read_safetensors(path)["w"], torch.zeros(2))


def test_pickle_only_directory_is_refused(make_model, tmp_path):
    torch.save(make_model().state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"r1flow.json is missing.*pytorch_model.bin.*never loaded"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path / "ok", make_model(), None)
    for name in ("r1flow.json", "config.json"):
        (tmp_path / name).write_bytes((tmp_path / "ok" / name).read_bytes())
    with pytest.raises(CheckpointError, match="model.safetensors is missing.*pytorch_model.bin"):
        load_checkpoint(tmp_path)


def test_corrupt_files(saved, tmp_path):
    (saved / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": truncated")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_checkpoint(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved)
    (saved / "r1flow.json").write_text(json.dumps({"format": "r1flow-checkpoint-v1"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint format.*older r1flow versions"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def _train_steps(model, opt, n, gen):
    losses = []
    for _ in range(n):
        ids = torch.randint(0, 96, (2, 10), generator=gen)  # the named generator feeds the data
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
        loss = loss + 1e-3 * torch.rand(())  # and the global RNG shows up in the loss values
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_state_resume_is_exact(make_model, tmp_path):
    """Train 2 steps, save model + optimizer + RNG, train 2 more; resuming from the save into
    fresh objects reproduces those 2 steps exactly."""
    model = make_model().train()
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    _train_steps(model, opt, 2, gen)
    save_checkpoint(tmp_path / "m", model, None, {"step": 2})
    save_training_state(tmp_path / "s", opt, step=2, extra={"best": 1.5}, generators={"data": gen})
    expected = _train_steps(model, opt, 2, gen)

    model2, _, _ = load_checkpoint(tmp_path / "m")
    model2.train()
    opt2 = make_optimizer(model2, lr=1e-2, weight_decay=0.1)
    gen2 = torch.Generator()
    state = load_training_state(tmp_path / "s", opt2, generators={"data": gen2})
    assert state == {"step": 2, "extra": {"best": 1.5}}
    assert _train_steps(model2, opt2, 2, gen2) == expected
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "s").iterdir())


@pytest.mark.parametrize("field,value,message", [  # the checkpoint's config.json is Hugging Face's
    ("max_position_embeddings", 10**9, r"max_position_embeddings: 1000000000 is out of range"),
    ("num_attention_heads", 0, r"num_attention_heads: 0 is out of range"),
    ("num_hidden_layers", 10**6, r"num_hidden_layers: 1000000 is out of range"),
    ("vocab_size", -1, r"vocab_size: -1 is out of range"),
    ("hidden_size", "32", r"hidden_size: must be an integer, got '32'"),
    ("num_key_value_heads", True, r"num_key_value_heads: must be an integer"),
    ("rms_norm_eps", float("nan"), r"rms_norm_eps: must be a number"),
    ("num_hidden_layers", 3, r"n_layers: config says 3, the file holds 2 layers"),  # in bounds, but a lie
    ("vocab_size", 4096, r"vocab_size/dim: config says \(4096, 32\)"),
])
def test_hostile_size_fields_fail_fast_naming_the_field(saved, field, value, message):
    """Issue 20: sizes are checked (bounds, then the file's tensors) before anything is built."""
    import time

    path = saved / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(saved)
    assert time.perf_counter() - start < 5.0  # was: GBs over tens of seconds, or ZeroDivisionError
