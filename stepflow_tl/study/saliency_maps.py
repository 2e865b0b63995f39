"""Step-Saliency maps of a file (or list) of traces, as a resumable run of the job
runner (`stepflow_tl.study.jobs`): what ``stepflow-tl saliency`` computes, callable
from Python.

`saliency_maps(model, traces, out)` writes ``out/trace<i>.npz``/``.json`` per trace and
one line per trace to ``out/results.jsonl`` (its diagnostics, or why the loss could
not measure it). The file is locked for the whole run, a rerun of the same config
resumes, another config is refused, and an ``out`` holding maps but no results file is
refused, so one directory never mixes two runs' maps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import pandas as pd

from ..checks import check_bool, check_int
from ..errors import StepflowError
from ..saliency.compute import MODES, SALIENCY_POOLS, step_saliency
from ..saliency.diagnostics import diagnose
from ..saliency.losses import LOSSES, loss_target_positions
from ..saliency.maps import StepSaliency
from ..saliency.rules import TargetSpec, check_rule
from ..tl.adapter import TLModel, adapter
from ..tl.models import software_versions
from ..traces.trace import Trace, load_traces
from .jobs import JobSchema, read_jobs, refuse_foreign_files, run_jobs, traces_within_header

SALIENCY_VERSION = 1
# What a saliency run writes into its directory (a fresh run refuses a directory holding them).
OWNED_FILES = ("trace*.npz", "trace*.json", "trace*.csv", "trace*.graphml", "metrics.csv", "skipped.csv",
               "compare.csv", "receiver_heads.csv")


def _check_record(record: dict, path, where: str) -> None:
    index = record.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or "skipped" not in record or "metrics" not in record:
        raise StepflowError(f"{path}, {where}: a saliency record needs 'index', 'skipped' and 'metrics' (edited by "
                            "hand?); delete the file or use another --out to start over")


SALIENCY_SCHEMA = JobSchema(
    line_type="map", version=SALIENCY_VERSION, what="saliency run", key=lambda r: int(r["index"]),
    name=lambda r: f"trace {r['index']}", check=_check_record, fits=traces_within_header, allow_nan=True,
)


def map_path(out: Path, index: int) -> Path:
    """Where the map of trace ``index`` lives (``.npz``; its ``.json`` beside it)."""
    return Path(out) / f"trace{index:04d}.npz"


@dataclass
class SaliencyMaps:
    """The records of a saliency run (`saliency_maps`) and where its maps are.

    Attributes:
        records: one per trace, in order: ``index``, ``record``, ``id``, ``correct``,
            ``skipped`` (why the loss could not measure it, or None), ``metrics`` (the
            row of ``metrics.csv``: `Diagnostics.summary` with ``trace`` and ``record``).
        config: the run's config (the header of ``results.jsonl``).
        directory: the run's directory.
        traces: the traces (None when read back by `load_saliency_maps`).
    """

    records: List[dict]
    config: dict
    directory: Path
    traces: Optional[List[Trace]] = None

    @property
    def measured(self) -> List[dict]:
        return [r for r in self.records if r["skipped"] is None]

    @property
    def skipped(self) -> List[dict]:
        return [r for r in self.records if r["skipped"] is not None]

    def metrics(self) -> pd.DataFrame:
        """One row per measured trace (what ``metrics.csv`` holds)."""
        return pd.DataFrame([r["metrics"] for r in self.measured])

    def load(self, index: int) -> StepSaliency:
        """The map of trace ``index``."""
        return StepSaliency.load(map_path(self.directory, index))


def _traces_sha(traces: Sequence[Trace]) -> str:
    h = hashlib.sha256()
    for t in traces:
        h.update(t.token_ids.numpy().tobytes())
        h.update(t.token_steps.numpy().tobytes())
    return h.hexdigest()[:16]


def _plain(value: Any) -> Any:
    """JSON-safe scalars (numpy numbers as Python numbers)."""
    return value.item() if hasattr(value, "item") else value


def saliency_maps(
    model: TLModel,
    traces: Union[str, Path, Sequence[Trace]],
    out: Union[str, Path],
    *,
    loss: str = "sequence",
    pool: str = "mean",
    mode: str = "auto",
    rule: str = "abs",
    target: TargetSpec = None,
    split: str = "blank_lines",
    split_summary: bool = False,
    max_tokens: Optional[int] = None,
    truncate: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
) -> SaliencyMaps:
    """Step-Saliency of every trace into ``out`` (resumable; see the module docstring).

    Args:
        traces: a trace file (JSON Lines or JSON records with ``question`` and
            ``output``, read with `load_traces` and ``split``/``split_summary``/
            ``max_tokens``/``truncate``) or traces (split already).
        loss, pool, mode, rule, target: of `step_saliency` (``mode="auto"``: see
            `auto_mode`; each map's metadata says which mode and tile side ran). The
            diagnostics of a ``rule="signed"`` map are those of its magnitude.
        limit: only the first ``limit`` traces.

    A trace whose loss has nothing to measure (``loss="answer"`` without an answer) is
    recorded as skipped, with the reason; the others are still computed. Under
    ``accelerate launch`` the traces are split across processes (one model each).

    Raises:
        StepflowError: bad arguments, no traces, ``out`` written by another saliency
            run (another config) or being written by one now, or ``out`` holding maps
            without a results file.
    """
    if loss not in LOSSES:
        raise StepflowError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if pool not in SALIENCY_POOLS:
        raise StepflowError(f"pool must be one of {SALIENCY_POOLS}, got {pool!r}")
    if mode not in MODES:
        raise StepflowError(f"mode must be one of {MODES}, got {mode!r}")
    check_rule(rule)
    truncate = check_bool("truncate", truncate)
    if limit is not None:
        limit = check_int("limit", limit, low=1)
    if isinstance(traces, (str, Path)):
        source = str(traces)
        traces = load_traces(traces, model, max_tokens=max_tokens, truncate=truncate, split=split,
                             split_summary=split_summary)
    else:
        if split != "blank_lines" or split_summary:
            raise StepflowError("split= and split_summary= cut a trace file's records; traces given as Trace "
                                "objects are split already (make them with the split you want)")
        source, traces = None, list(traces)
    if not traces:
        raise StepflowError(f"{source or 'traces'}: no traces to map")
    traces = traces[:limit] if limit else traces
    for i, trace in enumerate(traces):
        trace.meta.setdefault("trace_id", i)
    out = Path(out)
    path = out / "results.jsonl"
    refuse_foreign_files(out, path, OWNED_FILES, "saliency run")
    a = adapter(model)
    config = {
        "model": str(getattr(model.cfg, "model_name", type(model).__name__)),
        "model_shape": [a.n_layers, a.n_heads, a.n_kv_heads, a.d_model],
        "dtype": str(a.dtype).removeprefix("torch."), "software": software_versions(),
        "n_traces": len(traces), "traces_sha": _traces_sha(traces), "loss": loss, "pool": pool, "mode": mode,
        "rule": rule, "target": None if target is None else str(target), "split": split,
        "split_summary": split_summary, "max_tokens": max_tokens,
        "truncate": truncate,
    }

    def one(i: int, bar) -> dict:
        trace = traces[i]
        record = {"index": i, "record": _plain(trace.meta.get("record_index", i)),
                  "id": _plain(trace.meta.get("id", trace.meta.get("trace_id"))),
                  "correct": trace.meta.get("correct"), "skipped": None, "metrics": None}
        try:
            # the loss has something to score (an explicit logit target needs no answer)
            positions = None if target is not None else loss_target_positions(loss, trace)
        except StepflowError as exc:
            return {**record, "skipped": str(exc)}
        result = step_saliency(model, trace, loss=loss, pool=pool, mode=mode, rule=rule, target=target,
                               loss_positions=positions)
        result.save(map_path(out, i).with_suffix(""))
        # the diagnostics read magnitudes: signed maps get them from |maps|
        diag = diagnose(replace(result, maps=result.maps.abs()) if result.rule == "signed" else result)
        summary = {k: _plain(v) for k, v in diag.summary().items()}
        record["metrics"] = {"trace": i, "record": record["record"], "rule": result.rule, **summary}
        return record

    records = run_jobs(path, config, SALIENCY_SCHEMA, list(range(len(traces))), one, progress=progress,
                       desc="step saliency", unit="trace")
    return SaliencyMaps(records=records, config=config, directory=out, traces=traces)


def load_saliency_maps(directory: Union[str, Path]) -> SaliencyMaps:
    """The saliency run in ``directory`` (finished or not), without a model."""
    directory = Path(directory)
    path = directory / "results.jsonl"
    if not path.is_file():
        raise StepflowError(f"{path} does not exist; run `stepflow-tl saliency` first")
    header, records = read_jobs(path, SALIENCY_SCHEMA, tolerate_partial=True)
    return SaliencyMaps(records=sorted(records, key=lambda r: r["index"]), config=header, directory=directory)
