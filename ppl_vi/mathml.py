"""LaTeX formulas as MathML: typeset by the browser itself, in a notebook cell or a page, no script, no network.

The checker writes the objective Pyro optimises as LaTeX (:mod:`ppl_vi.check.formula`); a notebook
shows it typeset with :func:`to_mathml`. The subset understood is what a formula of densities needs::

    \\mathrm{Normal}  \\mathbb{E}  \\frac{a}{b}  \\sum_{k=1}^{K}  \\log  \\mid  \\left( \\right)  \\,  x_i  e^{y}
    Greek letters (\\mu, \\sigma, \\Sigma, ...), \\cdot \\times \\sim \\le \\ge \\approx, digits, + - = ( ) [ ] ,

MathML Core (Chromium 109+, Firefox, Safari) lays it out: fractions stacked, limits under and over
the sum, fences stretched. Anything outside the subset raises :class:`UnsupportedLatex` (the caller
shows the formula another way), so an unknown command is never printed as if it were math.
"""

from __future__ import annotations

import html
import re
from typing import List, Optional, Tuple

GREEK = {name: chr(code) for name, code in (
    ("alpha", 0x3B1), ("beta", 0x3B2), ("gamma", 0x3B3), ("delta", 0x3B4), ("epsilon", 0x3F5), ("varepsilon", 0x3B5),
    ("zeta", 0x3B6), ("eta", 0x3B7), ("theta", 0x3B8), ("iota", 0x3B9), ("kappa", 0x3BA), ("lambda", 0x3BB),
    ("mu", 0x3BC), ("nu", 0x3BD), ("xi", 0x3BE), ("pi", 0x3C0), ("rho", 0x3C1), ("sigma", 0x3C3), ("tau", 0x3C4),
    ("upsilon", 0x3C5), ("phi", 0x3D5), ("varphi", 0x3C6), ("chi", 0x3C7), ("psi", 0x3C8), ("omega", 0x3C9),
    ("Gamma", 0x393), ("Delta", 0x394), ("Theta", 0x398), ("Lambda", 0x39B), ("Xi", 0x39E), ("Pi", 0x3A0),
    ("Sigma", 0x3A3), ("Upsilon", 0x3A5), ("Phi", 0x3A6), ("Psi", 0x3A8), ("Omega", 0x3A9))}
OPERATORS = {"cdot": "·", "times": "×", "sim": "∼", "le": "≤", "leq": "≤", "ge": "≥", "geq": "≥", "approx": "≈",
             "ne": "≠", "neq": "≠", "pm": "±", "to": "→", "propto": "∝", "mid": "∣", "infty": "∞", "ldots": "…",
             "cdots": "⋯", "in": "∈", "partial": "∂", "nabla": "∇"}
LARGE = {"sum": "∑", "prod": "∏", "int": "∫"}
FUNCTIONS = {"log", "exp", "max", "min", "det", "sup", "inf", "lim"}
SPACES = {",": "0.167em", ":": "0.222em", ";": "0.278em", "quad": "1em", "qquad": "2em", " ": "0.25em", "!": "0"}
RELATIONS = {"=", "∣", "∼", "≤", "≥", "≈", "≠", "∝", "∈", "→"}
#: letters with a double-struck form outside the Mathematical Alphanumeric block
STRUCK = {"C": "ℂ", "H": "ℍ", "N": "ℕ", "P": "ℙ", "Q": "ℚ", "R": "ℝ", "Z": "ℤ"}

TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[{}_^]|\d+(?:\.\d+)?|[A-Za-z]+|\s+|.", re.S)


class UnsupportedLatex(ValueError):
    """A command or construction outside the subset this module typesets."""


def _struck(letter: str) -> str:
    if letter in STRUCK:
        return STRUCK[letter]
    if "A" <= letter <= "Z":
        return chr(0x1D538 + ord(letter) - ord("A"))
    raise UnsupportedLatex(f"\\mathbb{{{letter}}}")


def _mo(symbol: str) -> str:
    if symbol in RELATIONS:  # a relation's space on both sides, never stretched (the ∣ of a conditional)
        return f'<mo stretchy="false" lspace="0.278em" rspace="0.278em">{html.escape(symbol)}</mo>'
    if symbol in "()[]{}":  # as in TeX, only \left and \right stretch a fence
        return f'<mo stretchy="false">{html.escape(symbol)}</mo>'
    return f"<mo>{html.escape(symbol)}</mo>"


def _is_operand(mathml: str) -> bool:
    """Whether a piece of MathML ends an operand (a sign may not follow it): not an operator or an
    opening fence; a closing fence is one."""
    if not mathml.startswith("<mo"):
        return True
    return mathml[mathml.index(">") + 1:mathml.rindex("</mo>")] in (")", "]", "}")


class _Parser:
    """Recursive descent over the tokens: a sequence of atoms, each with optional _ and ^."""

    def __init__(self, latex: str):
        self.tokens = TOKEN.findall(latex)
        self.i = 0
        self.operand = False  # did an operand come last? (then - and + are binary, else a sign)

    def peek(self, spaces: bool = False) -> Optional[str]:
        """The next token; white space skipped (it separates tokens in math) unless ``spaces``."""
        while not spaces and self.i < len(self.tokens) and self.tokens[self.i].isspace():
            self.i += 1
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, spaces: bool = False) -> str:
        token = self.peek(spaces)
        if token is None:
            raise UnsupportedLatex("the formula ends inside a group or command")
        self.i += 1
        return token

    def sequence(self, closing: Optional[str] = None) -> str:
        parts: List[str] = []
        self.operand = False
        while self.peek() is not None and self.peek() != closing:
            if self.peek() == "}":
                raise UnsupportedLatex("an unmatched }")
            parts.append(self.scripted())
            self.operand = _is_operand(parts[-1])
        if closing is not None:
            if self.peek() != closing:
                raise UnsupportedLatex(f"a group without its {closing}")
            self.take()
        return "".join(parts)

    def raw_group(self) -> str:
        """The text of {…} as written (for \\mathrm and \\mathbb), \\_ as _."""
        if self.take() != "{":
            raise UnsupportedLatex("a text command without {…}")
        text = []
        while self.peek(spaces=True) != "}":
            token = self.take(spaces=True)
            if token == "{":
                raise UnsupportedLatex("a nested group inside a text command")
            text.append(token[1:] if token in ("\\_", "\\{", "\\}") else " " if token == "\\," else token)
        self.take()
        return "".join(text)

    def scripted(self) -> str:
        base, large = self.atom()
        sub = sup = None
        while self.peek() in ("_", "^"):
            which = self.take()
            arg, _ = self.atom()
            if which == "_" and sub is None:
                sub = arg
            elif which == "^" and sup is None:
                sup = arg
            else:
                raise UnsupportedLatex(f"a double {which}")
        if sub is None and sup is None:
            return base
        tags = ("munder", "mover", "munderover") if large else ("msub", "msup", "msubsup")
        if sup is None:
            return f"<{tags[0]}>{base}{sub}</{tags[0]}>"
        if sub is None:
            return f"<{tags[1]}>{base}{sup}</{tags[1]}>"
        return f"<{tags[2]}>{base}{sub}{sup}</{tags[2]}>"

    def atom(self) -> Tuple[str, bool]:
        """(MathML, is a large operator) of the next atom."""
        token = self.take()
        if token == "{":
            return f"<mrow>{self.sequence('}')}</mrow>", False
        if token in ("_", "^", "}"):
            raise UnsupportedLatex(f"a {token} with nothing before it")
        if token[0].isdigit():
            return f"<mn>{token}</mn>", False
        if token[0].isalpha():  # one letter italic; a word (a site's name) upright, as MathML does
            return f"<mi>{html.escape(token)}</mi>", False
        if token in ("-", "+") and not self.operand:  # a sign, not a binary operator: no space after it
            return f'<mo form="prefix">{"−" if token == "-" else "+"}</mo>', False
        if not token.startswith("\\"):
            return _mo({"-": "−", "*": "∗", "|": "∣"}.get(token, token)), False
        name = token[1:]
        if name in ("mathrm", "text", "operatorname"):
            text = self.raw_group()
            tag = "mtext" if name == "text" else "mi"
            variant = ' mathvariant="normal"' if tag == "mi" and len(text) == 1 else ""
            return f"<{tag}{variant}>{html.escape(text)}</{tag}>", False
        if name == "mathbb":
            return f"<mi>{''.join(_struck(c) for c in self.raw_group())}</mi>", False
        if name == "frac":
            top, _ = self.atom()
            bottom, _ = self.atom()
            return f"<mfrac>{top}{bottom}</mfrac>", False
        if name in ("left", "right"):
            fence = self.take()
            fence = {"\\{": "{", "\\}": "}", "\\|": "‖", "|": "∣"}.get(fence, fence)
            if fence == ".":
                return "<mrow></mrow>", False
            if fence not in "()[]{}∣‖" or len(fence) != 1:
                raise UnsupportedLatex(f"\\{name}{fence}")
            return f'<mo stretchy="true">{html.escape(fence)}</mo>', False
        if name in GREEK:
            variant = ' mathvariant="normal"' if name[0].isupper() else ""
            return f"<mi{variant}>{GREEK[name]}</mi>", False
        if name in LARGE:
            return f'<mo largeop="true" movablelimits="false">{LARGE[name]}</mo>', True
        if name in OPERATORS:
            return _mo(OPERATORS[name]), False
        if name in FUNCTIONS:
            return f'<mi>{name}</mi><mspace width="0.167em"></mspace>', False  # the thin space TeX puts after log
        if name in SPACES:
            return f'<mspace width="{SPACES[name]}"></mspace>', False
        if name in ("_", "{", "}", "%", "#", "&"):
            return (f"<mi>{html.escape(name)}</mi>" if name == "_" else _mo(name)), False
        raise UnsupportedLatex(f"\\{name}")


def to_mathml(latex: str, display: bool = True) -> str:
    """``<math>…</math>`` for ``latex`` (the subset in the module docstring), with the LaTeX kept as an
    annotation (what a browser copies); :class:`UnsupportedLatex` for anything else."""
    body = _Parser(latex).sequence()
    mode = "block" if display else "inline"
    return (f'<math xmlns="http://www.w3.org/1998/Math/MathML" display="{mode}"><semantics><mrow>{body}</mrow>'
            f'<annotation encoding="application/x-tex">{html.escape(latex)}</annotation></semantics></math>')


__all__ = ["UnsupportedLatex", "to_mathml"]
