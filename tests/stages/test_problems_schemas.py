"""User data the way verl, TRL and open-r1 write it: shards, globs, chat messages, struct columns."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import problems as stage
from stages.context import StageContext
from stages.sampling import read_problems

VERL_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def gsm8k_rows(split: str, n: int, start: int = 0) -> list[dict]:
    """Rows as verl's examples/data_preprocess/gsm8k.py maps GSM8K (same keys, same nesting)."""
    rows = []
    for idx in range(n):
        a, b = start + idx + 2, 3
        question_raw = f"Tom has {a} apples and buys {b} more. How many apples does he have?"
        answer_raw = f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"
        rows.append({
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": question_raw + " " + VERL_INSTRUCTION}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"split": split, "index": idx, "answer": answer_raw, "question": question_raw},
        })
    return rows


def write_verl_dir(root: Path, n_train: int = 12, n_test: int = 4) -> Path:
    """train.parquet + test.parquet written through `datasets`, as verl's script does."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(gsm8k_rows("train", n_train)).to_parquet(str(root / "train.parquet"))
    datasets.Dataset.from_list(gsm8k_rows("test", n_test, start=100)).to_parquet(str(root / "test.parquet"))
    return root


def openr1_rows(n: int) -> list[dict]:
    """open-r1 style (NuminaMath / OpenR1-Math): `problem`, a worked `solution` ending in a box."""
    return [{"problem": f"Compute ${i} \\cdot 4 + 1$.",
             "solution": f"We multiply first: ${i} \\cdot 4 = {4 * i}$, then add one. "
                         f"The answer is $\\boxed{{{4 * i + 1}}}$."} for i in range(1, n + 1)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path: Path, name: str = "out", **cfg) -> tuple[Path, dict]:
    out = tmp_path / name
    out.mkdir()
    summary = stage.run(stage.Config(source="file", **cfg), {}, out, StageContext(seed=0, log=lambda _: None))
    return out, summary


def rows(out: Path) -> list[dict]:
    return pq.read_table(out / "problems.parquet").to_pylist()


def test_verl_directory_auto_detected(tmp_path):
    data = write_verl_dir(tmp_path / "gsm8k")
    out, s = run(tmp_path, path=str(data), corpus_docs=0)
    assert s["schema"] == "verl" and s["files"] == 2
    assert (s["rows_train"], s["rows_test"]) == (12, 4)  # the split comes from the file names
    got = rows(out)
    first = next(r for r in got if r["source"] == "file/train.parquet")  # files in name order: test first
    assert first["answer"] == "5" and first["data_source"] == "openai/gsm8k"
    assert first["prompt"].endswith(VERL_INSTRUCTION) and first["messages"] == [
        {"role": "user", "content": first["prompt"]}]
    assert json.loads(first["extra_info"])["index"] == 0 and first["source"] == "file/train.parquet"
    # later stages see the messages and the verl columns
    p = read_problems(out, "test")[0]
    assert p.messages[0]["role"] == "user" and p.columns["extra_info"]["split"] == "test"
    assert p.columns["data_source"] == "openai/gsm8k"


def test_shards_by_glob_and_dotted_answer_column(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for k in range(3):
        pq.write_table(pa.Table.from_pylist(gsm8k_rows("train", 4, start=10 * k)), data / f"train-{k:05d}-of-00003.parquet")
    pq.write_table(pa.Table.from_pylist(gsm8k_rows("test", 2, start=500)), data / "test-00000-of-00001.parquet")
    out, s = run(tmp_path, path=str(data / "train-*.parquet"), schema="trl",
                 answer_column="reward_model.ground_truth", corpus_docs=0)
    assert s["files"] == 3 and (s["rows_train"], s["rows_test"]) == (12, 0)
    assert sorted(int(r["answer"]) for r in rows(out)) == sorted(a + 5 for k in range(3) for a in range(10 * k, 10 * k + 4))


def test_trl_conversational_prompt_with_system_turn_and_solution_column(tmp_path):
    chat = [{"prompt": [{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": f"What is {i} + 1?"}],
             "solution": f"Adding one gives \\boxed{{{i + 1}}}."} for i in range(6)]
    out, s = run(tmp_path, path=str(write_jsonl(tmp_path / "chat.jsonl", chat)), corpus_docs=0)
    assert s["schema"] == "trl"
    got = rows(out)
    assert [r["answer"] for r in got] == [str(i + 1) for i in range(6)]
    assert got[0]["prompt"] == "What is 0 + 1?" and got[0]["messages"][0] == {"role": "system", "content": "Answer briefly."}
    plain = [{"prompt": f"What is {i} + 2?", "ground_truth": i + 2} for i in range(3)]
    out, s = run(tmp_path, "plain", path=str(write_jsonl(tmp_path / "plain.jsonl", plain)), corpus_docs=0)
    assert [r["answer"] for r in rows(out)] == ["2", "3", "4"] and rows(out)[0]["messages"] is None


def test_openr1_jsonl_boxed_and_gsm8k_answers_and_bad_rows_counted(tmp_path):
    records = openr1_rows(8) + [
        {"problem": "How many legs do 3 cats have?", "solution": "Each has 4, so 3 * 4 = 12.\n#### 12"},
        {"problem": "What is the colour of the sky?", "solution": "It is blue, usually."},  # no answer
        {"problem": "", "solution": "\\boxed{1}"},  # empty prompt
        {"problem": [{"role": "user"}], "solution": "\\boxed{2}"},  # not role/content messages
        {"problem": [{"role": "assistant", "content": "hi"}], "solution": "\\boxed{2}"},  # no user turn last
    ]
    out, s = run(tmp_path, path=str(write_jsonl(tmp_path / "numina.jsonl", records)))
    assert s["schema"] == "openr1"
    got = {r["prompt"]: r["answer"] for r in rows(out)}
    assert got["Compute $3 \\cdot 4 + 1$."] == "13" and got["How many legs do 3 cats have?"] == "12"
    assert (s["dropped_no_answer"], s["dropped_empty_prompt"], s["dropped_bad_messages"]) == (1, 1, 2)
    corpus = pq.read_table(out / "corpus.parquet").column("text").to_pylist()
    assert any("We multiply first" in d for d in corpus)  # the worked solution is the reasoning
    test_prompts = {r["prompt"] for r in rows(out) if r["split"] == "test"}
    assert not any(p in d for d in corpus for p in test_prompts)


def test_no_usable_row_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "Why?", "solution": "Because."}] * 3)
    with pytest.raises(ValueError, match=r"no usable row \(dropped_no_answer 3\)"):
        run(tmp_path, path=str(path))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        run(tmp_path, "b", path=str(tmp_path / "nothing-*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no data files"):
        run(tmp_path, "c", path=str(tmp_path / "empty"))


def test_editing_a_shard_changes_the_fingerprint(tmp_path):
    data = write_verl_dir(tmp_path / "gsm8k")
    cfg = stage.Config(source="file", path=str(data))
    before = stage.external_inputs(cfg)
    pq.write_table(pa.Table.from_pylist(gsm8k_rows("test", 3, start=7)), data / "test.parquet")
    assert stage.external_inputs(cfg) != before
    assert stage.external_inputs(stage.Config()) == {}


@pytest.mark.parametrize("name, split", [("train.parquet", "train"), ("test-00000-of-00001.parquet", "test"),
                                         ("validation.jsonl", "test"), ("trainer_notes.jsonl", None),
                                         ("data.parquet", None)])
def test_split_of_file(name, split):
    assert stage.split_of_file(Path(name)) == split
