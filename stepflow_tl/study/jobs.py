"""The one job runner behind every command that writes results (``eval``/``ablate``,
``validate``, ``saliency``).

A run is a list of items, each computed by a per-item function and streamed as one
JSON line to a results file:

- the file starts with a header holding the run's config (model, dtype, software
  versions, settings, a fingerprint of the inputs); a rerun with the same config
  resumes (finished items are never redone), any other config is refused;
- the file is append-only: one ``os.write`` and fsync per line, a partial last line
  (a killed write) is cut under the lock;
- an item that is there twice, or that the header's run cannot have made, is refused
  with the file and line named, never counted;
- a writer holds an exclusive ``flock`` (`RunLock`) on ``<results>.lock`` for the whole
  run, which records its pid, host, start time and command, so a second run on the same
  file is refused naming the first;
- under ``accelerate launch`` each process writes its own shard beside the file (and
  locks it), and the main process merges the shards at the end.

`JobSchema` says what one kind of results file holds (its line type, version, item
key, field checks); `JobFile` is the locked store; `run_jobs` runs the items that are
not done yet over it. `stepflow_tl.study.results` is the study's schema on top of this,
`stepflow_tl.study.validate` and `stepflow_tl.study.saliency` the other two.
What is guaranteed: ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple, Union

from tqdm.auto import tqdm

from ..errors import StepflowError
from ..tl.models import software_versions

PathLike = Union[str, Path]
from ..traces.records import json_lines


def distributed_state():
    """`accelerate.PartialState` when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


# --------------------------------------------------------------------------- the lock
def lock_path(path: PathLike) -> Path:
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

    def __init__(self, path: PathLike, what: str = "study"):
        self.path = Path(path)
        self.what = what
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
                    f"{self.path} is being written by another {self.what} ({owner}; lock {self.lock_file}). "
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


# --------------------------------------------------------------------------- the file
@dataclass(frozen=True)
class JobSchema:
    """What one kind of results file holds.

    Attributes:
        line_type: the ``type`` of an item line (``"item"``, ``"trace"``, ``"map"``).
        version: the header's format version.
        what: the run's name in messages (``"study"``, ``"validation run"``).
        key: an item's identity; two lines with one key are refused.
        name: an item as messages name it.
        check: ``check(record, path, where)`` raises on a record with missing or
            mistyped fields (None: no check).
        fits: ``fits(path, header, records)`` raises on items the header's run cannot
            have made (None: no check).
        allow_nan: whether item lines may hold NaN (not strict JSON).
    """

    line_type: str
    version: int
    what: str
    key: Callable[[dict], Hashable]
    name: Callable[[dict], str]
    check: Optional[Callable[[dict, Path, str], None]] = None
    fits: Optional[Callable[[Path, dict, List[dict]], None]] = None
    allow_nan: bool = True


def traces_within_header(path: Path, header: dict, records: List[dict]) -> None:
    """`JobSchema.fits` of the runs keyed by trace ``index`` (validation, saliency):
    every index lies within the header's ``n_traces``."""
    n = header.get("n_traces")
    bad = [r["index"] for r in records if isinstance(n, int) and not 0 <= r["index"] < n]
    if bad:
        raise StepflowError(f"{path}: trace {bad[0]} is outside the header's {n} traces; delete the file or use "
                            "another --out")


def truncate_partial_line(path: Path) -> None:
    """Cut a trailing line without its newline (a write that was killed)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def read_jobs(path: PathLike, schema: JobSchema, *, tolerate_partial: bool = False) -> Tuple[Optional[dict], List[dict]]:
    """``(header config or None, [item records])`` of a results file of ``schema``.

    Raises:
        StepflowError: a line that is not JSON (other than a partial last line with
            ``tolerate_partial``), a first line that is not the schema's header, an
            unknown line type, an item failing the schema's checks, an item that is
            there twice, or an item outside the run the header describes.
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
            if kind != "config" or record.get("version") != schema.version or not isinstance(record.get("config"),
                                                                                              dict):
                raise StepflowError(
                    f"{path}: line 1 is not a stepflow_tl results header of a {schema.what} (type 'config', "
                    f"version {schema.version}); refusing to append to it")
            header = record["config"]
        elif kind == schema.line_type:
            record = {k: v for k, v in record.items() if k != "type"}
            if schema.check is not None:
                schema.check(record, path, f"line {number}")
            key = schema.key(record)
            if key in lines:
                raise StepflowError(
                    f"{path}, line {number}: {schema.name(record)} is already on line {lines[key]}. Two runs "
                    "wrote this file at once (or it was edited); statistics on it would count the item twice. "
                    "Delete the file (or use another --out / results_path) and run again")
            lines[key] = number
            items.append(record)
        else:
            raise StepflowError(f"{path}, line {number}: unexpected record type {kind!r}; not a {schema.what} "
                                "results file")
    if header is not None and schema.fits is not None:
        schema.fits(path, header, items)
    return header, items


def check_config(path: PathLike, found: dict, expected: dict, what: str = "study") -> None:
    """Raise if a results file was made by a run with a different config."""
    if found == expected:
        return
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    shown = "; ".join(f"{k}: {_short(found.get(k))} in the file, {_short(expected.get(k))} now" for k in keys[:3])
    raise StepflowError(
        f"{path} was written by a {what} with a different config (differs in {keys}; {shown}); "
        "use another results path (--out) or delete the file to start over"
    )


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JobFile:
    """The locked, append-only results file of one run: a config header, then one line
    per item.

    `open` takes the file's `RunLock` and `close` releases it, so one writer at a time
    appends; everything that reads what is done and decides what to run happens under
    the lock. Each line is written with one ``os.write`` on an ``O_APPEND`` descriptor
    and fsynced, so a killed run leaves whole lines plus at most one partial last line,
    which `open` truncates.
    """

    schema: JobSchema

    def __init__(self, path: Path, fd: int, records: List[dict], lock: RunLock, schema: JobSchema):
        self.path = path
        self._fd: Optional[int] = fd
        self.records = records
        self._lock = lock
        self.schema = schema

    @classmethod
    def open(cls, path: PathLike, config: dict, schema: JobSchema) -> "JobFile":
        """Lock and open (creating with a header) ``path``; refuse a file written with
        another config, a file another writer holds, and a damaged file."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise StepflowError(f"{path.parent} exists and is not a directory; choose another --out") from None
        if path.is_dir():
            raise StepflowError(f"{path} is a directory, not a results file; choose another path")
        lock = RunLock(path, schema.what).acquire()
        try:
            truncate_partial_line(path)
            header, records = read_jobs(path, schema) if path.exists() and path.stat().st_size else (None, [])
            if header is not None:
                check_config(path, header, config, schema.what)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            lock.release()
            raise
        store = cls(path, fd, records, lock, schema)
        if header is None:
            store._write({"type": "config", "version": schema.version, "config": config})
        return store

    def _write(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, allow_nan=self.schema.allow_nan) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
        os.fsync(self._fd)

    def append(self, item: dict) -> None:
        if self.schema.check is not None:
            self.schema.check(item, self.path, "new item")
        self._write({"type": self.schema.line_type, **item})
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


# --------------------------------------------------------------------------- shards
def shard_path(path: Path, rank: int, world: int) -> Path:
    """The shard that process ``rank`` of ``world`` writes beside ``path``."""
    return path.parent / f"{path.stem}.rank{rank}-of-{world}.jsonl"


def shards(path: Path) -> List[Path]:
    """Every shard beside ``path``."""
    return sorted(path.parent.glob(f"{path.stem}.rank*-of-*.jsonl"))


def merged_records(path: Path, config: dict, schema: JobSchema) -> List[dict]:
    """The records of ``path`` and of its shards, each key once (the first seen), every
    header checked against ``config``."""
    seen: Dict[object, dict] = {}
    for source in [path] + shards(path):
        header, recs = read_jobs(source, schema, tolerate_partial=source != path)
        if header is not None:
            check_config(source, header, config, schema.what)
        for r in recs:
            seen.setdefault(schema.key(r), r)
    return list(seen.values())


def merge_into(path: Path, config: dict, schema: JobSchema, records: Optional[List[dict]] = None) -> None:
    """Write the header and one line per record (default: `merged_records`) to ``path``
    (atomically: a crash leaves the old file or the new one), then delete the shards."""
    records = merged_records(path, config, schema) if records is None else records
    tmp = path.with_suffix(path.suffix + ".merging")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"type": "config", "version": schema.version, "config": config}, sort_keys=True) + "\n")
        for r in records:
            f.write(json.dumps({"type": schema.line_type, **r}, sort_keys=True, allow_nan=schema.allow_nan) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for shard in shards(path):
        shard.unlink()


# --------------------------------------------------------------------------- the runner
def refuse_foreign_files(out: Path, path: Path, patterns: Sequence[str], what: str) -> None:
    """Before a fresh run in ``out`` (no results file yet): refuse when ``out`` holds
    files a run of this kind writes (``patterns``), which a run without its results file
    left behind; mixed with the new run's files they would be read as one run."""
    if path.exists():
        return
    found = sorted({p.name for pattern in patterns for p in out.glob(pattern)})
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise StepflowError(f"{out} holds files of an earlier {what} ({shown}) but no {path.name} saying which "
                            "run made them; the new files would mix with them. Choose another --out or delete "
                            "those files")


def run_jobs(path: PathLike, config: dict, schema: JobSchema, keys: Sequence[Hashable], work: Callable[[int, Any], dict], *,
             progress: bool = True, desc: str = "items", unit: str = "item") -> List[dict]:
    """Run ``work(i, bar)`` for every ``keys[i]`` whose record is not in ``path`` yet,
    append each record, and return every record (old and new) in the order of ``keys``.

    ``work(i, bar)`` returns the JSON-safe record of item ``i`` (``schema.key(record)``
    must be ``keys[i]``; ``bar`` is the tqdm bar or None, for a postfix); it runs under
    the file's lock, after the finished items were read.
    Under ``accelerate launch`` the pending items are split across the processes, each
    appends to its own (locked) shard, and the main process merges the shards.
    """
    path = Path(path)
    state = distributed_state()
    world, rank = (state.num_processes, state.process_index) if state else (1, 0)
    known = {k: i for i, k in enumerate(keys)}
    if len(known) != len(keys):
        raise StepflowError("the items of a run must have distinct keys")
    with contextlib.ExitStack() as held:
        # The main process locks the results file for the whole run, before anyone reads
        # what is done, so a second run on the same file is refused instead of running
        # every item again; in a multi-process run each process also locks its shard.
        main = held.enter_context(JobFile.open(path, config, schema)) if rank == 0 else None
        if state:
            state.wait_for_everyone()
        own = shard_path(path, rank, world) if world > 1 else None
        done = set()
        for source in [path] + [s for s in shards(path) if s != own]:
            header, recs = read_jobs(source, schema, tolerate_partial=source != path)
            if header is not None:
                check_config(source, header, config, schema.what)
            done |= {schema.key(r) for r in recs}
        store = main
        if own is not None:
            store = held.enter_context(JobFile.open(own, config, schema))
            done |= {schema.key(r) for r in store.records}
        foreign = sorted((k for k in done if k not in known), key=str)
        if foreign:
            raise StepflowError(f"{path} holds items that are not part of this run (e.g. {foreign[0]!r}) although "
                                "the header matches (was the file edited?); delete the file or use another --out")
        mine: Iterable[int] = range(len(keys))
        if state:
            with state.split_between_processes(list(mine)) as part:
                mine = list(part)
        pending = [i for i in mine if keys[i] not in done]
        bar = None
        if progress and rank == 0 and pending:
            bar = held.enter_context(tqdm(total=len(pending), unit=unit, desc=desc, file=sys.stderr))
        for i in pending:
            record = work(i, bar)
            if schema.key(record) != keys[i]:
                raise StepflowError(f"item {i} returned the record of {schema.key(record)!r}, not {keys[i]!r}")
            store.append(record)
            if bar is not None:
                bar.update(1)
        if own is not None:
            store.close()
        if state:
            state.wait_for_everyone()
        if rank == 0 and shards(path):
            merge_into(path, config, schema)
        if state:
            state.wait_for_everyone()
    records = read_jobs(path, schema, tolerate_partial=True)[1]
    return sorted(records, key=lambda r: known.get(schema.key(r), len(known)))
