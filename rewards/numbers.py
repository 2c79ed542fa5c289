"""Fast path: plain numbers compared exactly with ``fractions.Fraction``, no sympy.

Most answers in math RL are plain numbers (GSM8K-style integers, MATH fractions), so the accuracy
reward compares them here, in the calling process, and only sends the rest to the sympy workers.

What counts as a plain number (after :func:`rewards.extract.normalize_answer`): an optional sign,
an integer or decimal (``.5``, ``1000.0``), thousands separators (``7,425,000``, ``1 000``,
``11,\\!111``), an integer fraction (``3/4``, ``\\frac{3}{4}``, ``\\frac34``, ``-\\frac{a}{b}``), a
mixed number (``1 1/2``, ``2\\frac58``: read as 2 5/8, the elementary-school convention, not 2*5/8),
an optional percent sign (``%``, ``percent``, ``pct``), E-notation (``1e3``, ``2.5E-4``).

Policies (shared with the symbolic path, :mod:`rewards.equivalence`):
- Exact values compare exactly: ``0.5 == 1/2`` but ``1/2**99 != 1/2**98``; no float rounding.
- A decimal literal may stand for a value that has no finite decimal expansion (``0.3333`` for
  1/3, ``1.732`` for sqrt 3): it is accepted when it has at least 3 significant digits and is that
  value rounded or truncated to the digits written (``0.3334`` is neither). Against a value that
  does have a finite expansion (1/8 = 0.125) a decimal must be exact. A decimal of 15 or more
  significant digits is also accepted when it is the value's nearest double (a program's printout,
  ``1.4142135623730951`` for sqrt 2).
- Percent: a number written with ``%`` may mean p or p/100 (``10%`` matches ``10`` and ``0.1``);
  two percentages compare by their numbers.
- A decimal comma is ambiguous with a list (``6,8`` is two answers): ``1,22`` is read as 1.22 only
  when the other side is a single plain number, and never when three digits follow the comma
  (``1,000`` is a thousands separator) unless the integer part is 0 (``0,111``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_DIGITS = 400  # longer literals go to the symbolic path, which has its own limits

_NUMBER = re.compile(
    r"""(?P<sign>[-+]?)\s*
    (?:(?P<whole>\d+)\s+(?=\d+\s*/))?                                  # mixed number: 1 1/2
    (?:
        (?P<num>\d+)\s*/\s*(?P<den>\d+)                                # 3/4
      | \\frac\s*(?:\{\s*(?P<fn>[-+]?\d+)\s*\}|(?P<fn1>\d))\s*
                 (?:\{\s*(?P<fd>\d+)\s*\}|(?P<fd1>\d))                  # \frac{3}{4}, \frac34
      | (?P<int>\d+)?(?:\.(?P<dec>\d+))?(?P<dot>\.)?                    # 12, 1.5, .5, 12.
        (?:[eE](?P<exp>[-+]?\d{1,3}))?                                # 1e3, 2.5E-4
    )
    \s*(?P<pct>%|percent(?:age)?|pct)?""",
    re.X,
)
_MIXED_LATEX = re.compile(r"(?P<sign>[-+]?)(?P<whole>\d+)\s*(?=\\frac)")
_THOUSANDS_COMMA = re.compile(r"[-+]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?\s*%?")
_THOUSANDS_SPACE = re.compile(r"[-+]?[1-9]\d{0,2}(?: \d{3})+(?:\.\d+)?\s*%?")


@dataclass(frozen=True, slots=True)
class PlainNumber:
    """A parsed plain number.

    value: the exact value as written (a percent sign not applied).
    percent: written with a percent sign.
    tol: for a decimal literal, one unit of its last digit (0.3333 -> 1/10000); else None.
    sig: significant digits of a decimal literal (0 for others).
    """

    value: Fraction
    percent: bool = False
    tol: Fraction | None = None
    sig: int = 0


def parse_plain_number(text: str) -> PlainNumber | None:
    """Parse ``text`` (already normalized) as a plain number, or None if it is anything else."""
    s = text.strip()
    if not s or len(s) > MAX_DIGITS or not any(c.isdigit() for c in s):
        return None
    if "," in s:
        if not _THOUSANDS_COMMA.fullmatch(s):
            return None
        s = s.replace(",", "")
    elif " " in s and _THOUSANDS_SPACE.fullmatch(s):
        s = s.replace(" ", "")
    m = _MIXED_LATEX.match(s)
    whole_latex = None
    if m:
        whole_latex = m.group("whole")
        sign_latex = m.group("sign")
        s = s[m.end():]
    m = _NUMBER.fullmatch(s)
    if m is None:
        return None
    g = m.groupdict()
    pct = g["pct"] is not None
    neg = g["sign"] == "-"
    tol: Fraction | None = None
    sig = 0
    if g["num"] is not None:
        den = int(g["den"])
        if den == 0:
            return None
        value = Fraction(int(g["num"]), den)
    elif g["fn"] is not None or g["fn1"] is not None:
        den = int(g["fd"] or g["fd1"])
        if den == 0:
            return None
        value = Fraction(int(g["fn"] or g["fn1"]), den)
    else:
        if g["int"] is None and g["dec"] is None:
            return None
        if g["dot"] and g["int"] is None:
            return None
        if g["exp"] is not None and g["dot"]:
            return None  # "1.e3"
        digits = (g["int"] or "") + (g["dec"] or "")
        scale = Fraction(10) ** int(g["exp"] or 0)
        value = Fraction(int(digits)) / (10 ** len(g["dec"] or "")) * scale
        if g["dec"]:
            tol = Fraction(1, 10 ** len(g["dec"])) * scale
            sig = len(digits.lstrip("0"))
    whole = g["whole"] or whole_latex
    if whole is not None:
        if g["num"] is None and g["fn"] is None and g["fn1"] is None:
            return None
        if value >= 1 or value < 0:
            return None  # "1 3/2" is not a mixed number
        value += int(whole)
        if whole_latex is not None:
            neg = sign_latex == "-"
    if neg:
        value = -value
    return PlainNumber(value, pct, tol, sig)


def has_finite_decimal(value: Fraction) -> bool:
    """True when the rational ``value`` has a terminating decimal expansion (denominator 2^a 5^b)."""
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def rounds_or_truncates_to(approx, exact, tol) -> bool:
    """``approx`` is ``exact`` rounded (|error| <= tol/2) or truncated toward zero (within tol)."""
    if abs(exact - approx) * 2 <= tol:
        return True
    same_sign = (approx >= 0) == (exact >= 0)
    return same_sign and 0 <= abs(exact) - abs(approx) < tol


FLOAT_REPR_DIGITS = 15  # a decimal this precise may be a double's printout (repr) of the value


def is_float_repr(approx, exact, sig: int) -> bool:
    """A decimal of >= 15 significant digits that is the value rounded to the nearest double:
    what a program prints for it (``1.4142135623730951`` for sqrt 2), correct though its last
    digit is not the decimal rounding."""
    if sig < FLOAT_REPR_DIGITS:
        return False
    try:
        return float(approx) == float(exact)
    except (OverflowError, TypeError, ValueError):
        return False


def approximates(approx, tol, sig: int, exact) -> bool:
    """A decimal literal (one unit of its last digit ``tol``, ``sig`` significant digits) stands
    for ``exact``: rounded or truncated to the digits written, or a double's printout of it."""
    return tol is not None and sig >= 3 and (rounds_or_truncates_to(approx, exact, tol)
                                              or is_float_repr(approx, exact, sig))


def _close(approx: Fraction, tol: Fraction | None, sig: int, exact: Fraction) -> bool:
    return not has_finite_decimal(exact) and approximates(approx, tol, sig, exact)


def plain_numbers_equal(ref: PlainNumber, cand: PlainNumber) -> bool:
    """Equality under the module's policies (exact values, decimal approximations, percent)."""
    pairs = [(ref.value, ref.tol, cand.value, cand.tol)]
    if ref.percent != cand.percent:
        if ref.percent:
            pairs.append((ref.value / 100, ref.tol and ref.tol / 100, cand.value, cand.tol))
        else:
            pairs.append((ref.value, ref.tol, cand.value / 100, cand.tol and cand.tol / 100))
    for r, rtol, c, ctol in pairs:
        if r == c or _close(c, ctol, cand.sig, r) or _close(r, rtol, ref.sig, c):
            return True
    return False


_DECIMAL_COMMA = re.compile(r"([-+]?\d+),(\d+)")


def decimal_comma_equal(ref: str, ref_num: PlainNumber | None,
                        cand: str, cand_num: PlainNumber | None) -> bool:
    """``1,22`` against a plain 1.22 (either side): equal under the decimal-comma reading."""
    for text, other in ((cand, ref_num), (ref, cand_num)):
        if other is None:
            continue
        m = _DECIMAL_COMMA.fullmatch(text.strip())
        if m is None or (len(m.group(2)) == 3 and m.group(1).lstrip("+-") != "0"):
            continue
        read = parse_plain_number(f"{m.group(1)}.{m.group(2)}")
        if read is not None and plain_numbers_equal(other, read):
            return True
    return False
