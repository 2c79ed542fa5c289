"""The base stage on tiny data: scratch pretraining, resume, loading a model, bad inputs."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import torch

from artifacts import ArtifactError
from lm.checkpoint import load_checkpoint, save_checkpoint
from lm.gguf import LoadError
from lm.model import MODEL_PRESETS, ModelConfig, Transformer
from lm.tokenizer import train_bpe
from stages import base as stage
from stages import synthetic
from stages.context import StageContext
from stages.lm_training import encode_text, split_holdout

torch.set_num_threads(1)  # the test machine is shared: one thread avoids OpenMP oversubscription

# The smallest preset, briefly: the tests check behaviour, not quality.
QUICK = dict(model="micro", vocab_size=320, seq_len=96, batch_size=8, lr=3e-3, warmup_steps=5, val_docs=16,
             autocast=False)


def quiet(seed: int = 0, run_dir: Path | None = None, stop_after: int | None = None) -> StageContext:
    """A context without progress bars; `stop_after` interrupts the loop after that many steps."""
    def progress(iterable, desc="", total=None):
        for i, x in enumerate(iterable):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt(f"simulated crash after {stop_after} steps")
            yield x
    return StageContext(seed=seed, run_dir=run_dir, log=lambda msg: None, progress=progress)


@pytest.fixture(scope="module")
def problems_dir(tmp_path_factory) -> Path:
    """A problems artifact holding only what base reads: corpus.parquet (text, kind)."""
    docs = synthetic.build_corpus(synthetic.generate_problems(300, 0), synthetic.CorpusConfig(), 0)
    d = tmp_path_factory.mktemp("problems")
    pq.write_table(pa.table({"text": [x.text for x in docs], "kind": [x.kind for x in docs]}), d / "corpus.parquet")
    return d


def run_base(tmp_path: Path, problems: Path, name: str = "out", ctx: StageContext | None = None,
             **overrides) -> tuple[Path, dict]:
    out = tmp_path / name
    out.mkdir()
    summary = stage.run(stage.Config(**{**QUICK, **overrides}), {"problems": problems}, out, ctx or quiet())
    return out, summary


def test_scratch_pretraining_trains_a_tokenizer_and_lowers_the_loss(tmp_path, problems_dir):
    out, s = run_base(tmp_path, problems_dir, steps=40, eval_every=20)
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    loss = [r["value"] for r in rows if r["name"] == "loss"]
    val = [r["value"] for r in rows if r["name"] == "val_loss"]
    # starts near ln(vocab) ~ 5.8; 40 steps of the templated corpus take it well below
    assert loss[0] > 5.0 and s["final_loss"] < 3.0, s
    assert len(val) == 2 and val[1] < val[0] < 5.0
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= {r["name"] for r in rows}
    model, tok, meta = load_checkpoint(out / "checkpoint")
    assert meta["source"] == "scratch" and meta["preset"] == "micro"
    assert tok.vocab_size == s["vocab_size"] <= 320 and model.config.vocab_size == tok.vocab_size
    assert model.config.dim == MODEL_PRESETS["micro"].dim and s["params"] == model.num_params()
    assert s["tokens_seen"] > 40 * 8 * 30 and s["steps"] == 40
    for key in ("final_loss", "params", "tokens_seen", "seconds"):
        assert key in s
    # the project's tokenizer keeps the format tags as single ids
    assert len(tok.encode("<think>")) == 1 and tok.special_tokens["</answer>"] < tok.vocab_size


def test_the_learning_rate_warms_up_then_decays(tmp_path, problems_dir):
    out, _ = run_base(tmp_path, problems_dir, steps=20, warmup_steps=5, lr=1e-3, min_lr_ratio=0.1)
    lr = [r["value"] for r in pq.read_table(out / "metrics.parquet").to_pylist() if r["name"] == "lr"]
    assert lr[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))
    # last step 19: cosine progress (19 - 5) / 15, lr = 1e-3 * (0.1 + 0.9 * (1 + cos(pi * 14 / 15)) / 2)
    assert lr[-1] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 - 0.97815)), rel=1e-4)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, problems_dir):
    knobs = dict(steps=10, checkpoint_every=4, eval_every=5, batch_size=4)
    ref, ref_s = run_base(tmp_path, problems_dir, "ref", ctx=quiet(run_dir=tmp_path / "run-ref"), **knobs)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_base(tmp_path, problems_dir, "crashed", ctx=quiet(run_dir=run_dir, stop_after=6), **knobs)
    assert (run_dir / "base" / "LATEST").read_text() == "step-00000004"
    out, s = run_base(tmp_path, problems_dir, "resumed", ctx=quiet(run_dir=run_dir), **knobs)
    a, _, _ = load_checkpoint(ref / "checkpoint")
    b, _, _ = load_checkpoint(out / "checkpoint")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    ref_rows = [r for r in pq.read_table(ref / "metrics.parquet").to_pylist() if r["name"] != "tokens_per_s"]
    rows = [r for r in pq.read_table(out / "metrics.parquet").to_pylist() if r["name"] != "tokens_per_s"]
    assert rows == ref_rows  # losses, lrs, grad norms and val losses of all 10 steps, bit for bit
    assert s["final_loss"] == ref_s["final_loss"] and s["tokens_seen"] == ref_s["tokens_seen"]


def test_same_seed_same_model_other_seed_other_model(tmp_path, problems_dir):
    a, _ = run_base(tmp_path, problems_dir, "a", steps=3)
    b, _ = run_base(tmp_path, problems_dir, "b", steps=3)
    c, _ = run_base(tmp_path, problems_dir, "c", ctx=quiet(seed=1), steps=3)
    wa, wb, wc = ((p / "checkpoint" / "model.safetensors").read_bytes() for p in (a, b, c))
    assert wa == wb and wa != wc


def test_packing_fills_every_window(tmp_path, problems_dir):
    out, s = run_base(tmp_path, problems_dir, steps=2, packing=True, seq_len=64)
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["value"] for r in rows if r["name"] == "tokens"] == [8 * 64, 8 * 64]
    # the 300 - 16 training documents, each + eos, back to back, cut into whole 64-token windows
    _, tok, _ = load_checkpoint(out / "checkpoint")
    train_idx, _ = split_holdout(300, 1.0, 16, seed=0)
    texts = pq.read_table(problems_dir / "corpus.parquet").column("text").to_pylist()
    assert s["train_sequences"] == sum(len(encode_text(tok, texts[i])) + 1 for i in train_idx) // 64


def test_a_pretrained_source_is_loaded_and_saved_unchanged(tmp_path, problems_dir):
    tok = train_bpe(["User: What is 1 + 2?\nAssistant: <think> 1+2=3. </think> <answer> 3 </answer>"], 280)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    ffn_dim=64, max_seq_len=64))
    src = save_checkpoint(tmp_path / "pretrained", model, tok, {"origin": "test"})
    out, s = run_base(tmp_path, problems_dir, source=str(src))
    loaded, loaded_tok, meta = load_checkpoint(out / "checkpoint")
    assert meta["source"] == str(src) and s["params"] == model.num_params() and s["final_loss"] is None
    for (name, x), (_, y) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name
    assert loaded_tok.encode("What is 1 + 2?") == tok.encode("What is 1 + 2?")
    assert pq.read_table(out / "metrics.parquet").num_rows == 0


def test_an_unknown_source_is_a_clear_error(tmp_path, problems_dir):
    with pytest.raises(LoadError, match="unknown model source 'no-such-model'"):
        run_base(tmp_path, problems_dir, source="no-such-model")


def test_scratch_without_a_corpus_says_how_to_get_one(tmp_path):
    empty = tmp_path / "problems"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="corpus_docs > 0"):
        run_base(tmp_path, empty)


def test_a_corpus_without_a_text_column_or_rows_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"document": ["User: hi\nAssistant: hello"]}), bad / "corpus.parquet")
    with pytest.raises(ArtifactError, match="missing column 'text'"):
        run_base(tmp_path, bad, "o1")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), bad / "corpus.parquet")
    with pytest.raises(ValueError, match="no rows"):
        run_base(tmp_path, bad, "o2")


def test_config_is_strict():
    with pytest.raises(pydantic.ValidationError):
        stage.Config(learning_rate=1e-3)
    with pytest.raises(pydantic.ValidationError, match="unknown model preset"):
        stage.Config(model="huge")
    assert stage.Config().source == "scratch" and stage.Config().model == "tiny"
    assert stage.INPUTS == ("problems",)
    assert stage.SCHEMAS["metrics.parquet"].names == ["step", "name", "value"]
