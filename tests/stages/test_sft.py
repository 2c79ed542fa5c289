"""The sft stage and the shared next-token training components (stages/lm_training.py) on tiny data."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import torch
import torch.nn.functional as F

from artifacts import ArtifactError
from lm.checkpoint import load_checkpoint, save_checkpoint
from lm.model import ModelConfig, Transformer
from lm.tokenizer import train_bpe
from stages import sft as stage
from stages import synthetic
from stages.context import StageContext
from stages.lm_training import (BatchPlan, Example, collate, encode_prompt, encode_text, lm_loss_sum, optimizer_step,
                                split_by_group, tokenize_documents, tokenize_pairs)

torch.set_num_threads(1)  # the test machine is shared: one thread avoids OpenMP oversubscription

# A model far smaller than any preset: the tests check behaviour, not quality.
SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)


def quiet(seed: int = 0, run_dir: Path | None = None, stop_after: int | None = None) -> StageContext:
    """A context without progress bars; `stop_after` interrupts the loop after that many steps."""
    def progress(iterable, desc="", total=None):
        for i, x in enumerate(iterable):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt(f"simulated crash after {stop_after} steps")
            yield x
    return StageContext(seed=seed, run_dir=run_dir, log=lambda msg: None, progress=progress)


def problems(n: int, seed: int = 0) -> list[synthetic.Problem]:
    return synthetic.generate_problems(n, seed, difficulty_mix={1: 1.0})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A base artifact: a random SMALL model with a BPE trained on a synthetic corpus."""
    docs = synthetic.build_corpus(problems(300), synthetic.CorpusConfig(), 0)
    tok = train_bpe([d.text for d in docs], 320)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, **SMALL))
    d = tmp_path_factory.mktemp("base")
    save_checkpoint(d / "checkpoint", model, tok, {"stage": "base"})
    return d


def write_cold_start(d: Path, n: int, **extra_columns) -> Path:
    """cold_start.parquet with `n` clean traces (prompt = bare question, completion = trace)."""
    d.mkdir(parents=True, exist_ok=True)
    ps = problems(n, seed=1)
    cols = {"problem_id": [f"p{i}" for i in range(n)], "prompt": [p.question for p in ps],
            "completion": [synthetic.render_clean_trace(p) for p in ps], **extra_columns}
    pq.write_table(pa.table(cols), d / "cold_start.parquet")
    return d


def run_sft(tmp_path: Path, base_dir: Path, cold: Path, name: str = "out", ctx: StageContext | None = None,
            **overrides) -> tuple[Path, dict]:
    out = tmp_path / name
    out.mkdir()
    cfg = stage.Config(**{"autocast": False, **overrides})
    summary = stage.run(cfg, {"base": base_dir, "cold_start": cold}, out, ctx or quiet())
    return out, summary


# ----------------------------------------------------------------------------- tokenisation, mask


def test_pair_mask_covers_exactly_the_completion_and_eos(base_dir):
    _, tok, _ = load_checkpoint(base_dir / "checkpoint")
    prompt = tok.render_prompt("What is 12 + 30?", "r1_zero_short")
    completion = " <think> 2+0=2: 2. 1+3=4: 42. so 42. </think> <answer> 42 </answer>"
    (ex,), report = tokenize_pairs(tok, [prompt], [completion], max_len=256)
    n_prompt = len(encode_text(tok, prompt))
    assert report.kept == 1
    assert not ex.loss_mask[:n_prompt].any()
    assert ex.loss_mask[n_prompt:].all()
    assert ex.ids[-1] == tok.eos_id
    assert tok.decode(ex.ids[ex.loss_mask][:-1].tolist()) == completion
    # the tags are the single special ids the sampler produces
    assert tok.special_tokens["<think>"] in ex.ids.tolist()
    assert tok.special_tokens["</answer>"] in ex.ids.tolist()


def test_control_tokens_in_data_stay_plain_text(base_dir):
    _, tok, _ = load_checkpoint(base_dir / "checkpoint")
    ids = encode_text(tok, "a <|endoftext|> b <answer> 1 </answer>")
    assert tok.eos_id not in ids
    assert tok.special_tokens["<answer>"] in ids


def test_chat_turn_markers_are_single_ids_in_prompts_only(base_dir):
    _, tok, _ = load_checkpoint(base_dir / "checkpoint")
    prompt = "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    completion = " <think> 1+1=2. </think> <answer> 2 </answer> <|im_end|>"
    (ex,), _ = tokenize_pairs(tok, [prompt], [completion], max_len=256)
    n_prompt = len(encode_prompt(tok, prompt))
    prompt_ids, completion_ids = ex.ids[:n_prompt].tolist(), ex.ids[n_prompt:].tolist()
    assert prompt_ids.count(tok.special_tokens["<|im_start|>"]) == 2
    assert prompt_ids.count(tok.special_tokens["<|im_end|>"]) == 1
    assert tok.special_tokens["<|im_end|>"] not in completion_ids  # model output: plain text
    assert encode_prompt(tok, "a <|endoftext|> b").count(tok.eos_id) == 0


def test_pairs_truncate_long_completions_and_drop_unusable_rows(base_dir):
    _, tok, _ = load_checkpoint(base_dir / "checkpoint")
    long = " " + "1+1=2. " * 50
    examples, report = tokenize_pairs(tok, ["User: q\nAssistant:", "", "User: " + "x " * 40, "User: q"],
                                      [long, " a", " b", "   "], max_len=20)
    assert (report.kept, report.truncated, report.dropped_empty, report.dropped_prompt_too_long) == (1, 1, 2, 1)
    assert len(examples[0]) == 20 and examples[0].loss_mask[-1]


def test_documents_carry_loss_everywhere_and_end_with_eos(base_dir):
    _, tok, _ = load_checkpoint(base_dir / "checkpoint")
    (doc,), report = tokenize_documents(tok, ["User: What is 1 + 2?\nAssistant: 3", "  "], max_len=None)
    assert doc.loss_mask.all() and doc.ids[-1] == tok.eos_id
    assert report.dropped_empty == 1


def test_documents_with_loss_after_marker_train_on_the_solution_only(base_dir):
    """With `loss_after`, the question carries no loss, the rest does, and the pieces are encoded
    as a sampler sees them: prompt ids then completion ids; documents without the marker keep loss
    on every token."""
    _, tok, _ = load_checkpoint(base_dir / "checkpoint")
    text = "User: What is 1 + 2?\nAssistant: <think> 1+2=3. </think> <answer> 3 </answer>"
    (doc, plain), _ = tokenize_documents(tok, [text, "no marker here"], max_len=None, loss_after="Assistant:")
    head = encode_prompt(tok, "User: What is 1 + 2?\nAssistant:")
    assert doc.ids[:len(head)].tolist() == head
    assert not doc.loss_mask[:len(head)].any() and doc.loss_mask[len(head):].all()
    assert doc.ids[-1] == tok.eos_id and plain.loss_mask.all()


# ---------------------------------------------------------------------------------- loss and step


def test_loss_counts_only_masked_targets():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, **SMALL))
    ids = np.arange(10, 20)
    mask = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=bool)  # prompt of 4 tokens, completion of 6
    batch = collate([Example(ids, mask)], pad_id=0)
    logits = model(torch.as_tensor(ids)[None])[0]  # [10, V]
    # token t is predicted by the logits at t-1: the targets are tokens 4..9, from logits 3..8
    expected = F.cross_entropy(logits[3:9], torch.as_tensor(ids[4:10]), reduction="sum")
    assert torch.allclose(lm_loss_sum(model, batch), expected, atol=1e-4)
    assert batch.n_targets == 6


def test_right_padding_does_not_change_a_rows_loss():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, **SMALL))
    short = Example(np.arange(5, 11), np.array([0, 0, 1, 1, 1, 1], dtype=bool))
    long = Example(np.arange(20, 32), np.ones(12, dtype=bool))
    alone = lm_loss_sum(model, collate([short], pad_id=0))
    together = lm_loss_sum(model, collate([short, long], pad_id=0)) - lm_loss_sum(model, collate([long], pad_id=0))
    assert torch.allclose(alone, together, atol=1e-4)


def test_accumulated_micro_batches_give_the_full_batch_gradient():
    """Per-token normalisation over the whole step: two micro-batches of different target counts
    must give the same gradient as one batch holding both (a mean of means would not)."""
    rng = np.random.default_rng(0)
    exs = [Example(rng.integers(0, 50, n), np.r_[np.zeros(2, bool), np.ones(n - 2, bool)]) for n in (6, 14, 9)]

    def grads(batches):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=50, **SMALL))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        optimizer_step(model, opt, batches, lm_loss_sum, clip=0.0, autocast=False, device="cpu", step=0)
        return [p.grad.clone() for p in model.parameters()]

    full = grads([collate(exs, 0)])
    accumulated = grads([collate(exs[:1], 0), collate(exs[1:], 0)])
    for a, b in zip(full, accumulated):
        assert torch.allclose(a, b, atol=1e-6)


def test_batch_plan_is_a_pure_function_of_seed_and_step():
    lengths = np.random.default_rng(0).integers(5, 50, 37)
    a, b = BatchPlan(lengths, 8, seed=3), BatchPlan(lengths, 8, seed=3)
    assert a.batches_per_epoch == 5
    epoch0 = np.sort(np.concatenate([a.micro_batch(m) for m in range(5)]))
    assert epoch0.tolist() == list(range(37))  # every example once per epoch
    b.micro_batch(12)  # jumping ahead (a resume) does not change what step 7 sees
    assert [x.tolist() for x in a.step(7, 2)] == [x.tolist() for x in b.step(7, 2)]
    assert a.micro_batch(0).tolist() != a.micro_batch(5).tolist()  # epochs reshuffle


def test_holdout_keeps_samples_of_one_prompt_on_one_side():
    groups = ["a", "a", "b", "c", "c", "c", "d", "e", "e", "f"]
    train, val = split_by_group(groups, fraction=0.3, max_items=None, seed=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(10))
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val})
    assert 3 <= len(val) <= 3 + 2  # whole groups until at least round(0.3 * 10) rows are held out
    _, only = split_by_group(["x", "x", "x"], fraction=0.9, max_items=None, seed=0)
    assert len(only) == 0  # never the whole set


# --------------------------------------------------------------------------------------- the stage


def test_sft_fits_a_tiny_set_and_writes_its_artifacts(tmp_path, base_dir):
    cold = write_cold_start(tmp_path / "cold", 4)
    out, s = run_sft(tmp_path, base_dir, cold, epochs=100, batch_size=4, lr=3e-3, warmup_steps=5,
                     val_fraction=0.0, eval_every=1000)
    # ln(vocab) ~ 5.8 at the start; 4 short traces are memorised (0.12-0.15 measured after 100 steps)
    assert s["final_train_loss"] < 0.3, s
    assert s["examples"] == 4 and s["steps"] == 100 and s["epochs"] == 100.0
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= {r["name"] for r in metrics}
    losses = [r["value"] for r in metrics if r["name"] == "loss"]
    assert losses[0] > 4.0 and all(math.isfinite(v) for v in losses)
    model, tok, meta = load_checkpoint(out / "checkpoint")
    assert meta["stage"] == "sft" and tok is not None


def test_sft_validation_loss_falls(tmp_path, base_dir):
    cold = write_cold_start(tmp_path / "cold", 60)
    out, s = run_sft(tmp_path, base_dir, cold, epochs=6, batch_size=8, lr=3e-3, val_fraction=0.2, val_max=12,
                     eval_every=10)
    assert s["val_examples"] == 12 and s["examples"] == 48
    assert s["final_val_loss"] < s["initial_val_loss"] - 1.0, s


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, base_dir):
    cold = write_cold_start(tmp_path / "cold", 16)
    knobs = dict(epochs=4, batch_size=4, checkpoint_every=5, lora_rank=4, val_fraction=0.25)  # 12 train rows: 12 steps
    ref, ref_s = run_sft(tmp_path, base_dir, cold, "ref", ctx=quiet(run_dir=tmp_path / "run-ref"), **knobs)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_sft(tmp_path, base_dir, cold, "crashed", ctx=quiet(run_dir=run_dir, stop_after=7), **knobs)
    assert (run_dir / "sft" / "LATEST").read_text() == "step-00000005"
    out, s = run_sft(tmp_path, base_dir, cold, "resumed", ctx=quiet(run_dir=run_dir), **knobs)
    a, _, _ = load_checkpoint(ref / "checkpoint")
    b, _, _ = load_checkpoint(out / "checkpoint")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert pq.read_table(ref / "metrics.parquet").drop(["value"]).equals(
        pq.read_table(out / "metrics.parquet").drop(["value"]))
    assert s["final_val_loss"] == ref_s["final_val_loss"]


def test_lora_trains_adapters_and_saves_a_plain_merged_model(tmp_path, base_dir):
    cold = write_cold_start(tmp_path / "cold", 16)
    out, s = run_sft(tmp_path, base_dir, cold, epochs=2, batch_size=8, lora_rank=4, lr=1e-2)
    base, _, _ = load_checkpoint(base_dir / "checkpoint")
    tuned, _, meta = load_checkpoint(out / "checkpoint")  # a plain Transformer: adapters merged
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert meta["lora_rank"] == 4
    assert changed and all(".attention." in k or ".feed_forward." in k for k in changed)
    assert "tok_embeddings.weight" not in changed


# ------------------------------------------------------------------------------------- bad inputs


def test_missing_completion_column_is_a_clear_error(tmp_path, base_dir):
    d = tmp_path / "cold"
    d.mkdir()
    pq.write_table(pa.table({"prompt": ["What is 1 + 1?"], "response": [" 2"]}), d / "cold_start.parquet")
    with pytest.raises(ArtifactError, match="missing column 'completion'"):
        run_sft(tmp_path, base_dir, d)


def test_empty_cold_start_file_is_a_clear_error(tmp_path, base_dir):
    d = tmp_path / "cold"
    d.mkdir()
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())}),
                   d / "cold_start.parquet")
    with pytest.raises(ValueError, match="no rows"):
        run_sft(tmp_path, base_dir, d)


def test_not_a_parquet_file_is_a_clear_error(tmp_path, base_dir):
    d = tmp_path / "cold"
    d.mkdir()
    (d / "cold_start.parquet").write_text("prompt,completion\n")
    with pytest.raises(ArtifactError, match="not a Parquet file"):
        run_sft(tmp_path, base_dir, d)


def test_rows_with_only_empty_text_are_a_clear_error(tmp_path, base_dir):
    d = tmp_path / "cold"
    d.mkdir()
    pq.write_table(pa.table({"prompt": ["q", None], "completion": ["  ", "x"]}), d / "cold_start.parquet")
    with pytest.raises(ValueError, match="none of its 2 rows is usable"):
        run_sft(tmp_path, base_dir, d)


def test_config_rejects_unknown_keys_and_templates():
    with pytest.raises(pydantic.ValidationError):
        stage.Config(learning_rate=1e-3)
    with pytest.raises(pydantic.ValidationError, match="unknown template"):
        stage.Config(template="chatml-ish")
    assert stage.INPUTS == ("base", "cold_start")
    assert stage.SCHEMAS["metrics.parquet"].names == ["step", "name", "value"]


@pytest.mark.parametrize("template", ["r1_zero_short", "r1_zero", "chat", "chat_think"])
def test_sft_trains_on_the_prompt_the_sampler_rendered(tmp_path, template):
    """A problem with more than its question (a system turn, few-shot turns) reaches sft and
    distill as the sampler rendered it, not as its bare question (the distilled SmolLM2 student
    was trained without the preset's example turns and evaluated with them: pass@1 2%)."""
    from stages.lm_training import read_pairs
    from stages.sampling import Problem, conversational, encode_prompts, messages_type
    from tests.lm.test_chat_template import SMOLLM2

    pytest.importorskip("jinja2")
    tok = train_bpe(["User: What is 4 + 3?\nAssistant: <think> 4 + 3 = 7. </think> <answer> 7 </answer>"] * 4, 300)
    tok.chat_template = SMOLLM2
    shots = ({"role": "system", "content": "Use the tags."}, {"role": "user", "content": "What is 4 + 3?"},
             {"role": "assistant", "content": "<think> 4 + 3 = 7. </think> <answer> 7 </answer>"},
             {"role": "user", "content": "What is 2 + 5?"})
    problems = [Problem("a", "What is 2 + 5?", "7", "en", shots), Problem("b", "What is 1 + 1?", "2", "en")]
    rows = [conversational({"prompt": p.prompt, "messages": list(p.messages) or None,
                            "completion": "<think> so. </think> <answer> 7 </answer>"}, template, ("completion",))
            for p in problems]
    schema = pa.schema([("prompt", messages_type()), ("prompt_text", pa.string()), ("completion_text", pa.string())])
    path = tmp_path / "cold_start.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema), path)
    examples, _ = read_pairs(path, tok, template, 512, "sft")
    wanted = encode_prompts(tok, [p.question for p in problems], template)
    assert len(examples) == 2 and "What is 4 + 3?" in tok.decode([int(i) for i in examples[0].ids])  # the example turn
    for example, want in zip(examples, wanted):
        assert list(example.ids[:len(want)]) == want
