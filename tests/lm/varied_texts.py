"""A few hundred varied strings for tokenizer parity tests: English, other scripts, code, digits,
whitespace runs, emoji, special tokens, and seeded random mixes of them."""
from __future__ import annotations

import random

ENGLISH = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "I'm sure they'll say it's fine, don't you?",
    "SHOUTING IN CAPS DON'T HELP", "Mr. O'Neil's dog's bone", "e.g. i.e. etc.", "What is 2+2?",
    "A conversation between User and Assistant.", "well-known, state-of-the-art re-implementation",
    "<think> reasoning </think> <answer> 42 </answer>", "Question: how many r's in strawberry?",
    "naïve café résumé coöperate", "Ünïcödé façade — em-dash – en-dash … ellipsis", "“smart quotes” and ‘single’",
]
OTHER_SCRIPTS = [
    "中文测试，你好世界！", "我爱自然语言处理。", "日本語のテキストです。", "한국어 텍스트", "Привет, мир!",
    "مرحبا بالعالم", "नमस्ते दुनिया", "Γειά σου Κόσμε", "שלום עולם", "ไทย ภาษา", "Tiếng Việt có dấu",
]
CODE = [
    "def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    'const s = `${a} + ${b}`;\nconsole.log(s);', '{"key": [1, 2, 3], "nested": {"a": null}}',
    "<div class=\"x\">&amp;</div>", "SELECT * FROM t WHERE id = 42;", "x = [1, 2, 3]  # comment",
    "if a != b and c >= d:\n\tpass", "#include <stdio.h>\nint main(){return 0;}", "λx. x ∘ f ⇒ ∀y ∈ ℝ",
]
DIGITS = [
    "12345", "3.14159265358979", "1,234,567.89", "2024-01-31", "+1 (555) 010-9999", "x2 y3 z10",
    "3.14e-10", "0x1F 0b1010", "and  123", "x  1", "   9 ", "price $12.50", "١٢٣ ٤٥٦", "½ ² ³ ⅓",
    "99 bottles", "10^9+7", "a1b2c3", "100%", "#1 #22 #333",
]
WHITESPACE = [
    "a  b", "a   b", "a\t\tb", "\n\n\n", "   leading", "trailing   ", "a \n b", "\r\n\r\n", " \u00a0 nbsp",
    "tabs\t\t\tand spaces   mixed \t ", "\n  indented\n    more\n", " ", "  ", "\t", "x\u3000y",
    "line1\nline2\n\nline4", "a\u2009thin\u200bzero-width",
]
EMOJI = ["😀 emoji 🤖", "👩‍👩‍👧 family", "🇫🇷 flag", "♥️ ✓ ✗ ★", "👍🏽"]


def varied_texts(specials: list[str], n_mixed: int = 150, seed: int = 0) -> list[str]:
    """The fixed strings, the special tokens in context, and `n_mixed` seeded random mixes."""
    fixed = ENGLISH + OTHER_SCRIPTS + CODE + DIGITS + WHITESPACE + EMOJI
    with_specials = []
    for s in specials:
        with_specials += [s, f"x{s}y", f" {s} ", f"{s}\n{s}", f"text before {s}text after"]
    rng = random.Random(seed)
    pool = fixed + specials
    mixed = []
    for _ in range(n_mixed):
        parts = rng.sample(pool, rng.randint(2, 4))
        seps = [rng.choice(["", " ", "  ", "\n", "\t", ". ", "1"]) for _ in parts]
        mixed.append("".join(p + s for p, s in zip(parts, seps)))
    return fixed + with_specials + mixed
