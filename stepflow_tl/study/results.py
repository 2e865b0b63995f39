"""The results file of a study: the study's `JobSchema` over the job runner's store
(`stepflow_tl.study.jobs`): a config header line, then one line per finished item,
appended atomically so a killed run resumes where it stopped. One writer at a time: a
run holds the file's `RunLock` from before it reads what is done to its last line.
Under ``accelerate`` each process writes a shard beside it, merged at the end. What is
guaranteed: ``docs/reliability.md``.

`ITEM_COLUMNS` is the one definition of an item's fields (docs/study.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..errors import StepflowError
from .jobs import (
    JobFile,
    JobSchema,
    PathLike,
    RunLock,
    check_config,
    lock_path,
    merge_into,
    read_jobs,
    shard_path,
    shards,
)

__all__ = ["ITEM_COLUMNS", "RESULTS_VERSION", "STUDY_SCHEMA", "ResultsFile", "RunLock", "check_config",
           "check_items_in_study", "lock_path", "merge_shards", "read_results", "shard_path", "shards"]

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


STUDY_SCHEMA = JobSchema(
    line_type="item", version=RESULTS_VERSION, what="study",
    key=lambda r: (r["problem_id"], r["condition"], r["sample"]), name=_item_name,
    check=_validate_item, fits=_check_items_fit, allow_nan=True,
)


class ResultsFile(JobFile):
    """The locked, append-only results file of one study (`JobFile` with `STUDY_SCHEMA`)."""

    @classmethod
    def open(cls, path: PathLike, config: dict, schema: JobSchema = STUDY_SCHEMA) -> "ResultsFile":
        return super().open(path, config, schema)


def read_results(path: PathLike, *, tolerate_partial: bool = False) -> Tuple[Optional[dict], List[dict]]:
    """``(header dict or None, [item dicts])`` of a study's results file.

    Raises:
        StepflowError: a line that is not JSON (other than a partial last line with
            ``tolerate_partial``), a missing header, items lacking keys, an item that
            is there twice, or an item outside the study the header describes.
    """
    return read_jobs(path, STUDY_SCHEMA, tolerate_partial=tolerate_partial)


def check_items_in_study(path: PathLike, records: List[dict], problem_ids: Sequence[str]) -> None:
    """Refuse a resumed item whose problem is not among the study's problems."""
    known = set(problem_ids)
    for r in records:
        if r["problem_id"] not in known:
            raise StepflowError(
                f"{path}: {_item_name(r)} is not one of this study's {len(known)} problems although the "
                "header matches (was the file edited?); delete the file or use another --out / results_path")


def merge_shards(path: PathLike, config: dict) -> Path:
    """Fold every shard of ``path`` into it (atomic replace, one line per item) and
    delete the shards."""
    path = Path(path)
    merge_into(path, config, STUDY_SCHEMA)
    return path
