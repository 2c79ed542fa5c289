"""Throughput of the rewards (issue 4 targets), printed as one JSON line.

    python bench/rewards.py [--n-fast 20000] [--n-symbolic 1000] [--timeout 3] [--hostile 4]

- format_language_per_s: format + language_consistency together, single thread pinned to one core
  (target >= 20,000/s), on synthetic R1 completions of ~350 characters, one in five mixing
  Chinese into an English chain of thought;
- accuracy_plain_per_s: accuracy on plain-number answers (integers, decimals, fractions,
  thousands separators, percentages), the fast path, one core (target >= 5,000/s);
- accuracy_symbolic_per_s: accuracy on distinct LaTeX / symbolic pairs through the worker pool
  with 2 workers (target >= 200/s); pool start-up is reported apart;
- hostile: a batch of normal symbolic items plus ``--hostile`` items that need minutes of sympy;
  its time against the bound ``timeout * hostile / workers + normal_time``;
- extraction_scaling: accuracy + format + language on one completion whose answer is 64 KB,
  256 KB and 1 MB of backslashes, braces or ``\\frac{`` (the inputs that made a regex quadratic);
  per payload the seconds at each size and ``ratio_4x`` = t(1 MB) / t(256 KB), about 4 when linear
  (16 when quadratic). ``--only extraction_scaling`` runs this case alone.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewards import accuracy, format_reward, language_consistency_reward  # noqa: E402

WORDS = ("we need to find the value of x so first compute the sum then divide by two and check "
         "whether the result satisfies both equations").split()
CHINESE = "我们需要计算这个值然后检查结果是否正确"
SLOW_REFERENCE = "((a+b+c+d)^2)^{15}"
SLOW_ANSWER = "(a^2+b^2+c^2+d^2+2ab+2ac+2ad+2bc+2bd+2cd)^{15}"


def r1(thought: str, answer: str) -> str:
    return f"<think>\n{thought}\n</think>\n<answer>\n{answer}\n</answer>"


def make_completions(n: int, rng: random.Random) -> list[str]:
    out = []
    for i in range(n):
        thought = " ".join(rng.choice(WORDS) for _ in range(55)) + f" so $x^2 + {i} = y$ gives x = {i}."
        if i % 5 == 0:
            thought += " " + "".join(rng.choice(CHINESE) for _ in range(20))
        out.append(r1(thought, str(i)))
    return out


# (reference, answer) makers; the plain ones take the fast path, the symbolic ones the pool
PLAIN = [
    lambda a, b, i: (str(a), str(a if i % 4 else a + 1)),
    lambda a, b, i: (f"{a:,}", str(a)),
    lambda a, b, i: (f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}"),
    lambda a, b, i: (f"{a / 8:.3f}", f"{a}/8"),
    lambda a, b, i: (f"{b}\\%", str(b)),
    lambda a, b, i: (f"-{a}.5", f"-{a}.50"),
]
SYMBOLIC = [
    lambda a, b, c: (f"\\frac{{{a}}}{{2}}\\sqrt{{{b}}}", f"\\frac{{{a}\\sqrt{{{b}}}}}{{2}}"),
    lambda a, b, c: (f"x^2+{2 * a}x+{a * a}", f"(x+{a})^2"),
    lambda a, b, c: (f"\\frac{{{a}\\pi}}{{{b}}}", f"x = \\frac{{{a}}}{{{b}}}\\pi"),
    lambda a, b, c: (f"({a}, {b + 1}]", f"({a}, {b}]"),
    lambda a, b, c: (f"\\sqrt{{{a * c * c}}}", f"{c}\\sqrt{{{a}}}"),
    lambda a, b, c: (f"(x-{a})(x+{b})", f"x^2 + {b - a}x - {a * b}"),
    lambda a, b, c: (f"\\{{{a}, {b}, {c}\\}}", f"{c}, {a}, {b}"),
    lambda a, b, c: (f"\\frac{{1}}{{{a}}} + \\frac{{1}}{{{b}}}", f"\\frac{{{a + b}}}{{{a * b + 1}}}"),
]


def plain_pairs(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Completions with boxed plain-number answers and their references (1 in 12 wrong)."""
    completions, refs = [], []
    for i in range(n):
        ref, ans = PLAIN[i % len(PLAIN)](rng.randint(1, 10 ** 6), rng.randint(2, 999), i)
        completions.append(r1("short", f"The answer is $\\boxed{{{ans}}}$."))
        refs.append(ref)
    return completions, refs


def symbolic_pairs(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Completions with LaTeX / symbolic answers and their references (2 kinds in 8 unequal)."""
    completions, refs = [], []
    for i in range(n):
        ref, ans = SYMBOLIC[i % len(SYMBOLIC)](rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9))
        completions.append(r1("short", f"$\\boxed{{{ans}}}$"))
        refs.append(ref)
    return completions, refs


def rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


SCALING_PAYLOADS = {"backslashes": "\\", "open_braces": "{", "close_braces": "}", "frac": "\\frac{",
                    "mixed": "\\{\\frac{1}{\\\\"}
SCALING_SIZES = (64 * 1024, 256 * 1024, 1024 * 1024)


def extraction_scaling() -> dict[str, dict[str, float]]:
    """Seconds to score one hostile completion per payload and size, and the 4x-size ratio."""
    out: dict[str, dict[str, float]] = {}
    for name, unit in SCALING_PAYLOADS.items():
        row: dict[str, float] = {}
        for size in SCALING_SIZES:
            completion = "<think>x</think><answer>" + unit * (size // len(unit)) + "</answer>"
            start = time.perf_counter()
            accuracy.accuracy_details([completion], answer=["42"])
            format_reward([completion])
            language_consistency_reward([completion])
            row[f"{size // 1024}KB_s"] = round(time.perf_counter() - start, 4)
        row["ratio_4x"] = round(row["1024KB_s"] / max(row["256KB_s"], 1e-9), 2)
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-fast", type=int, default=20_000)
    ap.add_argument("--n-symbolic", type=int, default=1_000)
    ap.add_argument("--timeout", type=float, default=accuracy.DEFAULT_TIMEOUT_S)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hostile", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["extraction_scaling"], default=None, help="run one case alone")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    out: dict[str, object] = {"cpus": os.cpu_count()}
    if args.only == "extraction_scaling":
        out["extraction_scaling"] = extraction_scaling()
        print(json.dumps(out))
        return 0

    # single-core sections: pin this process, then restore before the pool starts
    old_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
    if old_affinity:
        os.sched_setaffinity(0, {min(old_affinity)})
    completions = make_completions(args.n_fast, rng)
    out["format_language_per_s"] = round(rate(
        lambda: (format_reward(completions), language_consistency_reward(completions)), len(completions)))
    out["format_per_s"] = round(rate(lambda: format_reward(completions), len(completions)))
    out["language_per_s"] = round(rate(lambda: language_consistency_reward(completions), len(completions)))
    plain_c, plain_r = plain_pairs(args.n_fast, rng)
    scores: list = []
    out["accuracy_plain_per_s"] = round(rate(
        lambda: scores.extend(accuracy.accuracy_reward(plain_c, answer=plain_r)), len(plain_c)))
    out["accuracy_plain_mean_score"] = round(sum(scores) / len(scores), 4)
    if old_affinity:
        os.sched_setaffinity(0, old_affinity)

    pool = accuracy.configure(workers=args.workers, timeout_s=args.timeout)
    start = time.perf_counter()
    accuracy.accuracy_reward([r1("w", "\\sqrt{8}")], answer=["2\\sqrt2"])
    out["pool_start_s"] = round(time.perf_counter() - start, 2)
    sym_c, sym_r = symbolic_pairs(args.n_symbolic, rng)
    details: list = []
    out["accuracy_symbolic_per_s"] = round(rate(
        lambda: details.extend(accuracy.accuracy_details(sym_c, answer=sym_r)), len(sym_c)), 1)
    out["accuracy_symbolic_mean_score"] = round(sum(s for s, _ in details) / len(details), 4)
    out["accuracy_symbolic_timeouts"] = sum(r == "timeout" for _, r in details)

    normal_c, normal_r = symbolic_pairs(40, random.Random(args.seed + 1))
    start = time.perf_counter()
    accuracy.accuracy_reward(normal_c, answer=normal_r)
    normal_s = time.perf_counter() - start
    hostile_c = [r1("w", f"{SLOW_ANSWER}+{i}-{i}") for i in range(args.hostile)]
    batch_c = hostile_c + normal_c
    batch_r = [SLOW_REFERENCE] * args.hostile + normal_r
    restarts = pool.restarts
    start = time.perf_counter()
    batch = accuracy.accuracy_details(batch_c, answer=batch_r)
    hostile_s = time.perf_counter() - start
    bound = args.timeout * args.hostile / args.workers + normal_s
    out["hostile"] = {
        "items": len(batch_c), "hostile_items": args.hostile, "timeout_s": args.timeout,
        "workers": args.workers, "seconds": round(hostile_s, 2), "normal_seconds": round(normal_s, 2),
        "bound_seconds": round(bound, 2), "within_bound": hostile_s <= bound,
        "over_bound_seconds": round(max(0.0, hostile_s - bound), 3),
        "timeouts": sum(r == "timeout" for _, r in batch), "workers_replaced": pool.restarts - restarts,
    }
    out["extraction_scaling"] = extraction_scaling()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
