import json

import pytest

from tests.pipeline.cli_helpers import cli


def test_generate_json_from_a_run_checkpoint(micro_run):
    root, run_id, _ = micro_run
    code, out = cli("generate", "--model", f"{run_id}/rl_zero", "--prompt", "What is 2 + 3?", "--chat",
                    "--max-new-tokens", "6", "--json", "--root", str(root))
    assert code == 0
    g = json.loads(out)
    assert 1 <= len(g["token_ids"]) <= 6 and len(g["logprobs"]) == len(g["token_ids"])
    assert all(lp <= 0.0 for lp in g["logprobs"])
    top = g["top_logprobs"]
    assert len(top) == 5 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    # Greedy: the first generated token is the most likely one, and its logprob matches.
    assert g["token_ids"][0] == top[0]["id"]
    assert g["logprobs"][0] == pytest.approx(top[0]["logprob"], abs=1e-4)


def test_generate_greedy_is_deterministic(micro_run):
    root, run_id, _ = micro_run
    args = ("generate", "--model", f"{run_id}/base", "--prompt", "User: 1 + 1\nAssistant:", "--max-new-tokens", "5",
            "--root", str(root))
    assert cli(*args) == cli(*args)


@pytest.mark.parametrize("source, message", [
    ("nope/nothing.gguf", "unknown model source"),
    ("{bad}", "cannot parse as GGUF"),
])
def test_generate_bad_model_source(tmp_path, capsys, source, message):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    code, _ = cli("generate", "--model", source.format(bad=bad), "--prompt", "x", "--root", str(tmp_path))
    assert code == 2
    assert message in capsys.readouterr().err


def test_generate_refuses_a_checkpoint_with_a_hostile_size_field(micro_copy, capsys):
    """Issue 20: an edited config.json is named (field, exit 2) at once, never allocated from."""
    import time
    from pathlib import Path

    import shutil

    from artifacts import RunStore

    root, run_id = micro_copy
    ckpt = Path(RunStore(root).load(run_id).stages["sft"].path) / "checkpoint"
    copy = root / "edited"
    shutil.copytree(ckpt, copy)
    config = json.loads((copy / "config.json").read_text())
    config["max_position_embeddings"] = 10**9
    (copy / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    code, _ = cli("generate", "--model", str(copy), "--prompt", "hi", "--root", str(root))
    assert code == 2 and time.perf_counter() - start < 5.0
    assert "max_position_embeddings: 1000000000 is out of range" in capsys.readouterr().err


def _poison(checkpoint):
    """NaN in every float weight, the file's size unchanged (what the adversarial pass did)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    size = path.stat().st_size
    tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_file(path).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert path.stat().st_size == size


def test_generate_refuses_corrupt_or_nan_weights(micro_copy, capsys):
    """Issue 20: NaN-poisoned sft weights printed output with rc 0 (and `--json` printed NaN)."""
    import shutil
    from pathlib import Path

    from artifacts import RunStore

    root, run_id = micro_copy
    ckpt = Path(RunStore(root).load(run_id).stages["sft"].path) / "checkpoint"
    outside = root / "outside-copy"
    shutil.copytree(ckpt, outside)
    _poison(ckpt)
    code, out = cli("generate", "--model", f"{run_id}/sft", "--prompt", "hi", "--json", "--root", str(root))
    assert code == 2 and out == ""
    assert "artifact is corrupt" in capsys.readouterr().err  # the store's hash check, before loading
    _poison(outside)  # outside the store: nothing to verify against, so the output is checked
    code, out = cli("generate", "--model", str(outside), "--prompt", "hi", "--json", "--root", str(root))
    assert code == 2 and out == ""
    assert "non-finite log-probabilities" in capsys.readouterr().err
@pytest.fixture
def fake_run(tmp_path):
    """A run record whose rl_zero and distill artifacts hold toy checkpoints (no Prefect, no training)."""
    import torch

    from artifacts import RunStore
    from lm.checkpoint import save_checkpoint
    from lm.model import ModelConfig, Transformer
    from lm.tokenizer import train_bpe
    from pipeline.config import STAGES

    tok = train_bpe(["User: add one and two\nAssistant: <think> one plus two </think> <answer> 3 </answer>"] * 4,
                    256 + 8 + 16)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    ffn_dim=64, max_seq_len=64))
    rl = tmp_path / "artifacts" / "rl_zero" / "k1"
    save_checkpoint(rl / "checkpoint", model, tok, {"stage": "rl_zero", "config": {"template": "r1_zero_short"}})
    distill = tmp_path / "artifacts" / "distill" / "k2"
    save_checkpoint(distill / "students" / "micro", model, tok, {"stage": "distill", "template": "r1_zero_short"})
    runs = RunStore(tmp_path)
    record = runs.create({}, STAGES, preset="micro", run_id="fake")
    record.stages["rl_zero"].status, record.stages["rl_zero"].path = "ran", str(rl)
    record.stages["distill"].status, record.stages["distill"].path = "ran", str(distill)
    runs.save(record)
    return tmp_path, tok


def test_generate_renders_the_prompt_as_the_checkpoint_was_trained(fake_run):
    root, tok = fake_run
    code, out = cli("generate", "--model", "fake/rl_zero", "--prompt", "What is 2 + 3?", "--max-new-tokens", "4",
                    "--json", "--root", str(root))
    assert code == 0
    g = json.loads(out)
    assert g["template"] == "r1_zero_short"  # what rl_zero trained with, not a 280-token chat wrapper
    assert g["prompt_tokens"] == len(tok.encode("User: What is 2 + 3?\nAssistant:", allow_special=True))
    assert "<|endoftext|>" not in g["text"] and "<|pad|>" not in g["text"]
    code, raw = cli("generate", "--model", "fake/rl_zero", "--prompt", "What is 2 + 3?", "--template", "none",
                    "--max-new-tokens", "4", "--json", "--root", str(root))
    assert code == 0 and json.loads(raw)["prompt_tokens"] < g["prompt_tokens"]


def test_students_by_their_obvious_names(fake_run, capsys):
    root, _ = fake_run
    outs = []
    for source in ("fake/distill", "fake/student:micro", "fake/distill/micro", "fake/distill/students/micro"):
        code, out = cli("generate", "--model", source, "--prompt", "1 + 1", "--max-new-tokens", "3", "--root", str(root))
        assert code == 0, source
        outs.append(out)
    assert len(set(outs)) == 1
    code, _ = cli("generate", "--model", "fake/student:nobody", "--prompt", "x", "--root", str(root))
    assert code == 2 and "its students: micro" in capsys.readouterr().err
