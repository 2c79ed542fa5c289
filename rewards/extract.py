"""Find the final answer in a completion and normalize answer text.

Runs in the calling process on untrusted text of any length, so every step here is a linear scan
(no backtracking regex over the whole completion, no quadratic rescans of unclosed groups).

Extraction policy (issue 4; departures from Math-Verify noted):
- The answer region is the body of the *last* ``<answer>...</answer>``. Without answer tags it is
  the text after ``</think>``, or the whole completion when there are no think tags either. An
  unclosed ``<answer>`` or ``<think>`` (a truncated completion) has no answer.
- Inside the region, ``\\boxed{...}`` (nested braces, escaped ``\\{`` ignored) wins. Several boxes
  with the same content count once; several *different* boxes are returned as they are and the
  comparison treats them as one answer list (only a list reference can match them). Math-Verify
  takes the last box instead; that lets a model hedge by boxing several values.
- Without a box, a short math-looking region is the answer as it stands. Prose ("The answer is
  42.") is searched, in order: the text after the last "answer is" / "answer:" / "réponse" /
  "答案" keyword, else whichever comes last of the last math span (``$...$``, ``\\(...\\)``,
  ``\\[...\\]``) and the last number.
"""
from __future__ import annotations

import re

MAX_ANSWER_CHARS = 2000  # an extracted answer longer than this is not compared ("too long")

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"\\[\\{}]|[{}]")


def answer_region(completion: str) -> str | None:
    """The text that holds the final answer, or None when the completion has none (truncated)."""
    close = completion.rfind("</answer>")
    if close != -1:
        start = completion.rfind("<answer>", 0, close)
        return None if start == -1 else completion[start + len("<answer>"):close]
    if "<answer>" in completion:
        return None
    think_end = completion.rfind("</think>")
    if think_end != -1:
        return completion[think_end + len("</think>"):]
    if "<think>" in completion:
        return None
    return completion


def _brace_pairs(text: str, start: int) -> dict[int, int]:
    """Map each '{' at or after ``start`` to its matching '}' (escaped braces skipped); O(n)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text, start):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def boxed_contents(text: str) -> list[str]:
    """Contents of the outermost ``\\boxed{...}`` / ``\\fbox{...}`` groups, in order.

    An unclosed box is skipped; a box inside another box belongs to the outer one.
    """
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    first = _BOX_OPEN.search(text)
    if first is None:
        return []
    pairs = _brace_pairs(text, first.end() - 1)
    out: list[str] = []
    taken_until = -1
    for m in _BOX_OPEN.finditer(text, first.start()):
        brace = m.end() - 1
        if brace <= taken_until:
            continue
        close = pairs.get(brace)
        if close is None:
            continue
        out.append(text[brace + 1:close])
        taken_until = close
    return out


# ----------------------------------------------------------------------------- normalization

_CONTROL_ESCAPES = {"\x07": "\\a", "\x08": "\\b", "\x0b": "\\v", "\x0c": "\\f", "\t": "\\t"}
_CONTROL = re.compile(r"[\x07\x08\x0b\x0c\t](?=[a-z])")
# Starts only at the beginning of a run (the lookbehind): a long run not followed by a letter is
# then scanned once, not once per starting position (which was quadratic).
_BACKSLASH_RUN = re.compile(r"(?<!\\)\\{2,}(?=[A-Za-z])")
_UNICODE = str.maketrans({
    "\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ", "\u00b7": "\\cdot ",
    "\u00f7": "\\div ", "\u2264": "\\le ", "\u2265": "\\ge ", "\u2260": "\\ne ", "\u03c0": "\\pi ",
    "\u221e": "\\infty ", "\u221a": "\\sqrt", "\u222a": "\\cup ", "\u2208": "\\in ",
    "\uff0c": ",", "\uff1a": ":", "\uff08": "(", "\uff09": ")", "\u3002": ".", "\u00a0": " ",
    "\u2009": " ", "\u202f": " ", "\u200b": "", "\u200c": "", "\u200d": "", "\u2060": "",
    "\ufeff": "", "\u2248": "\\approx ",
})
_REPEATED_COMMA = re.compile(r",(?:\s*,)+")
_DROP = re.compile(
    r",\\!\s*(?=\d)"  # 11,\! 111: LaTeX thousands
    r"|\\(?:displaystyle|textstyle|left|right|[Bb]igg?[lr]?)(?![A-Za-z])\.?|\\!|\\limits"
)
_SPACES = re.compile(r"(?<!\\)\\(?:q?quad|(?:[;:,]|space|enspace)(?![A-Za-z]))|~|(?<!\\)\\ ")
_FRAC_ALIASES = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_CONNECTOR = re.compile(
    r"\\text\{\s*(?:and|or|und|et|y|и|或|和)\s*\}|(?<![A-Za-z\\])(?:and|or)(?![A-Za-z])|;"
)
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree(?![A-Za-z])|\u00b0")
_THIN_DIGITS = re.compile(r"(?<=\d)\{,\}(?=\d)")
_MULTISPACE = re.compile(r"\s+")


def _strip_delimiters(s: str) -> str:
    """Remove math delimiters that wrap the whole string: $$..$$, $..$, \\(..\\), \\[..\\]."""
    for _ in range(4):
        t = s.strip()
        if len(t) >= 4 and t.startswith("$$") and t.endswith("$$"):
            t = t[2:-2]
        elif len(t) >= 2 and t.startswith("$") and t.endswith("$") and t.count("$") == 2:
            t = t[1:-1]
        elif len(t) >= 4 and ((t.startswith("\\(") and t.endswith("\\)"))
                              or (t.startswith("\\[") and t.endswith("\\]"))):
            t = t[2:-2]
        if t == s:
            return t
        s = t
    return s.strip()


def fix_escapes(s: str) -> str:
    """Undo damage from non-raw strings (``\\f``rac -> form feed) and doubled backslashes."""
    if not s.isascii() or "\t" in s or "\x0c" in s or "\x08" in s:
        s = _CONTROL.sub(lambda m: _CONTROL_ESCAPES[m.group()], s)
    if "\\\\" in s:
        s = _BACKSLASH_RUN.sub(_halve_run, s)
    return s


def _halve_run(m: re.Match) -> str:
    """``\\\\frac`` (a doubly escaped command) -> ``\\frac``; an odd run (``\\\\\\end``: a row
    break then a command) is already right."""
    run = m.group()
    return run[: len(run) // 2] if len(run) % 2 == 0 else run


def normalize_answer(s: str) -> str:
    """Canonical spelling of an extracted answer: delimiters, spacing and aliases removed.

    The result is what both the fast path and the symbolic parser read; it keeps every symbol that
    carries meaning (``\\%``, ``\\pm``, braces) and drops only presentation.
    """
    s = fix_escapes(s)
    if not s.isascii():
        s = s.translate(_UNICODE)
    s = _strip_delimiters(s)
    if "\\" in s:
        s = _DROP.sub("", s)
        s = _FRAC_ALIASES.sub(r"\\frac", s)
        s = s.replace("\\$", "").replace("\\%", "%")
        s = _DEGREE.sub("°", s)
        s = _SPACES.sub(" ", s)
    elif "°" in s:
        s = _DEGREE.sub("°", s)
    s = s.replace("$", "")
    if "{,}" in s:
        s = _THIN_DIGITS.sub(",", s)
    s = _CONNECTOR.sub(",", s)
    if ",," in s or ", ," in s:
        s = _REPEATED_COMMA.sub(",", s)
    s = _MULTISPACE.sub(" ", s).strip()
    while s and s[-1] in ".,":
        s = s[:-1].rstrip()
    while s and s[0] == ",":
        s = s[1:].lstrip()
    return s


_TEXT_WRAP = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")


def canonical(s: str) -> str:
    """Normalized answer without whitespace or text wrappers: equal strings mean equal answers."""
    if "\\" in s:
        s = _TEXT_WRAP.sub(r"\1", s)
    return "".join(s.split())


# ----------------------------------------------------------------------------- prose

_KEYWORD = re.compile(
    r"(?:final\s+answer|answer|r[ée]ponse|respuesta|antwort|resposta)"
    r"(?:\s+(?:is|est|es|ist|would\s+be|should\s+be|will\s+be|=))?\s*[:：]?"
    r"|答案\s*(?:是|为|：|:)?|答\s*[:：]",
    re.I,
)
_MATH_OPEN = re.compile(r"\$\$|\$|\\\(|\\\[")
_MATH_CLOSE = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}
_NUMBER_IN_PROSE = re.compile(
    r"(?<![A-Za-z])[-+]?\d+(?:[.,]\d+)*(?:\s*/\s*\d+)?\s*%?|\\frac\s*\{[^{}]*\}\s*\{[^{}]*\}")
_PROSE_WORD = re.compile(r"[A-Za-z]{3,}")
_LATEX_CMD_OR_TEXT = re.compile(
    r"\\(?:text|mbox|textbf|mathrm|operatorname|begin|end)\s*\{[^{}]*\}|\\[A-Za-z]+")
_CONNECTORS_ONLY = re.compile(r"[\s,;.]*(?:(?:and|or|et|y|\\text\{\s*(?:and|or)\s*\})[\s,;.]*)*")
# letters of Cyrillic onward and CJK mark prose (Greek does not: its letters are variables)
_OTHER_SCRIPT = re.compile(r"[\u0400-\u1fff\u2e80-\U0010ffff]")
_MATH_WORDS = frozenset({"sin", "cos", "tan", "sec", "csc", "cot", "log", "exp", "sqrt", "frac",
                         "and", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "infty"})


def math_spans(text: str) -> list[tuple[int, int, int, int]]:
    """(open_start, body_start, body_end, close_end) of each closed math span, in order; O(n)."""
    out: list[tuple[int, int, int, int]] = []
    pos = 0
    while True:
        m = _MATH_OPEN.search(text, pos)
        if m is None:
            return out
        if m.group() == "$" and m.start() > 0 and text[m.start() - 1] == "\\":
            pos = m.end()
            continue
        closer = _MATH_CLOSE[m.group()]
        end = text.find(closer, m.end())
        while closer == "$" and end > 0 and text[end - 1] == "\\":
            end = text.find(closer, end + 1)
        if end == -1:
            return out
        out.append((m.start(), m.end(), end, end + len(closer)))
        pos = end + len(closer)


def is_prose(text: str) -> bool:
    """True when ``text`` reads as sentences rather than a bare answer (judged on its start)."""
    text = text[:MAX_ANSWER_CHARS]
    if not text.isascii() and _OTHER_SCRIPT.search(text):
        return True
    bare = _LATEX_CMD_OR_TEXT.sub(" ", text)
    for spans in reversed(math_spans(bare)):
        bare = bare[:spans[0]] + " " + bare[spans[3]:]
    return any(w.lower() not in _MATH_WORDS for w in _PROSE_WORD.findall(bare))


_SENTENCE_END = re.compile(r"[.。!?\n](?:\s|$)")


def _after_keyword(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" keyword, up to the end of its sentence."""
    last = None
    for last in _KEYWORD.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end():]
    spans = math_spans(tail)
    if spans and not tail[:spans[0][0]].strip(" *\n\t:"):
        return tail[spans[0][1]:spans[0][2]]
    head = tail.lstrip(" *\n\t:")
    end = _SENTENCE_END.search(head)
    sentence = (head[:end.start()] if end else head).strip(" *")
    if not sentence:
        return None
    if not is_prose(sentence):
        return sentence
    m = _NUMBER_IN_PROSE.search(sentence)
    return m.group() if m is not None else sentence


def _answer_in_prose(text: str) -> str:
    """The answer named in prose: after a keyword, else the last math span, else the last number."""
    found = _after_keyword(text)
    if found is not None:
        return found
    spans = math_spans(text)
    number = None
    for number in _NUMBER_IN_PROSE.finditer(text):
        pass
    if spans and (number is None or number.start() < spans[-1][3]):
        body = text[spans[-1][1]:spans[-1][2]]
        if not is_prose(body):
            return body
        numbers = _NUMBER_IN_PROSE.findall(body)
        return numbers[-1] if numbers else body
    return number.group() if number is not None else text


def final_answer_candidates(region: str) -> list[str]:
    """Distinct answer strings in an answer region (normalized); several only for several boxes."""
    boxes = boxed_contents(region)
    if boxes:
        seen: dict[str, str] = {}
        for b in boxes:
            n = normalize_answer(b)
            seen.setdefault(canonical(n), n)
        return list(seen.values())
    text = region.strip()
    if not text:
        return []
    if not is_prose(text):  # a long bare answer stays whole, and is then rejected as too long
        spans = math_spans(text)
        if len(spans) > 1 and _joined_by_connectors(text, spans):
            return [normalize_answer(", ".join(text[s[1]:s[2]] for s in spans))]
        return [normalize_answer(text)]
    return [normalize_answer(_answer_in_prose(text))]


def _joined_by_connectors(text: str, spans: list[tuple[int, int, int, int]]) -> bool:
    gaps = [text[:spans[0][0]], text[spans[-1][3]:]]
    gaps += [text[a[3]:b[0]] for a, b in zip(spans, spans[1:])]
    return all(_CONNECTORS_ONLY.fullmatch(g) for g in gaps)


def reference_answer(reference: str) -> str:
    """The answer in a reference field (a bare answer or a worked solution with a box)."""
    cands = final_answer_candidates(reference)
    return ", ".join(cands)


# ----------------------------------------------------------------------------- multiple choice

_CHOICE = re.compile(r"\(?([A-E])\)?(?:(?:[.:)。，,]|\s)\s*(?:[^\W\d_][^=+*/^<>]*)?)?", re.S)
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z\\])[A-E](?![A-Za-z])")


def choice_letter(reference: str) -> str | None:
    """The option letter when the reference is a multiple-choice answer ("C", "(C) Cecile")."""
    text = canonical_choice_text(reference)
    m = _CHOICE.fullmatch(text)
    return m.group(1) if m else None


def canonical_choice_text(text: str) -> str:
    text = normalize_answer(text)
    if "\\" in text:
        text = _TEXT_WRAP.sub(r"\1", text)
    return text.strip()


def predicted_choice(region: str) -> str | None:
    """The option letter a completion picks: its box, else after an answer keyword, else its
    leading letter, else its last standalone letter."""
    boxes = boxed_contents(region)
    if boxes:
        m = _CHOICE.fullmatch(canonical_choice_text(boxes[-1]))
        return m.group(1) if m else None
    text = region.strip()
    last = None
    for last in _KEYWORD.finditer(text):
        pass
    if last is not None:
        m = _STANDALONE_LETTER.search(text, last.end())
        if m:
            return m.group()
    m = _CHOICE.fullmatch(canonical_choice_text(text))
    if m:
        return m.group(1)
    m = _STANDALONE_LETTER.match(text)
    if m:
        return m.group()
    letters = _STANDALONE_LETTER.findall(text)
    return letters[-1] if letters else None
