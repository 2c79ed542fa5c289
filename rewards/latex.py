"""A tokenizer and recursive-descent parser for answers: numbers and simple LaTeX -> sympy objects.

Model output is untrusted, so the text is never handed to ``eval``, sympy's string conversion or
its ``parse_expr``: this parser reads a whitelisted token stream and builds ``sympy.Integer``,
``Rational``, ``Symbol``, ``Add``, ``Mul``, ``Pow`` and a few named functions itself. Symbols get
only letter names (with a subscript), so no name can reach anything but a ``Symbol``.

Limits (each raises :class:`ParseError`, which the accuracy reward scores 0 with the reason):
length (``MAX_CHARS``), nesting depth (``MAX_DEPTH``), literal digits, integer exponents
(``MAX_EXPONENT``) and the size of an exact power (``MAX_BITS``), factorial and binomial
arguments, list length. Everything that is still slow within those limits (``simplify`` on a
large expression) is bounded by the worker pool's wall-clock timeout, not here.

Grammar (lowest precedence first)::

    list     := item (',' item)*                    bare comma list -> Seq(open='')
    item     := union (relop union)*                = < > \\le \\ge \\ne \\approx \\in -> Relation
    union    := sum ('\\cup' sum)*
    sum      := term (('+' | '-' | '\\pm') term)*
    term     := unary (('*' | '/' | ':' | '\\cdot' | '\\times' | '\\div' | <implicit>) power)*
    unary    := ('-' | '+' | '\\pm') unary | power
    power    := postfix ('^' exponent)?             right-associative: a^b^c = a^(b^c)
    postfix  := primary ('!' | '%' | '°')*
    primary  := number | letters | '(' list ')' | '[' list ']' | '\\{' list '\\}' | '{' list '}'
              | '|' sum '|' | \\frac arg arg | \\sqrt ['[' sum ']'] arg | \\binom arg arg
              | function arg | \\begin{env} rows \\end{env} | \\text{...} | \\pi | \\infty | greek

Reading conventions (policies): juxtaposition multiplies (``2x``, ``(x-2)(x+2)``, ``2^6 3^5``) but
two bare numbers in a row are an error; ``\\frac12`` takes one character per argument; ``x^23``
reads the whole number as the exponent (plain-text habit); ``i`` is the imaginary unit and ``e``
Euler's number; ``4210_7`` (a numeral with a base) is an opaque symbol, so it equals ``4210_{7}``
but not its decimal value; ``a:b`` is a ratio; ``\\text{...}`` after a quantity is a unit and is
dropped, alone it is a text answer; degrees (``°``) are kept as numbers, converted to radians only
inside function arguments (``\\sin(90°-x)``); ``(a, b)`` is kept with its delimiters so the
comparison can read it as a tuple or an interval.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

import sympy
from sympy import Abs, E, I, ImmutableMatrix, Integer, Rational, Symbol, oo, pi

MAX_CHARS = 2000
MAX_DEPTH = 60
MAX_LITERAL_DIGITS = 400
MAX_EXPONENT = 10_000
MAX_BITS = 20_000
MAX_FACTORIAL = 1000
MAX_ITEMS = 64

PERCENT = Symbol("%percent")  # a name no input can spell: input symbols are letters only
PLUS_MINUS = Symbol("%pm")


class ParseError(ValueError):
    """The text is not an answer this parser reads; ``reason`` is short and loggable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Seq:
    """A comma list with its delimiters: open '' (bare list), '(' / '[' (tuple or interval), '{'."""

    items: tuple
    open: str
    close: str


@dataclass(frozen=True)
class Relation:
    """A chain ``sides[0] ops[0] sides[1] ...``; ops are '=', '~', '<', '<=', '>', '>=', '!=', 'in'."""

    ops: tuple[str, ...]
    sides: tuple


@dataclass(frozen=True)
class UnionOf:
    parts: tuple


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Approx:
    """A decimal literal that may stand for a value without a finite decimal expansion.

    tol is one unit of the last written digit (scaled by any ``\\times 10^k``); sig the number of
    significant digits written.
    """

    expr: sympy.Expr
    tol: sympy.Rational
    sig: int


Node = Union[sympy.Basic, Seq, Relation, UnionOf, Text, Approx]

# ----------------------------------------------------------------------------- tokenizer

_TOKEN = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<num>\d+(?:\.\d+)?|\.\d+)"
    r"|(?P<cmd>\\(?:[A-Za-z]+|.))"
    r"|(?P<word>[A-Za-z]+)"
    r"|(?P<op><=|>=|!=|==|\*\*|[-+*/^_=<>()\[\]{}|,:!%&'°])",
    re.S,
)
_TEXT_CMDS = frozenset({"text", "textbf", "textit", "textrm", "textnormal", "textsf", "texttt",
                        "mbox", "textup", "emph"})
_UNITS = frozenset({"cm", "mm", "km", "kg", "mg", "ml", "ft", "yd", "mi", "lb", "lbs", "oz",
                    "min", "mins", "hr", "hrs", "sec", "mph", "kph", "cm2", "m2"})

Token = tuple[str, str]


def _read_braced(text: str, pos: int) -> tuple[str, int]:
    """Raw content of the brace group opening at text[pos] == '{'; returns (content, end)."""
    depth = 0
    i = pos
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1:i], i + 1
        i += 1
    raise ParseError("unclosed brace")


def tokenize(text: str) -> list[Token]:
    """Split normalized answer text into (kind, text) tokens; unknown characters are an error."""
    toks: list[Token] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r}")
        kind = m.lastgroup
        tok = m.group()
        pos = m.end()
        if kind == "ws":
            continue
        if kind == "cmd" and tok[1:] in _TEXT_CMDS:
            while pos < n and text[pos] == " ":
                pos += 1
            if pos < n and text[pos] == "{":
                content, pos = _read_braced(text, pos)
                toks.append(("text", " ".join(content.replace("\\", " ").split())))
                continue
        if kind == "op" and tok == "**":
            tok = "^"
        if kind == "op" and tok == "==":
            tok = "="
        toks.append((kind, tok))
    return toks


# ----------------------------------------------------------------------------- parser

_RELOPS_OP = {"=": "=", "<": "<", ">": ">", "<=": "<=", ">=": ">=", "!=": "!="}
_RELOPS_CMD = {
    "le": "<=", "leq": "<=", "leqslant": "<=", "ge": ">=", "geq": ">=", "geqslant": ">=",
    "lt": "<", "gt": ">", "ne": "!=", "neq": "!=", "approx": "~", "simeq": "~", "in": "in",
    "equiv": "=",
}
_FUNCS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "sec": sympy.sec, "csc": sympy.csc,
    "cot": sympy.cot, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
    "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "ln": sympy.log,
    "log": sympy.log, "exp": sympy.exp, "lg": lambda x: sympy.log(x, 10),
}
_INVERSE = {"sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan}
_GREEK = frozenset({
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta",
    "vartheta", "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon",
    "phi", "varphi", "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma",
    "Upsilon", "Phi", "Psi", "Omega",
})
_WRAPPERS = frozenset({"boxed", "mathrm", "mathbf", "mathit", "mathsf", "boldsymbol", "bm",
                       "overline", "bar", "hat", "vec", "widehat", "tilde", "mathbb", "mathcal",
                       "operatorname", "fbox"})
_MATRIX_ENVS = frozenset({"pmatrix", "bmatrix", "Bmatrix", "matrix", "smallmatrix", "array"})
_IMPLICIT_CMDS = frozenset({"frac", "sqrt", "pi", "infty", "binom", "lfloor", "lceil", "begin",
                            "exp"}) | _GREEK | _WRAPPERS | set(_FUNCS)


def _bits(q: sympy.Rational) -> int:
    return max(int(q.p).bit_length(), int(q.q).bit_length(), 1)


class _Parser:
    def __init__(self, toks: list[Token]):
        self.toks = toks
        self.i = 0
        self.depth = 0
        self.fn_depth = 0
        self.last_was_number = False

    # -- token helpers
    def peek(self) -> Token | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self) -> Token:
        if self.i >= len(self.toks):
            raise ParseError("unexpected end")
        t = self.toks[self.i]
        self.i += 1
        return t

    def at(self, kind: str, text: str | None = None) -> bool:
        t = self.peek()
        return t is not None and t[0] == kind and (text is None or t[1] == text)

    def accept(self, kind: str, text: str) -> bool:
        if self.at(kind, text):
            self.i += 1
            return True
        return False

    def expect(self, kind: str, text: str) -> None:
        if not self.accept(kind, text):
            got = self.peek()
            raise ParseError(f"expected {text!r}, got {got[1] if got else 'end'!r}")

    def split_first_char(self) -> Token:
        """Take one character of the next number/word token (``\\frac12``, ``x_ab``)."""
        kind, text = self.next()
        if len(text) > 1 and kind in ("num", "word"):
            self.i -= 1
            self.toks[self.i] = (kind, text[1:])
            return kind, text[0]
        return kind, text

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nested too deep")

    def leave(self) -> None:
        self.depth -= 1

    # -- structure
    def parse_items(self) -> list[Node]:
        items = [self.parse_item()]
        while self.accept("op", ","):
            if len(items) >= MAX_ITEMS:
                raise ParseError("too many items")
            items.append(self.parse_item())
        return items

    def relop(self) -> str | None:
        t = self.peek()
        if t is None:
            return None
        if t[0] == "op":
            return _RELOPS_OP.get(t[1])
        if t[0] == "cmd":
            return _RELOPS_CMD.get(t[1][1:])
        return None

    def parse_item(self) -> Node:
        start = self.i
        sides = [self.approx(self.parse_union(), start)]
        ops: list[str] = []
        while (op := self.relop()) is not None:
            self.i += 1
            start = self.i
            sides.append(self.approx(self.parse_union(), start))
            ops.append(op)
        return Relation(tuple(ops), tuple(sides)) if ops else sides[0]

    def parse_union(self) -> Node:
        first = self.parse_sum()
        if not self.at("cmd", "\\cup"):
            return first
        parts = [first]
        while self.accept("cmd", "\\cup"):
            parts.append(self.parse_sum())
        return UnionOf(tuple(parts))

    def approx(self, node: Node, start: int) -> Node:
        """Wrap a lone decimal literal (``-0.3333``, ``2.31 \\times 10^{-3}``, ``33.3%``)."""
        if not isinstance(node, sympy.Expr):
            return node
        toks = self.toks[start:self.i]
        j = 0
        if j < len(toks) and toks[j] in (("op", "-"), ("op", "+")):
            j += 1
        if j >= len(toks) or toks[j][0] != "num" or "." not in toks[j][1]:
            return node
        intpart, frac = toks[j][1].split(".")
        j += 1
        scale = 0
        rest = toks[j:]
        if rest and rest[-1] == ("op", "%"):
            rest = rest[:-1]
        if rest:
            ok = len(rest) >= 3 and rest[0] in (("cmd", "\\times"), ("cmd", "\\cdot"), ("op", "*"))
            ok = ok and rest[1] == ("num", "10") and rest[2] == ("op", "^")
            exp_toks = [t for t in rest[3:] if t not in (("op", "{"), ("op", "}"))]
            sign = 1
            if exp_toks and exp_toks[0] in (("op", "-"), ("op", "+")):
                sign = -1 if exp_toks[0][1] == "-" else 1
                exp_toks = exp_toks[1:]
            if not ok or len(exp_toks) != 1 or exp_toks[0][0] != "num" or not exp_toks[0][1].isdigit():
                return node
            scale = sign * int(exp_toks[0][1])
        tol = Rational(1, 10 ** len(frac)) * Rational(10) ** scale
        sig = len((intpart + frac).lstrip("0"))
        return Approx(node, tol, sig)

    # -- arithmetic on nodes
    @staticmethod
    def expr_of(node: Node) -> sympy.Basic:
        if isinstance(node, Approx):
            return node.expr
        if isinstance(node, sympy.Basic):
            return node
        raise ParseError(f"{type(node).__name__.lower()} used in arithmetic")

    def add(self, a: Node, b: Node) -> sympy.Basic:
        try:
            return self.expr_of(a) + self.expr_of(b)
        except (TypeError, sympy.ShapeError) as exc:
            raise ParseError("incompatible operands") from exc

    def mul(self, a: Node, b: Node) -> sympy.Basic:
        try:
            return self.expr_of(a) * self.expr_of(b)
        except (TypeError, sympy.ShapeError) as exc:
            raise ParseError("incompatible operands") from exc

    def div(self, a: Node, b: Node) -> sympy.Basic:
        den = self.expr_of(b)
        if not isinstance(den, sympy.Expr):
            raise ParseError("division by a matrix")
        return self.mul(a, sympy.Pow(den, -1))

    def power(self, base: Node, exp: Node) -> sympy.Basic:
        b, e = self.expr_of(base), self.expr_of(exp)
        if not isinstance(e, sympy.Expr):
            raise ParseError("matrix exponent")
        if e.is_Rational:
            if abs(e.p) > MAX_EXPONENT or e.q > MAX_EXPONENT:
                raise ParseError("exponent too large")
            if isinstance(b, sympy.Expr) and b.is_Rational and b != 0:
                if abs(e.p) * _bits(b) > MAX_BITS * e.q:
                    raise ParseError("number too large")
        elif isinstance(e, sympy.Expr) and e.is_number and e.is_finite:
            # irrational numeric exponents (2^{\sqrt 2}) stay symbolic; bound their size anyway
            try:
                big = abs(complex(e.evalf(15))) > MAX_EXPONENT
            except (TypeError, ValueError, OverflowError):
                big = True
            if big:
                raise ParseError("exponent too large")
        try:
            return b ** e
        except (TypeError, ValueError, sympy.ShapeError, sympy.NonSquareMatrixError) as exc:
            raise ParseError("invalid power") from exc

    # -- expressions
    def parse_sum(self) -> Node:
        self.enter()
        left = self.parse_term()
        while True:
            t = self.peek()
            if t == ("op", "+"):
                self.i += 1
                left = self.add(left, self.parse_term())
            elif t == ("op", "-"):
                self.i += 1
                left = self.add(left, self.mul(Integer(-1), self.parse_term()))
            elif t in (("cmd", "\\pm"), ("cmd", "\\mp")):
                self.i += 1
                sign = PLUS_MINUS if t[1] == "\\pm" else -PLUS_MINUS
                left = self.add(left, self.mul(sign, self.parse_term()))
            else:
                break
        self.leave()
        return left

    def starts_implicit(self, t: Token | None) -> bool:
        if t is None:
            return False
        kind, text = t
        if kind == "num":
            return not self.last_was_number
        if kind == "word":
            return True
        if kind == "op":
            return text == "("
        if kind == "cmd":
            return text[1:] in _IMPLICIT_CMDS
        return False

    def parse_term(self) -> Node:
        left = self.parse_unary()
        while True:
            t = self.peek()
            if t in (("op", "*"), ("cmd", "\\cdot"), ("cmd", "\\times"), ("cmd", "\\ast")):
                self.i += 1
                left = self.mul(left, self.parse_unary())
            elif t in (("op", "/"), ("cmd", "\\div"), ("op", ":")):
                self.i += 1
                left = self.div(left, self.parse_unary())
            elif t is not None and (t[0] == "text" or (t[0] == "word" and t[1] in _UNITS)):
                self.i += 1  # a unit after a quantity: "10 \text{ cm}^2"
                if self.accept("op", "^"):
                    self.parse_exponent()
            elif self.starts_implicit(t):
                left = self.mul(left, self.parse_power())
            else:
                break
        return left

    def parse_unary(self) -> Node:
        t = self.peek()
        if t == ("op", "-"):
            self.i += 1
            return self.mul(Integer(-1), self.parse_unary())
        if t == ("op", "+"):
            self.i += 1
            return self.parse_unary()
        if t in (("cmd", "\\pm"), ("cmd", "\\mp")):
            self.i += 1
            return self.mul(PLUS_MINUS, self.parse_unary())
        return self.parse_power()

    def parse_power(self) -> Node:
        base = self.parse_postfix()
        if self.accept("op", "^"):
            base = self.power(base, self.parse_exponent())
            self.last_was_number = False
            base = self.parse_postfix_ops(base)
        return base

    def parse_exponent(self) -> Node:
        self.enter()
        t = self.peek()
        if t == ("op", "{"):
            atom = self.parse_group()
        elif t in (("op", "-"), ("op", "+")):
            self.i += 1
            atom = self.parse_exponent()
            if t[1] == "-":
                atom = self.mul(Integer(-1), atom)
        elif t is not None and t[0] == "num":
            atom = self.number(self.next()[1])
        elif t is not None and t[0] == "word":
            atom = self.letter(self.split_first_char()[1])
        else:
            atom = self.parse_primary()
        if self.accept("op", "^"):
            atom = self.power(atom, self.parse_exponent())
        self.leave()
        return atom

    def parse_postfix(self) -> Node:
        return self.parse_postfix_ops(self.parse_primary())

    def parse_postfix_ops(self, base: Node) -> Node:
        while True:
            if self.accept("op", "!"):
                base = self.factorial(base)
            elif self.accept("op", "%"):
                base = self.mul(base, PERCENT)
            elif self.accept("op", "°"):
                if self.fn_depth:
                    base = self.mul(base, pi / 180)
            else:
                return base
            self.last_was_number = False

    def factorial(self, node: Node) -> sympy.Basic:
        x = self.expr_of(node)
        if isinstance(x, sympy.Expr) and x.is_Integer and (x > MAX_FACTORIAL or x < 0):
            raise ParseError("factorial too large")
        if isinstance(x, sympy.Expr) and x.is_number and not x.is_Integer:
            raise ParseError("factorial of a non-integer")
        return sympy.factorial(x)

    def number(self, text: str) -> sympy.Rational:
        digits = text.replace(".", "")
        if len(digits) > MAX_LITERAL_DIGITS:
            raise ParseError("number too long")
        if "." in text:
            whole, frac = text.split(".")
            return Rational(int(whole or "0") * 10 ** len(frac) + int(frac), 10 ** len(frac))
        return Integer(int(text))

    @staticmethod
    def letter(c: str) -> sympy.Expr:
        if c == "i":
            return I
        if c == "e":
            return E
        return Symbol(c)

    def subscript(self) -> str:
        """Raw text of a subscript (``x_1``, ``a_{n+1}``): part of a symbol's name."""
        if self.at("op", "{"):
            self.i += 1
            parts: list[str] = []
            depth = 1
            while True:
                kind, text = self.next()
                if text == "{" and kind == "op":
                    depth += 1
                elif text == "}" and kind == "op":
                    depth -= 1
                    if depth == 0:
                        break
                parts.append(text)
            if not parts or len(parts) > 20:
                raise ParseError("bad subscript")
            return "".join(parts)
        kind, text = self.split_first_char() if self.at("word") else self.next()
        if kind not in ("num", "word", "cmd"):
            raise ParseError("bad subscript")
        return text

    def parse_group(self) -> Node:
        """``{ ... }`` holding one item."""
        self.expect("op", "{")
        self.enter()
        items = self.parse_items()
        self.expect("op", "}")
        self.leave()
        if len(items) != 1:
            return Seq(tuple(items), "{", "}")
        return items[0]

    def parse_arg(self) -> Node:
        """A command argument: a brace group or a single character/command (``\\frac12``)."""
        t = self.peek()
        if t == ("op", "{"):
            node = self.parse_group()
            if isinstance(node, Seq):
                raise ParseError("list as an argument")
            return node
        if t is None:
            raise ParseError("missing argument")
        if t[0] == "num":
            return self.number(self.split_first_char()[1])
        if t[0] == "word":
            return self.letter(self.split_first_char()[1])
        if t[0] == "cmd":
            return self.parse_primary()
        raise ParseError("missing argument")

    def parse_primary(self) -> Node:
        self.enter()
        try:
            node = self._primary()
        finally:
            self.leave()
        # two bare numbers in a row ("2 3") are an error, not a product
        self.last_was_number = isinstance(node, sympy.Rational) and self.toks[self.i - 1][0] == "num"
        return node

    def _primary(self) -> Node:
        kind, text = self.next()
        if kind == "num":
            if self.accept("op", "_"):
                return Symbol(f"{text}_{self.subscript()}")  # a numeral in a base: 4210_7
            return self.number(text)
        if kind == "word":
            return self.word(text)
        if kind == "text":
            return Text(text)
        if kind == "op":
            return self.bracketed(text)
        return self.command(text[1:])

    def word(self, text: str) -> Node:
        low = text
        if low in _FUNCS:
            return self.function(low)
        if low == "sqrt":
            return self.command("sqrt")
        if low == "pi":
            return pi
        if low in ("inf", "infty", "infinity", "oo"):
            return oo
        factors = [self.letter(c) for c in text]
        if self.accept("op", "_"):
            factors[-1] = Symbol(f"{text[-1]}_{self.subscript()}")
        return sympy.Mul(*factors)

    def bracketed(self, text: str) -> Node:
        if text in ("(", "["):
            self.enter()
            items = self.parse_items()
            close = self.peek()
            if close not in (("op", ")"), ("op", "]")):
                raise ParseError("unclosed bracket")
            self.i += 1
            self.leave()
            if len(items) == 1 and (text, close[1]) in (("(", ")"), ("[", "]")):
                return items[0]
            return Seq(tuple(items), text, close[1])
        if text == "{":
            self.i -= 1
            return self.parse_group()
        if text == "|":
            inner = self.parse_sum()
            self.expect("op", "|")
            return Abs(self.expr_of(inner))
        raise ParseError(f"unexpected {text!r}")

    def command(self, name: str) -> Node:
        if name in ("{", "lbrace"):
            if self.at("cmd", "\\}") or self.at("cmd", "\\rbrace"):
                self.i += 1
                return Seq((), "{", "}")
            items = self.parse_items()
            if not (self.accept("cmd", "\\}") or self.accept("cmd", "\\rbrace")):
                raise ParseError("unclosed set")
            return Seq(tuple(items), "{", "}")
        if name in ("emptyset", "varnothing"):
            return Seq((), "{", "}")
        if name == "frac":
            num = self.parse_arg()
            return self.div(num, self.parse_arg())
        if name == "sqrt":
            if self.accept("op", "["):
                n = self.expr_of(self.parse_sum())
                self.expect("op", "]")
                return self.power(self.parse_arg(), sympy.Pow(n, -1))
            return self.power(self.parse_arg(), Rational(1, 2))
        if name == "binom":
            n, k = self.expr_of(self.parse_arg()), self.expr_of(self.parse_arg())
            if any(v.is_Integer and abs(v) > MAX_FACTORIAL * 10 for v in (n, k)):
                raise ParseError("binomial too large")
            return sympy.binomial(n, k)
        if name == "pi":
            return pi
        if name == "infty":
            return oo
        if name in _GREEK:
            return Symbol(name)
        if name in _FUNCS:
            return self.function(name)
        if name in ("lfloor", "lceil"):
            inner = self.expr_of(self.parse_sum())
            self.expect("cmd", "\\rfloor" if name == "lfloor" else "\\rceil")
            return sympy.floor(inner) if name == "lfloor" else sympy.ceiling(inner)
        if name in _WRAPPERS:
            if name == "operatorname" and self.at("op", "{"):
                raise ParseError("unsupported operator")
            return self.parse_arg()
        if name == "begin":
            return self.environment()
        raise ParseError(f"unsupported command \\{name}")

    def function(self, name: str) -> sympy.Basic:
        exponent = None
        if self.accept("op", "^"):
            exponent = self.expr_of(self.parse_exponent())
        base = None
        if name == "log" and self.accept("op", "_"):
            base = self.expr_of(self.parse_arg())
        self.fn_depth += 1
        try:
            t = self.peek()
            if t == ("op", "("):
                arg = self.expr_of(self.parse_primary())
            elif t == ("op", "{"):
                arg = self.expr_of(self.parse_arg())
            else:
                arg = self.expr_of(self.parse_power())
        finally:
            self.fn_depth -= 1
        if exponent == -1 and name in _INVERSE:
            return _INVERSE[name](arg)
        value = sympy.log(arg, base) if base is not None else _FUNCS[name](arg)
        return value if exponent is None else self.power(value, exponent)

    def env_name(self) -> str:
        self.expect("op", "{")
        parts = []
        while not self.accept("op", "}"):
            parts.append(self.next()[1])
            if len(parts) > 12:
                raise ParseError("bad environment")
        return "".join(parts)

    def environment(self) -> Node:
        name = self.env_name()
        if name == "array" and self.at("op", "{"):
            self.env_name()  # column spec
        rows: list[list[Node | None]] = []
        row: list[Node | None] = []
        while True:
            if self.at("op", "&") or self.at("cmd", "\\\\") or self.at("cmd", "\\end"):
                row.append(None)
            else:
                row.append(self.parse_item())
            if self.accept("op", "&"):
                continue
            if self.accept("cmd", "\\\\"):
                rows.append(row)
                row = []
                continue
            if self.accept("cmd", "\\end"):
                rows.append(row)
                if self.env_name() != name:
                    raise ParseError("mismatched environment")
                break
            raise ParseError("bad environment row")
        rows = [r for r in rows if any(c is not None for c in r)]
        if name == "cases":
            return Seq(tuple(c for r in rows for c in r if c is not None), "{", "}")
        if name not in _MATRIX_ENVS:
            raise ParseError(f"unsupported environment {name}")
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            raise ParseError("ragged matrix")
        try:
            return ImmutableMatrix([[self.expr_of(c) for c in r] for r in rows])
        except ParseError:
            raise
        except Exception as exc:  # a cell that is not a scalar
            raise ParseError("bad matrix cell") from exc


def parse(text: str) -> Node:
    """Parse normalized answer text into a sympy expression or a structure (:data:`Node`)."""
    if len(text) > MAX_CHARS:
        raise ParseError("too long")
    if not text.strip():
        raise ParseError("empty")
    toks = tokenize(text)
    p = _Parser(toks)
    try:
        items = p.parse_items()
    except RecursionError as exc:
        raise ParseError("nested too deep") from exc
    if p.peek() is not None:
        raise ParseError(f"unexpected {p.peek()[1]!r}")
    return items[0] if len(items) == 1 else Seq(tuple(items), "", "")


def is_finite_decimal(x: sympy.Expr) -> bool:
    """A rational whose decimal expansion terminates (denominator 2^a 5^b)."""
    if not x.is_Rational:
        return False
    d = int(x.q)
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


__all__ = ["parse", "tokenize", "ParseError", "Seq", "Relation", "UnionOf", "Text", "Approx",
           "PERCENT", "PLUS_MINUS", "Node", "is_finite_decimal"]
