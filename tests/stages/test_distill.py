"""The distill stage on tiny data: students and baselines, token-level KD, bad inputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import torch

from artifacts import ArtifactError
from lm.checkpoint import load_checkpoint, read_safetensors, save_checkpoint
from lm.model import MODEL_PRESETS, ModelConfig, Transformer
from lm.tokenizer import train_bpe
from stages import distill as stage
from stages import synthetic
from stages.context import StageContext
from stages.lm_training import Example, collate, distill_loss_sum, kd_kl_sum, lm_loss_sum

torch.set_num_threads(1)  # the test machine is shared: one thread avoids OpenMP oversubscription

# A teacher bigger than the "micro" preset the students use; far smaller than a real one.
TEACHER = dict(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=256)
QUICK = dict(steps=6, pretrain_steps=0, batch_size=4, seq_len=128, autocast=False, val_fraction=0.25, val_max=4)


def quiet(seed: int = 0, run_dir: Path | None = None, stop_after: int | None = None) -> StageContext:
    """A context without progress bars; `stop_after` interrupts a loop after that many steps."""
    def progress(iterable, desc="", total=None):
        for i, x in enumerate(iterable):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt(f"simulated crash after {stop_after} steps")
            yield x
    return StageContext(seed=seed, run_dir=run_dir, log=lambda msg: None, progress=progress)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Upstream artifacts: rl_reasoning (teacher checkpoint), rejection_sampling (16 clean traces,
    prompts as bare questions), problems (a 200-document corpus)."""
    root = tmp_path_factory.mktemp("upstream")
    docs = synthetic.build_corpus(synthetic.generate_problems(200, 0), synthetic.CorpusConfig(), 0)
    problems = root / "problems"
    problems.mkdir()
    pq.write_table(pa.table({"text": [d.text for d in docs], "kind": [d.kind for d in docs]}),
                   problems / "corpus.parquet")
    tok = train_bpe([d.text for d in docs], 320)
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=tok.vocab_size, **TEACHER))
    save_checkpoint(root / "rl_reasoning" / "checkpoint", teacher, tok, {"stage": "rl_reasoning"})
    ps = synthetic.generate_problems(16, 1, difficulty_mix={1: 1.0})
    rs = root / "rejection_sampling"
    rs.mkdir()
    pq.write_table(pa.table({"problem_id": [f"p{i}" for i in range(16)], "prompt": [p.question for p in ps],
                             "completion": [synthetic.render_clean_trace(p) for p in ps],
                             "answer": [p.answer for p in ps]}), rs / "reasoning_sft.parquet")
    return {"rl_reasoning": root / "rl_reasoning", "rejection_sampling": rs, "problems": problems}


def run_distill(tmp_path: Path, inputs: dict[str, Path], name: str = "out", ctx: StageContext | None = None,
                **overrides) -> tuple[Path, dict]:
    out = tmp_path / name
    out.mkdir()
    cfg = stage.Config(**{"students": [{"name": "micro"}], **QUICK, **overrides})
    return out, stage.run(cfg, inputs, out, ctx or quiet())


def test_one_checkpoint_per_student_smaller_than_the_teacher_plus_baselines(tmp_path, inputs):
    init = tmp_path / "init"
    _, tok, _ = load_checkpoint(inputs["rl_reasoning"] / "checkpoint")
    torch.manual_seed(1)
    small = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=2, n_kv_heads=1,
                                    ffn_dim=128, max_seq_len=256))
    save_checkpoint(init, small, tok, {})
    students = [{"name": "micro"}, {"name": "warm", "init": str(init)}]
    out, s = run_distill(tmp_path, inputs, students=students)

    teacher, _, _ = load_checkpoint(inputs["rl_reasoning"] / "checkpoint")
    assert s["students"] == 2 and s["baselines"] == 2 and s["teacher_params"] == teacher.num_params()
    for name, kind in (("micro", "students"), ("warm", "students"), ("micro", "baselines"), ("warm", "baselines")):
        model, student_tok, meta = load_checkpoint(out / kind / name)
        assert model.num_params() < teacher.num_params() / 2
        assert student_tok.encode("What is 12 + 3?") == tok.encode("What is 12 + 3?")
        assert meta["role"] == kind[:-1]
    micro, _, _ = load_checkpoint(out / "students" / "micro")
    assert micro.config.dim == MODEL_PRESETS["micro"].dim and micro.config.vocab_size == teacher.config.vocab_size
    assert s["micro.params"] == micro.num_params() and s["micro.params_ratio"] < 1 / 2
    for key in ("micro.final_loss", "micro.val_loss", "baseline:micro.final_loss", "baseline:micro.val_loss"):
        assert math.isfinite(s[key]), key

    table = pq.read_table(out / "metrics.parquet")
    assert table.schema.names == ["student", "step", "name", "value"]
    rows = table.to_pylist()
    assert {r["student"] for r in rows} == {"micro", "warm", "baseline:micro", "baseline:warm"}
    assert sum(1 for r in rows if r["student"] == "baseline:micro" and r["name"] == "loss") == QUICK["steps"]


def test_student_and_baseline_start_from_the_same_weights_and_train_on_different_data(tmp_path, inputs):
    out, s = run_distill(tmp_path, inputs, steps=1, lr=1e-9, warmup_steps=0)
    student, _, _ = load_checkpoint(out / "students" / "micro")
    baseline, _, _ = load_checkpoint(out / "baselines" / "micro")
    for (name, a), (_, b) in zip(student.state_dict().items(), baseline.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name  # one step of lr 1e-9 from one initialisation
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    first = {r["student"]: r["value"] for r in rows if r["name"] == "loss"}
    assert first["micro"] != first["baseline:micro"]  # same weights, different batches


def test_the_distilled_student_fits_the_teacher_traces_better_than_its_baseline(tmp_path, inputs):
    out, s = run_distill(tmp_path, inputs, steps=40, batch_size=4, lr=3e-3, warmup_steps=4)
    assert s["micro.val_loss"] < s["baseline:micro.val_loss"], s
    assert s["micro.final_loss"] < 2.0, s


def test_resume_skips_a_finished_student_and_completes_the_rest(tmp_path, inputs):
    knobs = dict(students=[{"name": "micro"}], steps=4, checkpoint_every=2)
    ref, ref_s = run_distill(tmp_path, inputs, "ref", ctx=quiet(run_dir=tmp_path / "run-ref"), **knobs)
    run_dir = tmp_path / "run"
    # the student's 4 steps finish, then the baseline (the second loop) crashes after 3 of its own
    ctx = quiet(run_dir=run_dir)
    loops = 0

    def progress(iterable, desc="", total=None):
        nonlocal loops
        loops += 1
        for i, x in enumerate(iterable):
            if loops == 2 and i == 3:
                raise KeyboardInterrupt("simulated crash")
            yield x
    ctx.progress = progress
    with pytest.raises(KeyboardInterrupt):
        run_distill(tmp_path, inputs, "crashed", ctx=ctx, **knobs)
    assert (run_dir / "micro" / "LATEST").read_text() == "step-00000004"
    assert (run_dir / "baseline-micro" / "LATEST").read_text() == "step-00000002"
    out, s = run_distill(tmp_path, inputs, "resumed", ctx=quiet(run_dir=run_dir), **knobs)
    for kind in ("students", "baselines"):
        assert ((ref / kind / "micro" / "model.safetensors").read_bytes()
                == (out / kind / "micro" / "model.safetensors").read_bytes()), kind
    assert s["micro.final_loss"] == ref_s["micro.final_loss"]


def test_a_shared_pretraining_phase_starts_both_the_student_and_its_baseline(tmp_path, inputs):
    out, s = run_distill(tmp_path, inputs, pretrain_steps=12, steps=2, lr=3e-3, warmup_steps=2)
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    loss = {}
    for r in rows:
        if r["name"] == "loss":
            loss.setdefault(r["student"], []).append(r["value"])
    assert [len(loss[k]) for k in ("pretrain:micro", "micro", "baseline:micro")] == [12, 2, 2]
    # both phase-2 runs start from the pretrained weights, far below the untrained ln(vocab) ~ 5.8
    assert loss["pretrain:micro"][0] > 5.0
    assert loss["micro"][0] < 4.5 and loss["baseline:micro"][0] < 4.5
    assert math.isfinite(s["pretrain:micro.val_loss"])
    with pytest.raises(FileNotFoundError, match="pretrain_steps = 0"):
        no_corpus = tmp_path / "problems"
        no_corpus.mkdir()
        run_distill(tmp_path, {**inputs, "problems": no_corpus}, "o2", pretrain_steps=2)


def test_without_a_corpus_the_baselines_are_skipped_and_counted(tmp_path, inputs):
    no_corpus = tmp_path / "problems"
    no_corpus.mkdir()
    out, s = run_distill(tmp_path, {**inputs, "problems": no_corpus})
    assert s["baselines"] == 0 and not (out / "baselines").exists() and (out / "students" / "micro").is_dir()


def test_baseline_false_trains_students_only(tmp_path, inputs):
    out, s = run_distill(tmp_path, inputs, baseline=False)
    assert s["baselines"] == 0 and not (out / "baselines").exists()


# ----------------------------------------------------------------------------------- token-level KD


def test_kd_kl_matches_a_hand_computed_value():
    # teacher p = softmax([0, ln 3]) = (1/4, 3/4); student q = (1/2, 1/2), T = 1:
    # KL(p || q) = 1/4 ln((1/4)/(1/2)) + 3/4 ln((3/4)/(1/2)) = -0.25 ln 2 + 0.75 ln 1.5 = 0.130812
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    student = torch.zeros(1, 2)
    assert kd_kl_sum(student, teacher, 1.0).item() == pytest.approx(0.130812, abs=1e-5)
    # T = 2: p_T = softmax([0, ln 3 / 2]) = (1/(1+sqrt 3), sqrt 3/(1+sqrt 3)); q_T stays uniform
    p1 = 1 / (1 + math.sqrt(3))
    kl_t2 = p1 * math.log(2 * p1) + (1 - p1) * math.log(2 * (1 - p1))
    assert kd_kl_sum(student, teacher, 2.0).item() == pytest.approx(4 * kl_t2, abs=1e-5)  # times T^2
    assert kd_kl_sum(teacher, teacher, 1.5).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_loss_is_cross_entropy_plus_weighted_kl():
    torch.manual_seed(0)
    student = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64))
    teacher = Transformer(ModelConfig(vocab_size=40, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64))
    batch = collate([Example(np.arange(3, 12), np.r_[np.zeros(3, bool), np.ones(6, bool)])], pad_id=0)
    ce = lm_loss_sum(student, batch)
    assert torch.allclose(distill_loss_sum(student, teacher, batch, kd_weight=0.0, temperature=1.0), ce, atol=1e-4)
    with_kd = distill_loss_sum(student, teacher, batch, kd_weight=0.5, temperature=2.0)
    rows = batch.loss_mask[:, 1:]  # positions 2..7 predict the six targets
    kl = kd_kl_sum(student(batch.ids)[:, :-1][rows], teacher(batch.ids)[:, :-1][rows], 2.0)
    assert torch.allclose(with_kd, ce + 0.5 * kl, atol=1e-4) and kl > 0


def test_kd_loss_with_a_shared_prompt_prefix_equals_the_whole_batch_forward(monkeypatch):
    torch.manual_seed(0)
    student = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64))
    teacher = Transformer(ModelConfig(vocab_size=40, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64))
    prompt = np.arange(3, 15)  # 12 tokens every row opens with (a system turn), then its own tokens
    rows = [np.r_[prompt, np.arange(20, 20 + n)] for n in (2, 3, 4)]
    batch = collate([Example(r, np.r_[np.zeros(12, bool), np.ones(len(r) - 12, bool)]) for r in rows], pad_id=0)
    shared = distill_loss_sum(student, teacher, batch, kd_weight=0.5, temperature=2.0)
    monkeypatch.setattr("lm.logprobs.SHARED_PREFIX_MIN_SAVING", 2.0)  # off: every row runs whole
    whole = distill_loss_sum(student, teacher, batch, kd_weight=0.5, temperature=2.0)
    assert torch.allclose(shared, whole, atol=1e-5) and whole > 0


def test_kd_trains_a_student(tmp_path, inputs):
    out, s = run_distill(tmp_path, inputs, kd_weight=1.0, kd_temperature=2.0, baseline=False)
    assert math.isfinite(s["micro.final_loss"]) and (out / "students" / "micro").is_dir()


def test_kd_with_a_different_vocabulary_is_a_clear_error(tmp_path, inputs):
    other = train_bpe(["completely different text for another vocabulary"], 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=other.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    ffn_dim=64))
    save_checkpoint(tmp_path / "foreign", model, other, {})
    with pytest.raises(ValueError, match="token-level KD"):
        run_distill(tmp_path, inputs, students=[{"name": "f", "init": str(tmp_path / "foreign")}], kd_weight=1.0)


# ------------------------------------------------------------------------------------- bad inputs


def test_missing_or_empty_traces_are_clear_errors(tmp_path, inputs):
    rs = tmp_path / "rs"
    rs.mkdir()
    pq.write_table(pa.table({"prompt": ["What is 1 + 1?"]}), rs / "reasoning_sft.parquet")
    with pytest.raises(ArtifactError, match="missing column 'completion'"):
        run_distill(tmp_path, {**inputs, "rejection_sampling": rs}, "o1")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())}),
                   rs / "reasoning_sft.parquet")
    with pytest.raises(ValueError, match="no rows"):
        run_distill(tmp_path, {**inputs, "rejection_sampling": rs}, "o2")


def test_config_validates_students():
    assert stage.Config().students[0].name == "tiny-student" and stage.Config().baseline is True
    assert stage.StudentSpec(name="tiny-student").model == "tiny-student"
    with pytest.raises(pydantic.ValidationError, match="unknown model preset"):
        stage.StudentSpec(name="giant")
    with pytest.raises(pydantic.ValidationError, match="unique"):
        stage.Config(students=[{"name": "micro"}, {"name": "micro"}])
    with pytest.raises(pydantic.ValidationError, match="names a folder"):
        stage.StudentSpec(name="../escape", model="micro")
    with pytest.raises(pydantic.ValidationError):
        stage.Config(student="micro")
    assert stage.INPUTS == ("rejection_sampling", "rl_reasoning", "problems")
    assert stage.SCHEMAS["metrics.parquet"].names == ["student", "step", "name", "value"]


# ------------------------------------------------------------------------------- on-policy mode


@pytest.fixture(scope="module")
def on_policy_inputs(inputs, tmp_path_factory) -> dict[str, Path]:
    """`inputs` plus a problems.parquet with a train split for the student to sample from, and a
    teacher whose next-token distributions are sharp (final norm scaled up), so a fresh student
    starts far from it."""
    import shutil

    root = tmp_path_factory.mktemp("problems-op")
    teacher, tok, _ = load_checkpoint(inputs["rl_reasoning"] / "checkpoint")
    with torch.no_grad():
        teacher.norm.weight.mul_(8.0)
    save_checkpoint(root / "rl_reasoning" / "checkpoint", teacher, tok, {"stage": "rl_reasoning"})
    problems = root / "problems"
    shutil.copytree(inputs["problems"], problems)
    ps = synthetic.generate_problems(12, 2, difficulty_mix={1: 1.0})
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(12)], "prompt": [p.question for p in ps],
                             "answer": [p.answer for p in ps], "split": ["train"] * 10 + ["test"] * 2,
                             "language": ["en"] * 12}), problems / "problems.parquet")
    return {**inputs, "problems": problems, "rl_reasoning": root / "rl_reasoning"}


ON_POLICY = dict(mode="on_policy", baseline=False, steps=12, batch_size=6, max_new_tokens=16, lr=3e-3,
                 warmup_steps=0, checkpoint_every=4)


def test_on_policy_distillation_trains_the_student(tmp_path, on_policy_inputs):
    # plumbing and bookkeeping; that minimising the loss moves a student to its teacher is
    # tests/stages/test_distill_loss.py (12 steps of a random student toward a random sharp teacher
    # are noise: the reverse KL stayed ~11 in a probe)
    out, s = run_distill(tmp_path, on_policy_inputs, **ON_POLICY)
    assert s["mode"] == "on_policy"
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    kl = [r["value"] for r in sorted(rows, key=lambda r: r["step"]) if r["name"] == "reverse_kl"]
    assert len(kl) == 12 and all(math.isfinite(k) and k > 0 for k in kl)  # a sharp teacher: far from it
    grad = [r["value"] for r in rows if r["name"] == "grad_norm"]
    assert len(grad) == 12 and all(g > 0 for g in grad)  # the teacher's scores reach the student
    assert {"val_loss", "completion_len", "tokens_per_s"} <= {r["name"] for r in rows}
    _, _, meta = load_checkpoint(out / "students" / "micro")
    assert meta["mode"] == "on_policy"


def test_on_policy_resume_equals_an_uninterrupted_run(tmp_path, on_policy_inputs):
    cfg = ON_POLICY | dict(steps=6, checkpoint_every=2)
    whole, _ = run_distill(tmp_path, on_policy_inputs, "whole", **cfg)
    with pytest.raises(KeyboardInterrupt):
        run_distill(tmp_path, on_policy_inputs, "crashed", ctx=quiet(run_dir=tmp_path / "scratch", stop_after=3),
                    **cfg)
    resumed, _ = run_distill(tmp_path, on_policy_inputs, "resumed", ctx=quiet(run_dir=tmp_path / "scratch"), **cfg)
    a = read_safetensors(whole / "students" / "micro" / "model.safetensors")
    b = read_safetensors(resumed / "students" / "micro" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_needs_the_teachers_tokenizer(tmp_path, on_policy_inputs):
    other = train_bpe(["a different corpus entirely, with other merges " * 20], 300)
    init = tmp_path / "init"
    torch.manual_seed(1)
    save_checkpoint(init, Transformer(ModelConfig(vocab_size=other.vocab_size, dim=32, n_layers=1, n_heads=2,
                                                  n_kv_heads=1, ffn_dim=64, max_seq_len=128)), other, {})
    with pytest.raises(ValueError, match="on-policy distillation needs the teacher's tokenizer"):
        run_distill(tmp_path, on_policy_inputs, students=[{"name": "w", "init": str(init)}], **ON_POLICY)
    with pytest.raises(pydantic.ValidationError, match="kd_weight"):
        stage.Config(mode="on_policy", kd_weight=0.5)
def test_a_student_not_smaller_than_the_teacher_is_warned_about(tmp_path, inputs):
    logs: list[str] = []
    ctx = StageContext(seed=0, log=logs.append, progress=lambda it, **_: it)
    run_distill(tmp_path, inputs, ctx=ctx, steps=1, baseline=False,
                students=[{"name": "same", "init": str(inputs["rl_reasoning"] / "checkpoint")}])
    assert any("warning: student 'same'" in m and "not fewer than the teacher" in m for m in logs)


# ------------------------------------------------------------------------------- pruned teacher


def test_a_pruned_teacher_keeps_the_chosen_blocks_with_the_teachers_weights():
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=50, **TEACHER))
    student = stage.prune_layers(teacher, [0, 2])
    assert student.config.n_layers == 2 and student.config.dim == teacher.config.dim
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["tok_embeddings.weight"], t["tok_embeddings.weight"])
    assert torch.equal(s["layers.1.attention.wq.weight"], t["layers.2.attention.wq.weight"])
    assert torch.equal(s["layers.0.feed_forward.w2.weight"], t["layers.0.feed_forward.w2.weight"])
    ids = torch.randint(0, 50, (1, 6))
    assert torch.allclose(stage.prune_layers(teacher, [0, 1, 2, 3])(ids), teacher(ids))  # all kept: the teacher
    with pytest.raises(ValueError, match=r"keep_layers \[4\] out of range: the teacher has 4 blocks"):
        stage.prune_layers(teacher, [0, 4])


def test_teacher_init_students_are_validated():
    spec = stage.StudentSpec(name="half", init="teacher", keep_layers=[0, 2])
    assert spec.keep_layers == [0, 2]
    for bad, message in (({"init": "teacher"}, "needs keep_layers"), ({"model": "micro", "keep_layers": [0]}, "goes with"),
                         ({"init": "teacher", "keep_layers": [2, 0]}, "increasing"),
                         ({"init": "teacher", "keep_layers": []}, "increasing")):
        with pytest.raises(pydantic.ValidationError, match=message):
            stage.StudentSpec(name="half", **bad)


def test_a_teacher_init_student_starts_from_the_teacher_and_trains(tmp_path, inputs):
    out, summary = run_distill(tmp_path, inputs, students=[{"name": "half", "init": "teacher", "keep_layers": [0, 2]}],
                               baseline=True)
    assert summary["half.params"] < summary["teacher_params"]
    student, _, meta = load_checkpoint(out / "students" / "half")
    assert student.config.n_layers == 2 and meta["keep_layers"] == [0, 2]
    baseline, _, _ = load_checkpoint(out / "baselines" / "half")  # the control starts from the same pruned teacher
    assert baseline.config.n_layers == 2
