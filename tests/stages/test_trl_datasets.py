"""SFT and preference data in TRL's conversational form: `datasets` reads them and TRL's
SFTTrainer / DPOTrainer take them as they are."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from lm.chat_template import r1_system_prompt
from tests.stages.test_rejection_sampling import GOOD1, Q1, _run, run_inputs  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def outputs(run_inputs, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("rs-out")
    _run(run_inputs, out)
    return out


def test_reasoning_sft_and_pairs_are_conversational(outputs):
    sft = pq.read_table(outputs / "reasoning_sft.parquet").to_pylist()
    first = sft[0]
    # the r1_zero_short template has no system turn: the prompt is the user's question
    assert first["prompt"] == [{"role": "user", "content": Q1}] and first["prompt_text"] == Q1
    assert first["completion"] == [{"role": "assistant", "content": GOOD1}] and first["completion_text"] == GOOD1
    pairs = pq.read_table(outputs / "preference_pairs.parquet").to_pylist()
    assert pairs and all(p["chosen"][0]["role"] == "assistant" and p["rejected"][0]["content"] == p["rejected_text"]
                         for p in pairs)


def test_the_template_decides_the_system_turn():
    from stages.sampling import conversational

    row = {"prompt": Q1, "completion": GOOD1, "messages": None}
    assert conversational(row, "r1_zero", ("completion",))["prompt"] == [
        {"role": "system", "content": r1_system_prompt()}, {"role": "user", "content": Q1}]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q1}]
    out = conversational(dict(row, messages=chat), "chat", ("completion",))
    assert out["prompt"] == chat and out["prompt_text"] == Q1  # the problem's own system turn stays


def test_datasets_loads_rows_trl_reads_as_conversational(outputs):
    datasets = pytest.importorskip("datasets")
    data_utils = pytest.importorskip("trl.data_utils")
    sft = datasets.load_dataset("parquet", data_files=str(outputs / "reasoning_sft.parquet"), split="train")
    pairs = datasets.load_dataset("parquet", data_files=str(outputs / "preference_pairs.parquet"), split="train")
    for row in list(sft) + list(pairs):
        for key in ("prompt", "completion", "chosen", "rejected"):
            if key in row:  # is_conversational looks at one of these keys, whichever it pops first
                assert data_utils.is_conversational({key: row[key]}), (key, row[key])


@pytest.mark.slow  # builds and trains a tiny model with TRL (~20 s of CPU)
def test_sft_trainer_takes_reasoning_sft_as_it_is(outputs, tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from tests.rewards.test_trl_trainer import tiny_llama, tiny_tokenizer

    data = datasets.load_dataset("parquet", data_files=str(outputs / "reasoning_sft.parquet"), split="train")
    tok = tiny_tokenizer()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                         save_strategy="no", use_cpu=True, bf16=False, logging_steps=1, max_length=64)
    trainer = trl.SFTTrainer(model=tiny_llama(tok), args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 2
    assert any("loss" in h for h in trainer.state.log_history)
