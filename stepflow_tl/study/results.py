"""The results file of a study: one JSON Lines file, a config header line, then one line
per finished item, appended atomically so a killed run resumes where it stopped. Under
``accelerate`` each process writes a shard beside it, merged at the end.

`ITEM_COLUMNS` is the one definition of an item's fields (docs/study.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

from ..errors import StepflowError
from ..traces.records import json_lines

RESULTS_VERSION = 1
# The fields of an item, in the column order of `StudyResult.items`; every item line
# must have all of them (``events`` is a dict {intervention: n events}).
ITEM_COLUMNS = [
    "problem_id", "condition", "sample", "seed", "correct", "extracted", "gold", "difficulty",
    "n_tokens", "stop_reason", "wall_time_s", "n_events", "events", "mean_kl", "saliency", "output",
]


class ResultsFile:
    """Append-only JSONL of one study: a config header line, then one line per item.

    Each line is written with one ``os.write`` on an ``O_APPEND`` descriptor and fsynced,
    so a killed run leaves whole lines plus at most one partial last line, which `open`
    truncates.
    """

    def __init__(self, path: Path, fd: int, records: List[dict]):
        self.path = path
        self._fd = fd
        self.records = records

    @classmethod
    def open(cls, path, config: dict) -> "ResultsFile":
        """Open (creating with a header) ``path``; refuse a file written with another config."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_partial_line(path)
        header, records = read_results(path) if path.exists() and path.stat().st_size else (None, [])
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        store = cls(path, fd, records)
        if header is None:
            store._write({"type": "config", "version": RESULTS_VERSION, "config": config})
        else:
            check_config(path, header, config)
        return store

    def _write(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
        os.fsync(self._fd)

    def append(self, item: dict) -> None:
        _validate_item(item, self.path, "new item")
        self._write({"type": "item", **item})
        self.records.append(item)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _truncate_partial_line(path: Path) -> None:
    """Cut a trailing line without its newline (a write that was killed)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def _validate_item(item: dict, path, where: str) -> None:
    missing = [k for k in ITEM_COLUMNS if k not in item]
    if missing:
        raise StepflowError(f"{path}, {where}: item lacks keys {missing}; not a stepflow_tl results file?")


def read_results(path, *, tolerate_partial: bool = False):
    """``(header dict or None, [item dicts])`` of a results file.

    Raises:
        StepflowError: a line that is not JSON (other than a partial last line with
            ``tolerate_partial``), a missing header, or items lacking keys.
    """
    path = Path(path)
    data = path.read_bytes()
    if tolerate_partial and data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    header, items = None, []
    for number, record in json_lines(data.decode("utf-8"), path):
        kind = record.get("type") if isinstance(record, dict) else None
        if number == 1:
            if kind != "config" or record.get("version") != RESULTS_VERSION:
                raise StepflowError(
                    f"{path}: line 1 is not a stepflow_tl results header (type 'config', version "
                    f"{RESULTS_VERSION}); refusing to append to it")
            header = record["config"]
        elif kind == "item":
            record = {k: v for k, v in record.items() if k != "type"}
            _validate_item(record, path, f"line {number}")
            items.append(record)
        else:
            raise StepflowError(f"{path}, line {number}: unexpected record type {kind!r}")
    return header, items


def check_config(path, found: dict, expected: dict) -> None:
    """Raise if a results file was made by a study with a different config."""
    if found == expected:
        return
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    raise StepflowError(
        f"{path} was written by a study with a different config (differs in {keys}); "
        "use another results path or delete the file to start over"
    )


def shard_path(path: Path, rank: int, world: int) -> Path:
    """The shard that process ``rank`` of ``world`` writes beside ``path``."""
    return path.parent / f"{path.stem}.rank{rank}-of-{world}.jsonl"


def shards(path: Path) -> List[Path]:
    """Every shard beside ``path``."""
    return sorted(path.parent.glob(f"{path.stem}.rank*-of-*.jsonl"))


def _merged_records(path: Path, config: dict) -> List[dict]:
    seen: Dict[tuple, dict] = {}
    for source in [path] + shards(path):
        header, recs = read_results(source, tolerate_partial=source != path)
        if header is not None:
            check_config(source, header, config)
        for r in recs:
            seen.setdefault((r["problem_id"], r["condition"], r["sample"]), r)
    return list(seen.values())


def merge_shards(path, config: dict) -> Path:
    """Fold every shard of ``path`` into it (atomic replace, one line per item) and
    delete the shards."""
    path = Path(path)
    records = _merged_records(path, config)
    tmp = path.with_suffix(path.suffix + ".merging")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"type": "config", "version": RESULTS_VERSION, "config": config}, sort_keys=True) + "\n")
        for r in records:
            f.write(json.dumps({"type": "item", **r}, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for shard in shards(path):
        shard.unlink()
    return path
