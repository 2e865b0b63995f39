"""Reading JSON records (traces, problems, results) with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Tuple, Type

from ..errors import StepflowError


def read_text(path: Path, error: Type[StepflowError] = StepflowError) -> str:
    """The UTF-8 text of ``path``; ``error`` names the file when it is binary or unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not a UTF-8 text file (undecodable byte at offset {e.start}); expected JSON "
                    "Lines, JSON or CSV text") from None


def read_json_records(path: Path, error: Type[StepflowError] = StepflowError) -> list:
    """The objects in ``path``: a ``.json`` file holding one object, a list of objects or
    ``{"data": [objects]}``; any other file is JSON Lines, one object a line (blank
    lines skipped). Raises ``error`` naming the file and line of the first bad record."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(read_text(path, error))
        except json.JSONDecodeError as e:
            raise error(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if isinstance(data, dict):
            data = data["data"] if isinstance(data.get("data"), list) else [data]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise error(f"{path}: expected a JSON object, a list of objects or {{\"data\": [objects]}}")
        return data
    rows = []
    for number, row in json_lines(read_text(path, error), path, error):
        if not isinstance(row, dict):
            raise error(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def json_lines(text: str, path, error: Type[StepflowError] = StepflowError) -> Iterator[Tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of the JSON Lines ``text`` read
    from ``path``; ``error`` names the file and line of the first invalid one.

    Lines end at ``\n`` only (a ``\r`` before it is whitespace to JSON):
    `str.splitlines` would also cut at U+2028, U+2029, ``\x1c``-``\x1e`` or ``\x85``,
    which JSON allows raw inside a string."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        yield number, value
