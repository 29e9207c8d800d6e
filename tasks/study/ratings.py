"""Reading a number on a scale out of a participant's free-text answer, and re-asking when it can't be read.

Parsing policy (``parse_rating``), chosen so that a wrong number never enters the data silently:

1. Echoes of the scale are dropped: ranges ``A-B`` / ``A to B`` / ``A–B`` ("on a 0-100 scale") and
   anchors ``A =`` ("0 = definitely false").
2. A fraction ``A/B`` or ``A out of B`` counts as ``A`` when ``B`` is the scale's top; with any other
   ``B`` it is dropped (``7/10`` on a 0-100 scale is ambiguous).
3. Of the numbers left (digits, optional sign and decimals; a trailing ``%`` is allowed and ignored,
   numbers glued to letters such as ``3rd`` are not numbers), those inside ``[lo, hi]`` are candidates.
   Exactly one distinct candidate value -> that value; none, or several *different* ones ("60 or
   maybe 70") -> ``None``, and the caller re-asks. Out-of-range numbers ("in 2023 ...") are ignored.
"""

from __future__ import annotations

import re
from typing import Callable

from .config import Scale

_NUM = r"[-+]?\d+(?:\.\d+)?"
_RANGE = re.compile(rf"(?<![\w.])({_NUM})\s*(?:-|–|—|to)\s*({_NUM})(?![\w.]*\d)")
_ANCHOR = re.compile(rf"(?<![\w.])({_NUM})\s*=")
_FRACTION = re.compile(rf"(?<![\w.])({_NUM})\s*%?\s*(?:/|out\s+of)\s*({_NUM})(?![\w])", re.IGNORECASE)
_NUMBER = re.compile(rf"(?<![\w.])({_NUM})(?![A-Za-z_]|\.\d)")


def parse_rating(text: str | None, scale: Scale) -> float | None:
    """The one number on ``scale`` that ``text`` states, or None (see the module docstring)."""
    if not text:
        return None
    text = _RANGE.sub(" ", text)
    text = _ANCHOR.sub(" ", text)
    kept: list[float] = []

    def fraction(m: re.Match) -> str:
        if float(m.group(2)) == scale.hi:
            kept.append(float(m.group(1)))
        return " "

    text = _FRACTION.sub(fraction, text)
    values = kept + [float(m.group(1)) for m in _NUMBER.finditer(text)]
    candidates = {v for v in values if scale.lo <= v <= scale.hi}
    return candidates.pop() if len(candidates) == 1 else None


def stricter(question: str, scale: Scale, attempt: int) -> str:
    """The question re-asked on ``attempt`` (1, 2, ...), each time more insistent. No example value is
    given: an example would anchor the answer."""
    lo, hi = f"{scale.lo:g}", f"{scale.hi:g}"
    if attempt == 1:
        return f"{question}\nPlease answer with a single number from {lo} to {hi}, and nothing else."
    return f"{question}\nReply with digits only: exactly one number between {lo} and {hi}. No words."


def elicit(ask: Callable[[str], str], question: str, scale: Scale,
           reasks: int) -> tuple[float | None, int, list[str]]:
    """Ask ``question`` and, while the answer does not parse, re-ask up to ``reasks`` times.

    Returns (value or None, questions asked, raw answers in order). ``ask`` sends one message to the
    participant and returns its reply (the driver keeps the conversation).
    """
    raws: list[str] = []
    for attempt in range(reasks + 1):
        answer = ask(question if attempt == 0 else stricter(question, scale, attempt))
        raws.append(answer if isinstance(answer, str) else "")
        value = parse_rating(raws[-1], scale)
        if value is not None:
            return value, attempt + 1, raws
    return None, reasks + 1, raws
