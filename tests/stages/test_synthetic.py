"""The synthetic task family: exact answers, checkable traces, deterministic noisy corpus.

Answers are re-derived here independently of stages.synthetic: questions are evaluated with an
`ast` walker over Fractions (our own question strings, never model output), equations are checked
by substituting the answer back into both sides.
"""
from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from stages import synthetic as syn

CJK = re.compile(r"[\u4e00-\u9fff]")
TAGGED = re.compile(r" <think> (.+) </think> <answer> (\S+) </answer>")
ANSWER_FORM = re.compile(r"-?\d+(/\d+)?")


def fraction_eval(text: str, x: Fraction | None = None) -> Fraction:
    """Evaluate + - * / unary minus, integers and the name x over Fractions."""

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.Name) and node.id == "x" and x is not None:
            return x
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                   ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unexpected node {ast.dump(node)}")

    return ev(ast.parse(text, mode="eval"))


def reference_value(question: str) -> Fraction | None:
    """The exact value of a 'What is ...?' question (None for equations)."""
    m = re.fullmatch(r"What is (.+)\?", question)
    return fraction_eval(m[1]) if m else None


def solves(question: str, answer: str) -> bool:
    """Whether `answer` satisfies the equation in 'Solve for x: L = R'."""
    m = re.fullmatch(r"Solve for x: (.+) = (.+)", question)
    assert m, question
    x = Fraction(answer)
    side = lambda s: fraction_eval(re.sub(r"(\d)x", r"\1*x", s), x)  # noqa: E731  3x -> 3*x
    return side(m[1]) == side(m[2])


def false_facts(think: str) -> int:
    """How many arithmetic equalities in a trace are false ('13-1-8=4' true, '7+5=13' false).

    Equalities that involve x are skipped, except that a leading 'x=' or '3x=' is dropped so
    '3x=20-5=15' still checks '20-5=15'.
    """
    wrong = 0
    for token in think.split():
        token = token.rstrip(".,:")
        token = re.sub(r"^-?\d*x[^=]*=", "", token)
        if "=" not in token or not re.fullmatch(r"[-\d+*/()=]+", token):
            continue
        values = [fraction_eval(part) for part in token.split("=")]
        wrong += any(v != values[0] for v in values[1:])
    return wrong


@pytest.fixture(scope="module")
def problems() -> list[syn.Problem]:
    # Every (task, level) cell, 40 draws each: 720 problems, plus level 0 of add/sub/mul: 120 more.
    rng = random.Random(7)
    cells = [(t, d) for t in syn.TASKS for d in syn.DIFFICULTIES] + [(t, 0) for t in syn.EASY_TASKS]
    return [syn.generate_problem(t, d, rng) for t, d in cells for _ in range(40)]


def test_answers_are_exact_and_canonical(problems):
    for p in problems:
        assert ANSWER_FORM.fullmatch(p.answer), p
        value = Fraction(p.answer)
        assert syn.format_answer(value) == p.answer  # reduced, sign on the numerator, no '/1'
        if p.task == "linear":
            assert solves(p.question, p.answer), p
        else:
            assert reference_value(p.question) == value, p


def test_answer_forms_cover_negatives_and_fractions(problems):
    answers = [p.answer for p in problems]
    assert any(a.startswith("-") and "/" not in a for a in answers)
    assert any("/" in a and not a.startswith("-") for a in answers)
    assert any(a.startswith("-") and "/" in a for a in answers)


def test_format_answer():
    assert syn.format_answer(Fraction(6, 8)) == "3/4"
    assert syn.format_answer(Fraction(3, -4)) == "-3/4"
    assert syn.format_answer(Fraction(10, 5)) == "2"
    assert syn.format_answer(-7) == "-7"


def test_clean_traces_are_true_tagged_and_short(problems):
    for p in problems:
        completion = syn.render_clean_trace(p)
        m = TAGGED.fullmatch(completion)
        assert m, completion
        think, answer = m[1], m[2]
        assert answer == p.answer
        assert think.endswith(f"so {p.answer}.")
        assert false_facts(think) == 0, completion
        assert not CJK.search(completion)
        # ~ tokens under a digit-splitting BPE: digits, words, symbols each one token
        approx_tokens = len(re.findall(r"\d|[A-Za-z]+|<[^>]+>|\S", completion))
        assert approx_tokens <= 90, (approx_tokens, completion)


def test_slip_traces_have_one_false_fact_and_a_consistent_wrong_answer(problems):
    rng = random.Random(3)
    for p in problems:
        slipped = syn.slipped_steps(p, rng)
        assert slipped is not None, p
        steps, answer = slipped
        think = " ".join(steps)
        assert answer != p.answer
        assert ANSWER_FORM.fullmatch(answer)
        assert think.endswith(f"so {answer}.")
        assert false_facts(think) == 1, think


def test_worked_examples():
    p = syn.parse_question("What is 347 + 285?")
    assert syn.render_clean_trace(p) == (
        " <think> 7+5=12 carry 1: 2. 4+8+1=13 carry 1: 32. 3+2+1=6: 632. so 632. </think> <answer> 632 </answer>")
    p = syn.parse_question("What is 187 - 532?")
    assert syn.solution_steps(p)[0] == [
        "187<532 so -(532-187).", "12-7=5 borrow 1: 5.", "13-1-8=4 borrow 1: 45.", "5-1-1=3: 345.", "so -345."]
    p = syn.parse_question("Solve for x: 5x + 3 = 2x + 12")
    assert syn.solution_steps(p) == (
        ["subtract 2x: 5-2=3, 3x+3=12.", "subtract 3: 3x=12-3=9.", "divide by 3: x=9/3=3.", "so 3."], "3")
    p = syn.parse_question("What is 1/4 + 1/2?")
    assert syn.solution_steps(p) == (
        ["top 1*2+1*4=6.", "bottom 4*2=8.", "reduce by 2: 6/8=3/4.", "so 3/4."], "3/4")
    p = syn.parse_question("What is 3 + 4 * 5 - 6?")
    assert syn.solution_steps(p)[0] == ["first 4*5=20.", "then 3+20=23.", "then 23-6=17.", "so 17."]


def test_questions_parse_back(problems):
    for p in problems:
        q = syn.parse_question(p.question)
        assert q is not None and (q.task, q.spec, q.answer) == (p.task, p.spec, p.answer), p
        assert syn.render_clean_trace(p.question) == syn.render_clean_trace(p)
    assert syn.parse_question("What is the capital of France?") is None
    assert syn.render_clean_trace("Solve for y: 2y = 4") is None


def test_expression_rendering_keeps_the_tree():
    tree = ("-", 9, ("+", 2, 3))  # 9 - (2 + 3), not 9 - 2 + 3
    assert syn.expr_text(tree) == "9 - (2 + 3)"
    assert syn.parse_expr(syn.expr_text(tree)) == tree
    assert syn.parse_expr("(1 + 2) * 3 - 4") == ("-", ("*", ("+", 1, 2), 3), 4)
    with pytest.raises(ValueError):
        syn.parse_expr("1 + __import__('os')")


def test_generation_is_deterministic_and_seeded():
    a = syn.generate_problems(300, seed=11)
    assert a == syn.generate_problems(300, seed=11)
    assert a != syn.generate_problems(300, seed=12)
    assert len({p.question for p in a}) == 300
    docs = syn.build_corpus(a, syn.CorpusConfig(), seed=5)
    assert docs == syn.build_corpus(a, syn.CorpusConfig(), seed=5)
    assert docs != syn.build_corpus(a, syn.CorpusConfig(), seed=6)


def test_mix_and_exclusion():
    # unique=False: level-1 fractions have only ~1000 distinct questions, which would skew the mix
    ps = syn.generate_problems(3000, seed=1, task_mix={"add": 1, "frac": 3}, difficulty_mix={1: 1, 3: 1},
                               unique=False)
    tasks = Counter(p.task for p in ps)
    levels = Counter(p.difficulty for p in ps)
    assert set(tasks) == {"add", "frac"} and set(levels) == {1, 3}
    assert 0.70 < tasks["frac"] / 3000 < 0.80
    assert 0.45 < levels[1] / 3000 < 0.55
    excluded = {p.question for p in ps[:200]}
    again = syn.generate_problems(500, seed=1, task_mix={"add": 1, "frac": 3}, difficulty_mix={1: 1, 3: 1},
                                  exclude=excluded, unique=False)
    assert not excluded & {p.question for p in again}


def test_bad_requests_are_errors():
    with pytest.raises(ValueError, match="unknown task"):
        syn.generate_problems(5, seed=0, task_mix={"division": 1})
    with pytest.raises(ValueError, match="distinct problems"):  # 'ax = d' and 'x + b = d': ~1900 questions
        syn.generate_problems(5000, seed=0, task_mix={"linear": 1}, difficulty_mix={1: 1})
    with pytest.raises(ValueError):
        syn.CorpusConfig(slip_rate=0.6, untagged_rate=0.5)
    with pytest.raises(ValueError):
        syn.generate_problem("add", 4, random.Random(0))
    with pytest.raises(ValueError, match="0 for add, sub, mul"):
        syn.generate_problem("frac", 0, random.Random(0))
    with pytest.raises(ValueError, match="only for add, sub, mul; the task mix also has expr"):
        syn.generate_problems(5, seed=0, task_mix={"add": 1, "expr": 1}, difficulty_mix={0: 1, 1: 1})


def test_level_zero_has_one_digit_operands_and_never_a_negative_answer():
    ps = syn.generate_problems(150, seed=2, task_mix={"add": 1, "sub": 1, "mul": 1}, difficulty_mix={0: 1})
    assert {p.task for p in ps} == {"add", "sub", "mul"} and {p.difficulty for p in ps} == {0}
    for p in ps:
        assert all(1 <= v <= 9 for v in p.spec), p
        assert not p.answer.startswith("-"), p
        assert syn.parse_question(p.question).answer == p.answer


def test_corpus_noise_kinds_and_rates():
    ps = syn.generate_problems(2000, seed=3, unique=False)
    cfg = syn.CorpusConfig(slip_rate=0.2, untagged_rate=0.3, drift_rate=0.1)
    docs = syn.build_corpus(ps, cfg, seed=4)
    kinds = Counter(d.kind for d in docs)
    assert kinds["slip"] == 400 and kinds["untagged"] == 600 and kinds["drift"] == 200 and kinds["clean"] == 800
    for p, d in zip(ps, docs):
        prefix = f"User: {p.question}\nAssistant:"
        assert d.text.startswith(prefix)
        completion = d.text[len(prefix):]
        m = TAGGED.fullmatch(completion)
        if d.kind == "untagged":
            assert m is None and "<think>" not in completion and "<answer>" not in completion
            assert re.search(rf"(answer: |The answer is |#### ){re.escape(p.answer)}\.?$", completion)
            assert false_facts(completion) == 0
            continue
        assert m, d
        assert completion.startswith(" <think>")
        think, answer = m[1], m[2]
        if d.kind == "slip":
            assert answer != p.answer and false_facts(think) == 1
        else:
            assert answer == p.answer and false_facts(think) == 0
        assert bool(CJK.search(think)) == (d.kind == "drift"), d


def test_drift_switches_language_from_a_step_on():
    steps, _ = syn.solution_steps(syn.parse_question("What is 347 + 285?"))
    assert syn.drift_steps(steps, 1) == [
        "7+5=12 carry 1: 2.", "4+8+1=13 进位 1: 32.", "3+2+1=6: 632.", "所以 632."]
    steps, _ = syn.solution_steps(syn.parse_question("Solve for x: 2x - 3 = 7"))
    assert syn.drift_steps(steps, 0) == ["加上 3: 2x=7+3=10.", "除以 2: x=10/2=5.", "所以 5."]


def test_zero_noise_corpus_is_all_clean():
    ps = syn.generate_problems(100, seed=0)
    docs = syn.build_corpus(ps, syn.CorpusConfig(0, 0, 0), seed=0)
    assert {d.kind for d in docs} == {"clean"}
    assert [d.text for d in docs] == [syn.render_prompt(p.question) + syn.render_clean_trace(p) for p in ps]
