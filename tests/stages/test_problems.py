"""The problems stage on tiny data: synthetic determinism, user files, drops and errors."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest

from artifacts.store import schema_problems
from stages import problems as stage
from stages.context import StageContext

SMALL = dict(n_train=120, n_test=30, corpus_docs=400)


def run(tmp_path: Path, name: str = "out", seed: int = 0, **overrides) -> tuple[Path, dict]:
    out = tmp_path / name
    out.mkdir()
    summary = stage.run(stage.Config(**overrides), {}, out, StageContext(seed=seed))
    return out, summary


def rows(out: Path) -> list[dict]:
    table = pq.read_table(out / "problems.parquet")
    assert schema_problems(table.schema, stage.SCHEMAS["problems.parquet"]) == []
    return table.to_pylist()


# ------------------------------------------------------------------------------------- contract


def test_stage_contract():
    assert stage.INPUTS == ()
    assert set(stage.SCHEMAS) == {"problems.parquet", "corpus.parquet"}
    assert stage.SCHEMAS["problems.parquet"].names == ["id", "prompt", "answer", "split", "source", "language",
                                                       "difficulty", "messages", "data_source", "extra_info"]
    with pytest.raises(pydantic.ValidationError):
        stage.Config(n_trian=10)  # extra="forbid"
    with pytest.raises(pydantic.ValidationError, match="unknown task"):
        stage.Config(task_mix={"division": 1.0})
    with pytest.raises(pydantic.ValidationError, match="unknown difficulty"):
        stage.Config(difficulty_mix={5: 1.0})
    with pytest.raises(pydantic.ValidationError, match="<= 1"):
        stage.Config(slip_rate=0.5, untagged_rate=0.4, drift_rate=0.2)
    with pytest.raises(pydantic.ValidationError, match="needs path"):
        stage.Config(source="file")
    assert stage.Config(difficulty_mix={"1": 1.0}).difficulty_mix == {1: 1.0}  # TOML keys are strings


@pytest.mark.parametrize("text,want", [
    ("  42 ", "42"), ("$-3/4$", "-3/4"), ("$$ 7 $$", "7"), ("\\boxed{12}", "12"),
    ("$\\boxed{ \\frac{1}{2} }$", "\\frac{1}{2}"), ("\\boxed{1}+\\boxed{2}", "\\boxed{1}+\\boxed{2}"),
    ("$5", "$5"), ("$", "$"), ("", ""), ("\\boxed{}", ""),
])
def test_normalize_answer(text, want):
    assert stage.normalize_answer(text) == want


# ------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_complete(tmp_path):
    out1, s1 = run(tmp_path, "a", **SMALL)
    out2, s2 = run(tmp_path, "b", **SMALL)
    out3, _ = run(tmp_path, "c", seed=1, **SMALL)
    for name in ("problems.parquet", "corpus.parquet"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()
        assert (out1 / name).read_bytes() != (out3 / name).read_bytes()
    assert s1 == s2
    assert run(tmp_path, "d", seed=1, seed_offset=-1, **SMALL)[1] == s1  # seed + offset is the seed

    got = rows(out1)
    assert len(got) == 150 and s1["rows"] == 150
    assert sum(r["split"] == "train" for r in got) == 120 == s1["rows_train"]
    assert sum(r["split"] == "test" for r in got) == 30 == s1["rows_test"]
    assert len({r["id"] for r in got}) == 150
    for r in got:
        assert r["id"] == hashlib.sha256(r["prompt"].encode()).hexdigest()[:16]
        assert r["source"].startswith("synthetic/") and r["language"] == "en"
        assert r["difficulty"] in (1, 2, 3)
    assert sum(v for k, v in s1.items() if k.startswith("rows_task_")) == 150
    assert s1["dropped_duplicate"] == s1["dropped_empty_answer"] == 0


def test_corpus_has_the_configured_noise_and_no_test_question(tmp_path):
    out, s = run(tmp_path, **SMALL, slip_rate=0.2, untagged_rate=0.3, drift_rate=0.1)
    table = pq.read_table(out / "corpus.parquet")
    assert schema_problems(table.schema, stage.SCHEMAS["corpus.parquet"]) == []
    docs = table.to_pylist()
    kinds = [d["kind"] for d in docs]
    assert len(docs) == 400 == s["corpus_docs"]
    assert (kinds.count("slip"), kinds.count("untagged"), kinds.count("drift")) == (80, 120, 40)
    assert (s["corpus_slip"], s["corpus_untagged"], s["corpus_drift"], s["corpus_clean"]) == (80, 120, 40, 160)
    assert s["corpus_mean_chars"] == pytest.approx(sum(len(d["text"]) for d in docs) / 400, abs=0.1)
    test_questions = {r["prompt"] for r in rows(out) if r["split"] == "test"}
    for d in docs:
        assert d["text"].startswith("User: ")
        question = d["text"][len("User: "):].split("\nAssistant:", 1)[0]
        assert question not in test_questions
        assert ("<think>" in d["text"]) == (d["kind"] != "untagged")


def test_no_corpus_when_asked_for_none(tmp_path):
    out, s = run(tmp_path, n_train=10, n_test=5, corpus_docs=0)
    assert not (out / "corpus.parquet").exists() and "corpus_docs" not in s


def test_system_prompt_and_few_shot_become_the_prompt_messages(tmp_path):
    example = {"user": "What is 4 + 3?", "assistant": "<think>\n4 + 3 = 7.\n</think>\n<answer>7</answer>"}
    out, _ = run(tmp_path, n_train=20, n_test=5, corpus_docs=0, task_mix={"add": 1, "mul": 1},
                 difficulty_mix={0: 1}, system_prompt="Use the tags.", few_shot=[example])
    for r in rows(out):
        assert r["difficulty"] == 0
        assert r["messages"] == [{"role": "system", "content": "Use the tags."},
                                 {"role": "user", "content": example["user"]},
                                 {"role": "assistant", "content": example["assistant"]},
                                 {"role": "user", "content": r["prompt"]}]
    plain, _ = run(tmp_path, "plain", n_train=20, n_test=5, corpus_docs=0)
    assert all(r["messages"] is None for r in rows(plain))
    with pytest.raises(pydantic.ValidationError, match="only for add, sub, mul"):
        stage.Config(task_mix={"frac": 1}, difficulty_mix={0: 1})


def test_a_row_keeps_its_own_system_turn_and_gets_the_examples_after_it():
    row = {"prompt": "Q?", "messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "Q?"}]}
    got = stage.with_prompt_turns(row, "config's", [stage.FewShot(user="E?", assistant="A")])
    assert [m["content"] for m in got["messages"]] == ["mine", "E?", "A", "Q?"]


# ----------------------------------------------------------------------------------- user files

USER_ROWS = [
    {"question": "What is 2 + 2?", "solution": " 4 ", "part": "train", "lang": "en", "level": 1},
    {"question": "Solve x + 1 = 3", "solution": "$2$", "part": "test", "lang": "en", "level": 2},
    {"question": "  ", "solution": "1", "part": "train", "lang": "en", "level": 1},           # empty prompt
    {"question": "What is 1/2 + 1/4?", "solution": "", "part": "train", "lang": "en", "level": None},  # empty answer
    {"question": "What is 2 + 2?", "solution": "4", "part": "train", "lang": "en", "level": 1},       # duplicate
    {"question": "What is 2 + 2?", "solution": "5", "part": "test", "lang": "en", "level": 1},        # conflicting
    {"question": "3 减 1 等于几?", "solution": "\\boxed{2}", "part": "validation", "lang": "zh", "level": 3},
]
MAPPING = dict(prompt_column="question", answer_column="solution", split_column="part",
               language_column="lang", difficulty_column="level")


def write_user_file(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    else:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in records)
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv", ".tsv"])
def test_user_file_with_column_mapping(tmp_path, suffix):
    path = write_user_file(tmp_path / f"mine{suffix}", USER_ROWS)
    out, s = run(tmp_path, source="file", path=str(path), **MAPPING)
    got = rows(out)
    assert [(r["prompt"], r["answer"], r["split"], r["language"], r["difficulty"]) for r in got] == [
        ("What is 2 + 2?", "4", "train", "en", 1),
        ("Solve x + 1 = 3", "2", "test", "en", 2),
        ("3 减 1 等于几?", "2", "test", "zh", 3),
    ]
    assert {r["source"] for r in got} == {f"file/mine{suffix}"}
    assert (s["dropped_empty_prompt"], s["dropped_empty_answer"]) == (1, 1)
    assert (s["dropped_duplicate"], s["duplicate_conflicts"]) == (2, 1)
    assert s["answers_normalised"] == 3 and s["skipped_invalid_utf8"] == 0
    assert (s["rows"], s["rows_train"], s["rows_test"]) == (3, 1, 2)
    assert s["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == stage.source_fingerprint(
        stage.Config(source="file", path=str(path)))
    corpus = pq.read_table(out / "corpus.parquet").column("text").to_pylist()  # train problems only
    assert corpus[0] == "User: What is 2 + 2?\nAssistant: <think> The answer is 4. </think> <answer> 4 </answer>"
    assert len(corpus) == s["corpus_docs"] == stage.Config().corpus_docs and len(set(corpus)) == 1


def test_hash_split_without_split_column(tmp_path):
    records = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(400)]
    path = write_user_file(tmp_path / "p.jsonl", records)
    out1, s = run(tmp_path, "a", source="file", path=str(path), test_fraction=0.25)
    got = rows(out1)
    assert 70 <= s["rows_test"] <= 130  # ~100 expected
    for r in got:  # a function of the id alone: the same row lands in the same split in any file
        assert r["split"] == ("test" if stage.split_key(r["id"]) < 0.25 else "train")
        assert r["language"] == "en" and r["difficulty"] is None
    path2 = write_user_file(tmp_path / "q.jsonl", records[::-1])
    out2, _ = run(tmp_path, "b", source="file", path=str(path2), test_fraction=0.25)
    assert {r["id"]: r["split"] for r in got} == {r["id"]: r["split"] for r in rows(out2)}


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_missing_answer_column_names_it_and_lists_columns(tmp_path, suffix):
    path = write_user_file(tmp_path / f"p{suffix}", [{"prompt": "What is 1 + 1?", "solution": "2"}])
    with pytest.raises(ValueError) as e:  # the `columns` schema: exactly the mapped columns
        run(tmp_path, source="file", path=str(path), schema="columns")
    assert "'answer'" in str(e.value) and "'prompt', 'solution'" in str(e.value) and path.name in str(e.value)


def test_bad_split_value_and_unknown_format_are_errors(tmp_path):
    path = write_user_file(tmp_path / "p.jsonl", [{"prompt": "q", "answer": "1", "split": "holdout"}])
    with pytest.raises(ValueError, match=r"line 1: split value 'holdout'"):
        run(tmp_path, "a", source="file", path=str(path), split_column="split")
    other = tmp_path / "p.txt"
    other.write_text("prompt,answer\nq,1\n")
    with pytest.raises(ValueError, match="file_format"):
        run(tmp_path, "b", source="file", path=str(other))
    assert rows(run(tmp_path, "c", source="file", path=str(other), file_format="csv")[0])[0]["answer"] == "1"
    with pytest.raises(FileNotFoundError):
        run(tmp_path, "d", source="file", path=str(tmp_path / "nope.jsonl"))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "q", "answer": "1"}\n{"prompt": "r", "answer": \n')
    with pytest.raises(ValueError, match=r"p.jsonl line 2: not valid JSON"):
        run(tmp_path, source="file", path=str(path))


# ------------------------------------------------------------------------------ non-UTF-8 bytes

GOOD = b'{"prompt": "What is 1 + 1?", "answer": "2"}\n'
BAD = b'{"prompt": "What is caf\xe9 + 1?", "answer": "3"}\n'


def test_invalid_utf8_jsonl_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(GOOD + BAD + GOOD.replace(b"1 + 1", b"2 + 2"))
    with pytest.raises(ValueError) as e:
        run(tmp_path, source="file", path=str(path))
    msg = str(e.value)
    assert "p.jsonl line 2" in msg and "'prompt'" in msg and "\\xe9" in msg and "on_invalid_utf8" in msg


def test_invalid_utf8_skip_counts_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(GOOD + BAD + GOOD.replace(b"1 + 1", b"2 + 2"))
    out, s = run(tmp_path, source="file", path=str(path), on_invalid_utf8="skip")
    assert [r["prompt"] for r in rows(out)] == ["What is 1 + 1?", "What is 2 + 2?"]
    assert s["skipped_invalid_utf8"] == 1 and s["rows"] == 2


def test_invalid_utf8_csv_names_the_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt,answer\nWhat is 1 + 1?,2\n\"two\nlines\",\xff3\n")
    with pytest.raises(ValueError, match=r"p.csv line 4: column 'answer' has bytes that are not valid UTF-8 \(\\xff\)"):
        run(tmp_path, "a", source="file", path=str(path))
    out, s = run(tmp_path, "b", source="file", path=str(path), on_invalid_utf8="skip")
    assert len(rows(out)) == 1 and s["skipped_invalid_utf8"] == 1


def test_invalid_utf8_in_an_unmapped_column_is_harmless(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt,answer,note\nWhat is 1 + 1?,2,caf\xe9\n")
    out, s = run(tmp_path, source="file", path=str(path))
    assert len(rows(out)) == 1 and s["skipped_invalid_utf8"] == 0


def test_invalid_utf8_parquet_names_the_row(tmp_path):
    # prompts in a binary column (row 3 invalid); answers in a string column that a foreign writer
    # filled with invalid UTF-8 in row 2 (built from raw buffers: offsets 0,1,2,3 over b"2\xfe4")
    prompts = pa.array([b"What is 1 + 1?", b"What is 1 + 2?", b"What is \xff?"], pa.binary())
    offsets = pa.py_buffer(b"".join(i.to_bytes(4, "little") for i in (0, 1, 2, 3)))
    answers = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"2\xfe4")])
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": prompts, "answer": answers}), path)
    msg = r"p.parquet row 2: column 'answer' has bytes that are not valid UTF-8 \(\\xfe\)"
    with pytest.raises(ValueError, match=msg):
        run(tmp_path, "a", source="file", path=str(path))
    out, s = run(tmp_path, "b", source="file", path=str(path), on_invalid_utf8="skip")
    assert [(r["prompt"], r["answer"]) for r in rows(out)] == [("What is 1 + 1?", "2")]
    assert s["skipped_invalid_utf8"] == 2


def test_nan_and_infinity_answers_are_dropped_like_null(tmp_path):
    """JSON's NaN / Infinity (and a float column's NaN) are no answer: dropped and counted, never "nan"."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a?", "answer": NaN}\n{"prompt": "b?", "answer": Infinity}\n'
                    '{"prompt": "c?", "answer": -Infinity}\n{"prompt": "d?", "answer": 4.0}\n')
    out, s = run(tmp_path, source="file", path=str(path))
    assert [(r["prompt"], r["answer"]) for r in rows(out)] == [("d?", "4")]
    assert s["dropped_empty_answer"] == 3
    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["e?", "f?"], "answer": [float("nan"), 2.5]}), pq_path)
    out, s = run(tmp_path, "q", source="file", path=str(pq_path))
    assert [(r["prompt"], r["answer"]) for r in rows(out)] == [("f?", "2.5")] and s["dropped_empty_answer"] == 1
