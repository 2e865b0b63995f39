"""Answer extraction and grading of model outputs against a :class:`~stepflow_tl.study.problems.Problem`.

Where to look: when the output contains ``</think>``, only the summary (text after the last
``</think>``) is searched first; if the summary yields no answer, the whole output is searched
with the same rules. A trace cut off inside its thinking therefore still gets graded on what it
wrote, and a finished trace is graded on its stated answer, not on tentative answers in the
thinking.

Extraction within a region (``extract_answer``):

- ``"integer"``: among the explicit markers -- ``\\boxed{...}`` (the last number inside),
  ``Answer:`` / ``answer is`` (the number after the last ``=`` on the rest of that line if there
  is one, else the first number), and GSM8K's ``#### N`` -- the one occurring last in the region
  wins; with no marker that holds a number, the last number in the region (not with
  ``strict=True``). "1,000" -> "1000";
  "42.0" stays "42.0" (graded equal to 42); a trailing period is not part of the number.
- ``"choice"``: among ``\\boxed{B}`` / ``\\boxed{(B)}`` / ``\\boxed{\\text{B}}`` and
  ``Answer: B`` / ``Answer: (B)`` / ``The answer is (option) B``, the last wins; else the last
  standalone ``(B)`` or a last line that is only a letter (not with ``strict=True``). Letters
  are upper case A-E.
- ``"math"``: the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), else
  the rest of the line after the last ``Answer:`` / ``answer is`` marker. When no region has a
  marker, the summary's last expression as math_verify extracts it (its ``parse`` on the summary,
  first match only: the rightmost LaTeX environment or expression), reduced to the right-hand
  side of its last top-level ``=`` (``\\sqrt{117} = 3\\sqrt{13}`` states ``3\\sqrt{13}``). Not
  with ``strict=True``, and only for a summary after ``</think>``: an output without one may be
  thinking that was cut off, whose last expression is no answer. Else None.

Grading (``grade``): integers by exact numeric equality; choices by letter; math by
``math_verify`` (gold and prediction each parsed from ``\\boxed{...}``, then ``verify(gold, pred)``),
falling back to normalised string equality only when math_verify cannot parse one side.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from typing import Optional

from ..errors import StepflowError
from ..traces.formats import THINK_CLOSE, boxed_spans
from .problems import KINDS, Problem

_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")
_MARKER = re.compile(r"\banswer\s*\**\s*(?:is\b|:|=)[\s*:]*", re.IGNORECASE)
_GSM8K = re.compile(r"####\s*")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


@dataclass(frozen=True)
class Grade:
    """``correct``; ``extracted``: the answer string read from the output (None if none found);
    ``method``: "integer", "choice", "math_verify", "string" (math fallback) or "none"."""

    correct: bool
    extracted: Optional[str]
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def answer_regions(text: str) -> list[str]:
    """The texts searched for an answer, in order: the summary after the last ``</think>`` (if
    any), then the whole text."""
    if THINK_CLOSE in text:
        return [text.rsplit(THINK_CLOSE, 1)[1], text]
    return [text]


def extract_answer(
    text: str, kind: str, *, letters: str = "ABCDE", strict: bool = False, timeout_seconds: Optional[int] = 5
) -> Optional[str]:
    """The answer stated in a model output, as a string, or None (rules in the module docstring).

    ``letters`` limits which letters count as a choice (e.g. "ABCD" for a 4-option problem).
    ``strict=True`` accepts explicit markers only: no last-number fallback for integers, no
    "(B)" / bare-letter-line fallback for choices and no last-expression fallback for math. The
    fallbacks can credit an output that was cut off mid-sentence ("... He gives 1 to a friend"
    read as 1). ``timeout_seconds`` bounds math_verify's extraction (see :func:`grade`).
    """
    if kind not in KINDS:
        raise StepflowError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(text, str):
        raise StepflowError(f"output text must be a str, got {type(text).__name__}")
    text = text.replace("\u2212", "-")  # Unicode minus, common in model outputs
    for region in answer_regions(text):
        if kind == "integer":
            found = _extract_integer(region, strict)
        elif kind == "choice":
            found = _extract_choice(region, letters, strict)
        else:
            found = _extract_math(region)
        if found is not None:
            return found
    if kind == "math" and not strict and THINK_CLOSE in text:
        return _last_expression(answer_regions(text)[0], timeout_seconds)
    return None


def grade(
    output_text: str, problem: Problem, *, strict: bool = False, timeout_seconds: Optional[int] = 5
) -> Grade:
    """Grade one output against ``problem``'s gold.

    ``strict`` is passed to :func:`extract_answer` (explicit answer markers only).

    ``timeout_seconds`` bounds each math_verify parse/compare. math_verify enforces it with
    ``signal.alarm``, which only works on the main thread of a POSIX process, so elsewhere
    (worker threads, Windows) the timeout is disabled instead of raising.
    """
    if not isinstance(problem, Problem):
        raise StepflowError(f"grade() needs a Problem, got {type(problem).__name__}")
    letters = "ABCDEFGHIJ"[: len(problem.choices)] if problem.kind == "choice" else "ABCDE"
    extracted = extract_answer(output_text, problem.kind, letters=letters, strict=strict,
                               timeout_seconds=timeout_seconds)
    if extracted is None:
        return Grade(False, None, "none")
    if problem.kind == "integer":
        return Grade(_as_number(extracted) == _as_number(problem.answer), extracted, "integer")
    if problem.kind == "choice":
        return Grade(extracted == problem.answer, extracted, "choice")
    return _grade_math(extracted, problem.answer, timeout_seconds)


# --------------------------------------------------------------------------------------------


def boxed_contents(text: str) -> list[tuple[int, str]]:
    """(position, content) of every ``\\boxed{...}``/``\\fbox{...}`` with balanced braces, in
    text order. An unclosed box (output cut off) is skipped."""
    return [(box, text[start:end]) for box, start, end in boxed_spans(text)]


def _numbers(text: str) -> list[str]:
    return [m.group().replace(",", "") for m in _NUMBER.finditer(text)]


def _marker_segment(region: str, match: re.Match) -> str:
    """The rest of the marker's line, up to the end of its sentence."""
    rest = region[match.end():].split("\n", 1)[0]
    end = _SENTENCE_END.search(rest)
    return rest[: end.start()] if end else rest


def _extract_integer(region: str, strict: bool) -> Optional[str]:
    candidates: list[tuple[int, str]] = []
    for position, content in boxed_contents(region):
        numbers = _numbers(_TEXT_WRAPPER.sub(r" \1 ", content))
        if numbers:
            candidates.append((position, numbers[-1]))
    for match in _MARKER.finditer(region):
        segment = _marker_segment(region, match)
        # "Answer: 3 + 4 = 7" states 7; "Answer: 7 apples (3 + 4)" states 7 too.
        numbers = _numbers(segment.rsplit("=", 1)[1]) if "=" in segment else _numbers(segment)
        if numbers:
            candidates.append((match.start(), numbers[0]))
    for match in _GSM8K.finditer(region):
        numbers = _numbers(region[match.end():].split("\n", 1)[0])
        if numbers:
            candidates.append((match.start(), numbers[0]))
    if candidates or strict:
        return max(candidates)[1] if candidates else None
    numbers = _numbers(region)
    return numbers[-1] if numbers else None


def _extract_choice(region: str, letters: str, strict: bool) -> Optional[str]:
    letter_class = f"[{re.escape(letters)}]"
    # A letter standing alone: "B", "(B)", "B)", "B." -- not the start of a word like "Because".
    alone = re.compile(rf"\(?({letter_class})\)?(?![A-Za-z])")
    candidates: list[tuple[int, str]] = []
    for position, content in boxed_contents(region):
        content = _TEXT_WRAPPER.sub(r"\1", content).strip().strip("$ ")
        match = alone.match(content)
        if match:
            candidates.append((position, match.group(1)))
    for match in _MARKER.finditer(region):
        rest = region[match.end():]
        rest = re.sub(r"^(?:\$|\\\(|\s)*(?:(?:option|choice)\s+)?", "", rest, flags=re.IGNORECASE)
        found = alone.match(rest)
        if found:
            candidates.append((match.start(), found.group(1)))
    if candidates or strict:
        return max(candidates)[1] if candidates else None
    fallbacks = [(m.start(), m.group(1)) for m in re.finditer(rf"\(({letter_class})\)", region)]
    lines = [line for line in region.splitlines() if line.strip()]
    if lines:
        last = re.fullmatch(rf"\s*\**\s*\(?({letter_class})[).]?\s*\**\s*", lines[-1])
        if last:
            fallbacks.append((region.rfind(lines[-1]), last.group(1)))
    return max(fallbacks)[1] if fallbacks else None


def _extract_math(region: str) -> Optional[str]:
    boxed = boxed_contents(region)
    if boxed:
        return boxed[-1][1].strip()
    markers = list(_MARKER.finditer(region))
    if markers:
        line = region[markers[-1].end():].split("\n", 1)[0].strip()
        line = re.sub(r"^(?:\$|\\\(|\\\[)+|(?:\$|\\\)|\\\]|\.|\*)+$", "", line).strip()
        return line or None
    return None


def _last_expression(summary: str, timeout_seconds: Optional[int]) -> Optional[str]:
    """math_verify's extraction of the last expression in ``summary``: the string it matched
    (LaTeX delimiters removed), cut to what follows its last top-level ``=``."""
    from math_verify import parse  # here, not at the top: importing math_verify takes seconds (sympy)

    found = parse(summary, fallback_mode="first_match", extraction_mode="first_match",
                  parsing_timeout=_effective_timeout(timeout_seconds))
    matched = next((x for x in found if isinstance(x, str)), None)
    if matched is None:
        return None
    depth, cut = 0, 0
    for i, c in enumerate(matched):
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth -= 1
        elif c == "=" and depth == 0:
            cut = i + 1
    return matched[cut:].strip() or None


def _as_number(text: str) -> Optional[Decimal]:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _effective_timeout(timeout_seconds: Optional[int]) -> Optional[int]:
    on_main_posix = os.name == "posix" and threading.current_thread() is threading.main_thread()
    return timeout_seconds if on_main_posix else None


def _grade_math(extracted: str, gold: str, timeout_seconds: Optional[int]) -> Grade:
    from math_verify import parse, verify

    timeout = _effective_timeout(timeout_seconds)
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{extracted}}}", parsing_timeout=timeout)
    if gold_parsed and pred_parsed:
        return Grade(bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout)), extracted, "math_verify")
    return Grade(_normalise(extracted) == _normalise(gold), extracted, "string")


def _normalise(latex: str) -> str:
    text = _TEXT_WRAPPER.sub(r"\1", latex)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\\left|\\right|\\[,;!]|\$|\s", "", text)
    return text.lower()
