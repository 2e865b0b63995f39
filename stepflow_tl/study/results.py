"""The results file of a study: one JSON Lines file, a config header line, then one line
per finished item, appended atomically so a killed run resumes where it stopped. One
writer at a time: a run holds the file's `RunLock` from before it reads what is done to
its last line. Under ``accelerate`` each process writes a shard beside it, merged at the
end. What is guaranteed: ``docs/reliability.md``.

`ITEM_COLUMNS` is the one definition of an item's fields (docs/study.md).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import StepflowError
from ..traces.records import json_lines

RESULTS_VERSION = 1
# The fields of an item, in the column order of `StudyResult.items`; every item line
# must have all of them (``events`` is a dict {intervention: n events}).
ITEM_COLUMNS = [
    "problem_id", "condition", "sample", "seed", "correct", "extracted", "gold", "difficulty",
    "n_tokens", "stop_reason", "wall_time_s", "n_events", "events", "mean_kl", "saliency", "output",
    "prompt_ids", "output_ids",
]
# Items written before these keys existed lack them; they are read as missing.
LATER_ITEM_COLUMNS = ("prompt_ids", "output_ids")


def lock_path(path) -> Path:
    """The lock file of results file ``path`` (``results.jsonl.lock`` beside it)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


class RunLock:
    """An exclusive ``flock`` on ``<results>.lock``, held by one writer for a whole run.

    The lock file holds the owner's pid, host, start time and command line, so a second
    writer can say who has it. The kernel drops the lock when the owner exits, also on
    SIGKILL, so a killed run never leaves a stale lock behind. Locking needs POSIX
    ``fcntl``; on a network file system it works where the system maps ``flock`` onto
    the server's locks (NFSv4, Lustre with ``-o flock``).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.lock_file = lock_path(self.path)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise `StepflowError` naming the lock and its owner."""
        try:
            import fcntl
        except ImportError:
            raise StepflowError(f"locking {self.path} needs POSIX fcntl (Linux, macOS); on this system run "
                                "studies without results_path") from None
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                owner = _lock_owner(fd)
                os.close(fd)
                raise StepflowError(
                    f"{self.path} is being written by another study ({owner}; lock {self.lock_file}). "
                    "Two writers would run every item twice; wait for that run to finish or stop it, "
                    "or give this one another --out / results_path") from None
            # The previous owner unlinks the lock file before unlocking it; a lock won on
            # an unlinked file protects nothing, so try again on the new one.
            try:
                same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(owner) + "\n").encode("utf-8"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.unlink(self.lock_file)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _lock_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return (f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: "
                f"{owner['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


class ResultsFile:
    """Append-only JSONL of one study: a config header line, then one line per item.

    `open` takes the file's `RunLock` and `close` releases it, so one writer at a time
    appends; everything that reads what is done and decides what to run happens under
    the lock. Each line is written with one ``os.write`` on an ``O_APPEND`` descriptor
    and fsynced, so a killed run leaves whole lines plus at most one partial last line,
    which `open` truncates.
    """

    def __init__(self, path: Path, fd: int, records: List[dict], lock: RunLock):
        self.path = path
        self._fd = fd
        self.records = records
        self._lock = lock

    @classmethod
    def open(cls, path, config: dict) -> "ResultsFile":
        """Lock and open (creating with a header) ``path``; refuse a file written with
        another config, a file another writer holds, and a file with duplicated items."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise StepflowError(f"{path.parent} exists and is not a directory; choose another --out") from None
        if path.is_dir():
            raise StepflowError(f"{path} is a directory, not a results file; choose another path")
        lock = RunLock(path).acquire()
        try:
            _truncate_partial_line(path)
            header, records = read_results(path) if path.exists() and path.stat().st_size else (None, [])
            if header is not None:
                check_config(path, header, config)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            lock.release()
            raise
        store = cls(path, fd, records, lock)
        if header is None:
            store._write({"type": "config", "version": RESULTS_VERSION, "config": config})
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
        self._lock.release()

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
    missing = [k for k in ITEM_COLUMNS if k not in item and k not in LATER_ITEM_COLUMNS]
    if missing:
        raise StepflowError(f"{path}, {where}: item lacks keys {missing}; not a stepflow_tl results file?")
    types = {"problem_id": str, "condition": str, "sample": int, "correct": bool, "n_tokens": int}
    wrong = [k for k, t in types.items() if not isinstance(item[k], t) or (t is int and isinstance(item[k], bool))]
    if wrong:
        raise StepflowError(f"{path}, {where}: {', '.join(f'{k}={item[k]!r}' for k in wrong)} have the wrong type "
                            "(edited by hand?); delete the file or use another results path to start over")


def _item_name(record: dict) -> str:
    return f"problem {record['problem_id']!r}, condition {record['condition']!r}, sample {record['sample']}"


def read_results(path, *, tolerate_partial: bool = False):
    """``(header dict or None, [item dicts])`` of a results file.

    Raises:
        StepflowError: a line that is not JSON (other than a partial last line with
            ``tolerate_partial``), a missing header, items lacking keys, an item that
            is there twice, or an item outside the study the header describes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StepflowError(f"cannot read results file {path}: {e.strerror}") from None
    if tolerate_partial and data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise StepflowError(f"{path} is not a text file (not UTF-8); not a stepflow_tl results file") from None
    header, items, lines = None, [], {}
    for number, record in json_lines(text, path):
        kind = record.get("type") if isinstance(record, dict) else None
        if number == 1:
            if kind != "config" or record.get("version") != RESULTS_VERSION or not isinstance(record.get("config"), dict):
                raise StepflowError(
                    f"{path}: line 1 is not a stepflow_tl results header (type 'config', version "
                    f"{RESULTS_VERSION}); refusing to append to it")
            header = record["config"]
        elif kind == "item":
            record = {k: v for k, v in record.items() if k != "type"}
            _validate_item(record, path, f"line {number}")
            key = (record["problem_id"], record["condition"], record["sample"])
            if key in lines:
                raise StepflowError(
                    f"{path}, line {number}: {_item_name(record)} is already on line {lines[key]}. Two runs "
                    "wrote this file at once (or it was edited); statistics on it would count the item twice. "
                    "Delete the file (or use another --out / results_path) and run the study again")
            lines[key] = number
            items.append(record)
        else:
            raise StepflowError(f"{path}, line {number}: unexpected record type {kind!r}")
    if header is not None:
        _check_items_fit(path, header, items)
    return header, items


def _check_items_fit(path, header: dict, items: List[dict]) -> None:
    """Refuse items that the study the header describes cannot have made."""
    conditions, samples, n_problems = header.get("conditions"), header.get("samples"), header.get("n_problems")
    for r in items:
        if isinstance(conditions, dict) and r["condition"] not in conditions:
            raise StepflowError(f"{path}: {_item_name(r)} names a condition the header does not have "
                                f"({sorted(conditions)}); delete the file or use another results path")
        if isinstance(samples, int) and not 0 <= r["sample"] < samples:
            raise StepflowError(f"{path}: {_item_name(r)} is outside the header's {samples} sample(s) per "
                                "problem; delete the file or use another results path")
    if isinstance(n_problems, int):
        ids = list(dict.fromkeys(r["problem_id"] for r in items))
        if len(ids) > n_problems:
            raise StepflowError(f"{path}: items name {len(ids)} problems but the header's study has {n_problems} "
                                f"(e.g. {ids[-1]!r}); delete the file or use another results path")


def check_items_in_study(path, records, problem_ids: Sequence[str]) -> None:
    """Refuse a resumed item whose problem is not among the study's problems."""
    known = set(problem_ids)
    for r in records:
        if r["problem_id"] not in known:
            raise StepflowError(
                f"{path}: {_item_name(r)} is not one of this study's {len(known)} problems although the "
                "header matches (was the file edited?); delete the file or use another --out / results_path")


def check_config(path, found: dict, expected: dict) -> None:
    """Raise if a results file was made by a study with a different config."""
    if found == expected:
        return
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    shown = "; ".join(f"{k}: {_short(found.get(k))} in the file, {_short(expected.get(k))} now" for k in keys[:3])
    raise StepflowError(
        f"{path} was written by a study with a different config (differs in {keys}; {shown}); "
        "use another results path (--out) or delete the file to start over"
    )


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shard_path(path: Path, rank: int, world: int) -> Path:
    """The shard that process ``rank`` of ``world`` writes beside ``path``."""
    return path.parent / f"{path.stem}.rank{rank}-of-{world}.jsonl"


def shards(path: Path) -> List[Path]:
    """Every shard beside ``path``."""
    return sorted(path.parent.glob(f"{path.stem}.rank*-of-*.jsonl"))


def _merged_records(path: Path, config: dict, read=None, key=None) -> List[dict]:
    """The records of ``path`` and of its shards, each ``key`` once (the first seen), every
    header checked against ``config``. ``read``/``key`` default to this module's results
    file and item key; the validation study passes its own."""
    read = read_results if read is None else read
    key = key or (lambda r: (r["problem_id"], r["condition"], r["sample"]))
    seen: Dict[object, dict] = {}
    for source in [path] + shards(path):
        header, recs = read(source, tolerate_partial=source != path)
        if header is not None:
            check_config(source, header, config)
        for r in recs:
            seen.setdefault(key(r), r)
    return list(seen.values())


def merge_shards(path, config: dict) -> Path:
    """Fold every shard of ``path`` into it (atomic replace, one line per item) and
    delete the shards."""
    path = Path(path)
    replace_with_merged(path, {"type": "config", "version": RESULTS_VERSION, "config": config},
                        "item", _merged_records(path, config))
    return path


def replace_with_merged(path: Path, header: dict, line_type: str, records: List[dict],
                        allow_nan: bool = True) -> None:
    """Write ``header`` and one ``{"type": line_type, **record}`` line per record to
    ``path`` (atomically: a crash leaves the old file or the new one), then delete the
    shards that were merged into ``records``."""
    tmp = path.with_suffix(path.suffix + ".merging")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header, sort_keys=True) + "\n")
        for r in records:
            f.write(json.dumps({"type": line_type, **r}, sort_keys=True, allow_nan=allow_nan) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for shard in shards(path):
        shard.unlink()
