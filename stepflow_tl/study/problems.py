"""Problems with gold answers: loading benchmark files, and a built-in suite for small models.

A :class:`Problem` is what the evaluation loop needs: the question, the gold answer and how to
grade it (``kind``). :func:`load_problems` reads the file shapes people actually use (MATH-500,
AIME, GSM8K, GPQA, generic, and this project's ``r1_traces.jsonl``); :func:`builtin_suite`
generates seeded multi-step word problems whose difficulty is the number of chained operations;
:func:`prompt_for` turns a problem into the user message. See ``docs/problems.md``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pandas as pd

from ..checks import check_int
from ..errors import StepflowError
from ..traces.records import read_json_records, read_text

KINDS = ("math", "choice", "integer")
LETTERS = "ABCDEFGHIJ"

# Field names accepted for each role, in order of preference. Matching is exact (case matters)
# so that a GPQA "Question" and a generic "question" cannot be confused with each other.
QUESTION_FIELDS = ("problem", "question", "Question", "prompt")
ANSWER_FIELDS = ("answer", "gold", "Correct Answer", "expected_answer", "label")
ID_FIELDS = ("unique_id", "id", "ID", "Record ID", "problem_id", "idx")
GPQA_WRONG_FIELDS = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")

_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)
_INTEGER = re.compile(r"^[+-]?\d{1,3}(,\d{3})+$|^[+-]?\d+$")


@dataclass(frozen=True)
class Problem:
    """One problem with its gold answer.

    ``answer`` is the gold: an integer string for ``kind="integer"`` ("42", "-3"), a letter for
    ``kind="choice"`` ("B", indexing ``choices``), a LaTeX string for ``kind="math"``
    ("\\frac{14}{3}"). ``difficulty`` is the MATH level or the built-in suite's step count.
    """

    id: str
    question: str
    answer: str
    kind: str
    choices: Optional[tuple[str, ...]] = None
    difficulty: Optional[int] = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise StepflowError(f"Problem {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice":
            if not self.choices or len(self.choices) > len(LETTERS):
                raise StepflowError(
                    f"Problem {self.id!r}: a choice problem needs 1..{len(LETTERS)} choices, "
                    f"got {self.choices!r}"
                )
            if self.answer not in LETTERS[: len(self.choices)]:
                raise StepflowError(
                    f"Problem {self.id!r}: gold {self.answer!r} is not one of the letters "
                    f"{LETTERS[: len(self.choices)]!r} of its {len(self.choices)} choices"
                )
        elif self.kind == "integer" and not _INTEGER.match(self.answer):
            raise StepflowError(f"Problem {self.id!r}: an integer problem needs an integer gold, got {self.answer!r}")

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "kind": self.kind,
            "choices": list(self.choices) if self.choices is not None else None,
            "difficulty": self.difficulty,
            "meta": dict(self.meta),
        }


# --------------------------------------------------------------------------------------------
# Loading files


# The authors' generation budgets per benchmark (max new tokens of their GPT-OSS runs).
# LiveCodeBench has no loader here (grading it runs code); its budget is for generation.
BENCHMARK_BUDGETS = {"aime": 30000, "gpqa": 12000, "livecodebench": 10000}


def load_problems(
    path: str | Path,
    *,
    limit: Optional[int] = None,
    kind: Optional[str] = None,
    missing_answer: str = "raise",
    choice_seed: int = 0,
    benchmark: Optional[str] = None,
) -> list[Problem]:
    """Read problems from a JSONL, JSON, CSV or Parquet file.

    Each row may be in one of these shapes (detected per row from its field names):

    - GPQA: ``Question``, ``Correct Answer``, ``Incorrect Answer 1..3`` -> ``kind="choice"``;
      the four options are shuffled with ``random.Random(f"{choice_seed}:{id}")`` so the
      correct letter is reproducible per problem and spread over A-D.
    - GSM8K: ``question``, ``answer`` ending in ``#### 42`` -> ``kind="integer"``, gold "42",
      the full solution kept in ``meta["solution"]``.
    - MATH-500: ``problem``, ``answer``, ``solution``, ``level``, ``unique_id`` -> ``kind="math"``
      for every row (a row with ``level``, ``unique_id`` or ``output`` is MATH-style), difficulty =
      level (3 or "Level 3").
    - AIME: ``question``/``problem``, ``answer``, ``id`` -> ``"integer"`` when the gold is an
      integer, else ``"math"``.
    - generic: ``question``, ``answer``, optional ``choices`` (list, or JSON list in a CSV cell;
      gold is a letter, a 0-based index, or the text of a choice) and optional ``kind``.
    - ``r1_traces.jsonl``: ``question``, ``gold`` -> ``kind="math"`` (``output``, ``correct`` etc.
      are kept in ``meta``); use ``missing_answer="skip"`` for its one row without a gold.

    Args:
        limit: keep only the first ``limit`` problems.
        kind: force this kind on every problem instead of inferring it (e.g. ``"math"`` to grade
            AIME with math_verify).
        missing_answer: ``"raise"`` (default) or ``"skip"`` rows whose answer is present but
            null/empty (r1_traces.jsonl has one such row, a Codeforces problem).
        choice_seed: seed of the GPQA option shuffle.
        benchmark: give every problem its benchmark's token budget (`BENCHMARK_BUDGETS`,
            the authors': AIME 30,000, GPQA 12,000, LiveCodeBench 10,000) in
            ``meta["max_new_tokens"]`` and the name in ``meta["benchmark"]``, which
            ``evaluate(max_new_tokens="benchmark")`` uses: a name, or ``"auto"`` (GPQA rows
            are GPQA, a file whose name contains "aime" is AIME, other rows get none).

    Raises:
        StepflowError: unknown extension, unreadable file, or a row without a question/answer
            field (the message names the file, the row and the accepted field names).
    """
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise StepflowError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if missing_answer not in ("raise", "skip"):
        raise StepflowError(f"missing_answer must be 'raise' or 'skip', got {missing_answer!r}")
    if benchmark is not None and benchmark != "auto" and benchmark not in BENCHMARK_BUDGETS:
        raise StepflowError(f"benchmark must be one of {sorted(BENCHMARK_BUDGETS)}, 'auto' or None, got {benchmark!r}")
    if limit is not None and limit < 0:
        raise StepflowError(f"limit must be >= 0 or None, got {limit}")
    if not path.is_file():
        raise StepflowError(f"problem file {str(path)!r} does not exist")

    problems: list[Problem] = []
    for row_number, row in enumerate(_read_rows(path)):
        if limit is not None and len(problems) >= limit:
            break
        problem = _problem_from_row(row, path, row_number, kind, missing_answer, choice_seed)
        if problem is not None:
            name = benchmark
            if benchmark == "auto":
                name = "gpqa" if "Correct Answer" in row else "aime" if "aime" in path.name.lower() else None
            if name is not None:
                problem.meta.update(benchmark=name, max_new_tokens=BENCHMARK_BUDGETS[name])
            problems.append(problem)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        duplicated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise StepflowError(f"{path}: problem ids must be unique; repeated: {duplicated}")
    return problems


def _read_rows(path: Path) -> Iterable[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_json_records(path)
    if suffix == ".csv":
        # Every cell as a string: AIME golds like "042" and ids must not become numbers.
        return list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    raise StepflowError(
        f"{path}: unsupported problem file extension {suffix!r}; expected .jsonl, .json, .csv or .parquet"
    )


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow  # noqa: F401  (pandas needs it for parquet; fail with an actionable message)
    except ImportError:
        raise StepflowError(f"{path}: reading Parquet needs pyarrow; run `pip install pyarrow`") from None
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StepflowError(f"{path} is not a readable Parquet file ({e}); check the file") from None
    return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _plain(value: Any) -> Any:
    """numpy scalars/arrays from Parquet -> Python values; NaN -> None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _problem_from_row(
    row: dict, path: Path, row_number: int, forced_kind: Optional[str], missing_answer: str, choice_seed: int
) -> Optional[Problem]:
    where = f"{path}, row {row_number}"
    question_key = _first_key(row, QUESTION_FIELDS)
    answer_key = _first_key(row, ANSWER_FIELDS)
    if question_key is None or answer_key is None:
        role = "question" if question_key is None else "answer"
        accepted = QUESTION_FIELDS if question_key is None else ANSWER_FIELDS
        raise StepflowError(
            f"{where}: no {role} field; accepted names are {list(accepted)} "
            f"(GPQA rows also need {list(GPQA_WRONG_FIELDS)}); the row has {sorted(row)[:20]}"
        )
    question, raw_answer = row[question_key], row[answer_key]
    if not isinstance(question, str):
        # str(None) would ask the model the text "None" and grade the answer to it.
        raise StepflowError(f"{where}: field {question_key!r} is {json.dumps(question, default=str)[:40]}, not text; "
                            "fill it in or drop the row")
    if not question.strip():
        raise StepflowError(f"{where}: field {question_key!r} is empty; fill it in or drop the row")
    if isinstance(raw_answer, (bool, dict)) or (isinstance(raw_answer, list) and answer_key != "Correct Answer"):
        raise StepflowError(f"{where}: field {answer_key!r} is {json.dumps(raw_answer, default=str)[:40]}, not an "
                            "answer (text or a number); fix it or drop the row")
    if raw_answer is None or (isinstance(raw_answer, str) and not raw_answer.strip()):
        if missing_answer == "skip":
            return None
        raise StepflowError(
            f"{where}: field {answer_key!r} is empty; pass missing_answer='skip' to drop such rows"
        )

    id_key = _first_key(row, ID_FIELDS)
    has_id = id_key is not None and row[id_key] not in (None, "")
    problem_id = _text(row[id_key]) if has_id else f"{path.stem}-{row_number}"
    used = {question_key, answer_key, id_key}
    difficulty = _level(row.get("level", row.get("difficulty")))
    choices: Optional[tuple[str, ...]] = None

    if answer_key == "Correct Answer":
        kind, answer, choices = _gpqa(row, problem_id, where, choice_seed)
        used |= set(GPQA_WRONG_FIELDS)
    elif row.get("choices") not in (None, ""):
        kind, answer, choices = _generic_choice(row["choices"], raw_answer, where)
        used.add("choices")
    else:
        answer = _text(raw_answer).strip()
        gsm8k = _GSM8K_ANSWER.search(answer)
        if gsm8k is not None:
            answer = gsm8k.group(1).replace(",", "").strip()
            row = {**row, "solution": _text(raw_answer)}
        if row.get("kind") in KINDS:
            kind = row["kind"]
            used.add("kind")
        elif gsm8k is None and any(k in row for k in ("level", "unique_id", "output")):
            kind = "math"  # MATH-500 / r1_traces golds are LaTeX even when they look like integers
        else:
            kind = "integer" if _INTEGER.match(answer) or _integral_number(answer) else "math"
        if kind == "integer":
            answer = _integer_text(answer, where)

    if forced_kind is not None and forced_kind != kind:
        if forced_kind == "choice" or kind == "choice":
            shape = "with" if choices else "without"
            raise StepflowError(f"{where}: kind={forced_kind!r} does not fit a row {shape} choices")
        if forced_kind == "integer":
            answer = _integer_text(answer, where)
        kind = forced_kind

    meta = {k: v for k, v in row.items() if k not in used}
    meta["source_file"] = str(path)
    meta["row"] = row_number
    try:
        return Problem(problem_id, question, answer, kind, choices, difficulty, meta)
    except StepflowError as e:
        raise StepflowError(f"{where}: {e}") from None


def _first_key(row: dict, names: Sequence[str]) -> Optional[str]:
    return next((n for n in names if n in row), None)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _level(value: Any) -> Optional[int]:
    """MATH writes levels as 3 or "Level 3"; anything else is no difficulty."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    found = re.search(r"\d+", str(value))
    return int(found.group()) if found else None


def _integral_number(text: str) -> bool:
    try:
        number = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return False
    return number.is_finite() and number == number.to_integral_value()


def _integer_text(answer: str, where: str) -> str:
    if not _integral_number(answer):
        raise StepflowError(f"{where}: an integer problem needs an integer gold, got {answer!r}")
    return str(int(Decimal(answer.replace(",", ""))))


def _gpqa(row: dict, problem_id: str, where: str, seed: int) -> tuple[str, str, tuple[str, ...]]:
    missing = [k for k in GPQA_WRONG_FIELDS if row.get(k) in (None, "")]
    if missing:
        raise StepflowError(f"{where}: a GPQA row (it has 'Correct Answer') also needs {missing}")
    correct = _text(row["Correct Answer"]).strip()
    options = [correct] + [_text(row[k]).strip() for k in GPQA_WRONG_FIELDS]
    # A string seed is hashed with SHA-512 by random.Random, so this is stable across runs.
    random.Random(f"{seed}:{problem_id}").shuffle(options)
    return "choice", LETTERS[options.index(correct)], tuple(options)


def _generic_choice(raw_choices: Any, raw_answer: Any, where: str) -> tuple[str, str, tuple[str, ...]]:
    if isinstance(raw_choices, str):
        try:
            raw_choices = json.loads(raw_choices)
        except json.JSONDecodeError:
            raise StepflowError(f"{where}: 'choices' must be a list (or a JSON list in a CSV cell)") from None
    if isinstance(raw_choices, dict) and "text" in raw_choices:  # ARC/CSQA: {"label": [...], "text": [...]}
        raw_choices = raw_choices["text"]
    if not isinstance(raw_choices, (list, tuple)) or not raw_choices:
        raise StepflowError(f"{where}: 'choices' must be a non-empty list, got {raw_choices!r}")
    choices = tuple(_text(c) for c in raw_choices)
    letters = LETTERS[: len(choices)]
    answer = _text(raw_answer).strip()
    if isinstance(raw_answer, int) and not isinstance(raw_answer, bool) and 0 <= raw_answer < len(choices):
        return "choice", letters[raw_answer], choices
    if answer.strip("()").upper() in letters and len(answer.strip("()")) == 1:
        return "choice", answer.strip("()").upper(), choices
    if answer in choices:
        return "choice", letters[choices.index(answer)], choices
    if answer.isdigit() and int(answer) < len(choices):
        return "choice", letters[int(answer)], choices
    raise StepflowError(
        f"{where}: answer {answer!r} is neither a letter in {letters!r}, a 0-based index, nor one of the choices"
    )


# --------------------------------------------------------------------------------------------
# Built-in suite


@dataclass(frozen=True)
class SuiteConfig:
    """Knobs of :func:`builtin_suite`; calibrate these, not the generator.

    Every value stays in ``[1, max_value]``: a subtraction never empties the pile and a
    multiplication that would exceed ``max_value`` is not drawn.

    - ``start_range``: the starting count (inclusive).
    - ``operand_range``: the amount added or subtracted (inclusive).
    - ``factors``: multipliers/divisors for "mul" and "div".
    - ``operations``: which of "add", "sub", "mul", "div" may be drawn, each step uniformly
      among those valid for the current value ("div" needs an exact quotient).
    - ``names``: (name, subject pronoun, object pronoun, possessive).
    - ``items``: plural countable nouns.
    - ``templates``: per operation, sentence templates with ``{who}`` (name or pronoun),
      ``{obj}``, ``{poss}``, ``{n}`` and ``{items}``; one is drawn per step.
    """

    start_range: tuple[int, int] = (2, 9)
    operand_range: tuple[int, int] = (1, 6)
    factors: tuple[int, ...] = (2, 3)
    max_value: int = 40
    operations: tuple[str, ...] = ("add", "sub")
    names: tuple[tuple[str, str, str, str], ...] = (
        ("Tom", "he", "him", "his"),
        ("Anna", "she", "her", "her"),
        ("Sam", "he", "him", "his"),
        ("Lily", "she", "her", "her"),
        ("Ben", "he", "him", "his"),
        ("Mia", "she", "her", "her"),
        ("Jack", "he", "him", "his"),
        ("Emma", "she", "her", "her"),
    )
    items: tuple[str, ...] = ("apples", "marbles", "stickers", "pencils", "cookies", "coins", "books", "stamps")
    templates: dict = field(
        default_factory=lambda: {
            "add": ("{who} buys {n} more.", "{who} finds {n} more.", "A friend gives {obj} {n} more."),
            "sub": ("{who} gives away {n}.", "{who} loses {n}.", "{who} gives {n} to a friend."),
            "mul": ("{who} ends up with {n} times as many {items} as before.",),
            "div": ("{who} splits {poss} {items} into {n} equal groups and keeps one group.",),
        },
        hash=False,
    )

    def __post_init__(self):
        unknown = set(self.operations) - {"add", "sub", "mul", "div"}
        if not self.operations or unknown:
            raise StepflowError(
                f"SuiteConfig.operations must be a non-empty subset of add/sub/mul/div, got {self.operations}"
            )
        missing = [op for op in self.operations if not self.templates.get(op)]
        if missing:
            raise StepflowError(f"SuiteConfig.templates has no template for {missing}")
        check_int("SuiteConfig.max_value", self.max_value, low=1)
        for name in ("start_range", "operand_range", "factors"):
            values = getattr(self, name)
            if not isinstance(values, (tuple, list)) or (name != "factors" and len(values) != 2):
                raise StepflowError(f"SuiteConfig.{name} must be a tuple of integers"
                                    f"{' (lo, hi)' if name != 'factors' else ''}, got {values!r}")
            for i, v in enumerate(values):
                check_int(f"SuiteConfig.{name}[{i}]", v)
        lo, hi = self.start_range
        if not 1 <= lo <= hi <= self.max_value:
            raise StepflowError(
                f"SuiteConfig.start_range must satisfy 1 <= lo <= hi <= max_value, got {self.start_range}"
            )
        if not 1 <= self.operand_range[0] <= self.operand_range[1]:
            raise StepflowError(f"SuiteConfig.operand_range must satisfy 1 <= lo <= hi, got {self.operand_range}")
        if any(f < 2 for f in self.factors) or not self.factors:
            raise StepflowError(f"SuiteConfig.factors must be integers >= 2, got {self.factors}")


def builtin_suite(
    n_per_level: int = 20,
    levels: Sequence[int] = (1, 2, 3, 4),
    seed: int = 0,
    config: Optional[SuiteConfig] = None,
) -> list[Problem]:
    """Seeded multi-step word problems; level k chains k operations on one running count.

    "Tom has 3 apples. He buys 4 more. Then he gives away 2. How many apples does Tom have now?"
    is level 2: each operation must carry the previous result forward, so a level-k problem has
    k dependent steps. Problems are ``kind="integer"``, ``difficulty=k``; ``meta`` holds the
    operations and every intermediate value. Each problem draws from its own
    ``random.Random(f"{seed}:{level}:{i}")``, so the same seed gives identical problems, other
    seeds give other problems, and adding a level does not change the others. Questions are
    unique within a suite.
    """
    config = config or SuiteConfig()
    n_per_level = check_int("n_per_level", n_per_level, low=1)
    if not levels or any(not isinstance(k, int) or k < 1 for k in levels):
        raise StepflowError(f"levels must be positive integers, got {levels!r}")
    problems = []
    seen: set[str] = set()
    for level in levels:
        for i in range(n_per_level):
            for attempt in range(1000):
                rng = random.Random(f"{seed}:{level}:{i}:{attempt}")
                question, answer, meta = _word_problem(rng, level, config)
                if question not in seen:
                    break
            else:
                raise StepflowError(
                    f"could not draw {n_per_level} distinct level-{level} problems; widen SuiteConfig ranges"
                )
            seen.add(question)
            meta.update(seed=seed, level=level, index=i, generator="builtin_suite")
            problem_id = f"builtin-s{seed}-L{level}-{i:03d}"
            problems.append(Problem(problem_id, question, str(answer), "integer", None, level, meta))
    return problems


def _word_problem(rng: random.Random, level: int, config: SuiteConfig) -> tuple[str, int, dict]:
    name, subject, obj, poss = rng.choice(config.names)
    items = rng.choice(config.items)
    value = rng.randint(*config.start_range)
    sentences = [f"{name} has {value} {items}."]
    values, ops = [value], []
    for step in range(level):
        candidates = _valid_operations(value, config)
        op = rng.choice(candidates)
        if op == "add":
            n = rng.randint(config.operand_range[0], min(config.operand_range[1], config.max_value - value))
            value += n
        elif op == "sub":
            n = rng.randint(config.operand_range[0], min(config.operand_range[1], value - 1))
            value -= n
        elif op == "mul":
            n = rng.choice([f for f in config.factors if value * f <= config.max_value])
            value *= n
        else:
            n = rng.choice([f for f in config.factors if value % f == 0 and value // f >= 1])
            value //= n
        sentence = rng.choice(config.templates[op]).format(who=subject, obj=obj, poss=poss, n=n, items=items)
        sentence = sentence[0].upper() + sentence[1:]
        sentences.append(sentence if step == 0 else "Then " + sentence[0].lower() + sentence[1:])
        values.append(value)
        ops.append([op, n])
    sentences.append(f"How many {items} does {name} have now?")
    return " ".join(sentences), value, {"ops": ops, "values": values}


def _valid_operations(value: int, config: SuiteConfig) -> list[str]:
    valid = []
    for op in config.operations:
        if op == "add" and value + config.operand_range[0] <= config.max_value:
            valid.append(op)
        elif op == "sub" and value - config.operand_range[0] >= 1:
            valid.append(op)
        elif op == "mul" and any(value * f <= config.max_value for f in config.factors):
            valid.append(op)
        elif op == "div" and any(value % f == 0 for f in config.factors):
            valid.append(op)
    if not valid:
        raise StepflowError(
            f"no operation in {config.operations} keeps the count {value} inside [1, {config.max_value}]; "
            "widen SuiteConfig.max_value or add operations"
        )
    return valid


# --------------------------------------------------------------------------------------------
# Prompts

PROMPT_STYLES = ("chat", "r1")


def prompt_for(problem: Problem, style: str = "chat") -> str:
    """The user message for ``problem`` (no chat-template markup; the caller applies it).

    ``style="chat"`` (small instruct models): asks for step-by-step reasoning and a last line
    ``Answer: <number>`` (integer), ``Answer: <letter>`` (choice) or a ``\\boxed{}`` answer
    (math). ``style="r1"``: DeepSeek-R1's recommended instruction, "Please reason step by step,
    and put your final answer within \\boxed{}.", for every kind, since R1-style models were
    trained to box. Choice problems list their options as "A) ...".
    """
    if style not in PROMPT_STYLES:
        raise StepflowError(f"style must be one of {PROMPT_STYLES}, got {style!r}")
    body = problem.question.strip()
    if problem.kind == "choice":
        letters = LETTERS[: len(problem.choices)]
        body += "\n\n" + "\n".join(f"{letter}) {choice}" for letter, choice in zip(letters, problem.choices))
    if style == "r1":
        if problem.kind == "choice":
            return body + (
                "\n\nPlease reason step by step, and put the letter of your final answer "
                f"({', '.join(letters)}) within \\boxed{{}}."
            )
        return body + "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    if problem.kind == "integer":
        return body + '\n\nThink step by step. End with a final line of the form "Answer: <number>".'
    if problem.kind == "choice":
        return body + (
            '\n\nThink step by step. End with a final line of the form "Answer: <letter>", '
            f'where the letter is one of {", ".join(letters)}.'
        )
    return body + "\n\nThink step by step. Put your final answer within \\boxed{}."
