"""Paired studies: conditions x problems x samples, streamed to a resumable JSONL file.

`evaluate(model, problems, conditions=...)` generates every (problem, condition, sample)
with `stepflow_tl.generate.generate`, grades it, and appends one JSON line per finished
item to ``results_path``. Every condition sees the same problems and, for a given
(problem, sample), the same seed whatever the batch it runs in, so the comparison with
the baseline is paired. `ablate` runs the full grid of METHOD.md section 5.

Under ``accelerate launch`` the problems are split across processes
(``accelerate.PartialState``); each process streams to its own shard file and the main
process merges the shards into ``results_path`` at the end. See ``docs/study.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import pandas as pd

from .errors import StepflowError
from .interventions import (
    MatchedLogitNoise,
    OddsEqualBridge,
    RandomBridge,
    RandomMomentum,
    StepFlow,
    StepMomentum,
)
from .problems import Problem
from .records import json_lines
from .study import ITEM_COLUMNS, StudyResult

# Named conditions; each call builds fresh intervention objects.
CONDITIONS: Dict[str, Callable[[], list]] = {
    "baseline": lambda: [],
    "stepflow": lambda: [StepFlow()],
    "oeb": lambda: [OddsEqualBridge()],
    "smi": lambda: [StepMomentum()],
    "random_bridge": lambda: [RandomBridge()],
    "matched_noise": lambda: [MatchedLogitNoise()],
    "random_momentum": lambda: [RandomMomentum()],
    # StepFlow's mechanics with both targets randomised: the control for "stepflow".
    "random_stepflow": lambda: [RandomBridge(), RandomMomentum()],
    # Placement swaps: OEB in the deep layers, SMI in the shallow layers.
    "oeb_top": lambda: [OddsEqualBridge(layers="top_quarter")],
    "smi_bottom": lambda: [StepMomentum(layers="bottom_quarter")],
}
DEFAULT_CONDITIONS = ("baseline", "stepflow", "random_stepflow")
ABLATION = tuple(CONDITIONS)

RESULTS_VERSION = 1
# Keys every item line must have (the JSONL schema, docs/study.md).
ITEM_KEYS = ("problem_id", "condition", "sample", "seed", "correct", "extracted", "gold", "output", "n_tokens",
             "stop_reason", "wall_time_s", "difficulty", "events", "n_events", "mean_kl", "saliency")
_M62 = 2 ** 62


# --------------------------------------------------------------------------- conditions
def resolve_conditions(conditions) -> Dict[str, list]:
    """``{name: [interventions]}`` from names of `CONDITIONS`, a mapping of names to
    intervention lists (or to callables returning one), or a mix in a sequence."""
    if isinstance(conditions, str):
        conditions = [c.strip() for c in conditions.split(",") if c.strip()]
    items = conditions.items() if isinstance(conditions, Mapping) else [(c, None) for c in conditions]
    out: Dict[str, list] = {}
    for name, spec in items:
        if not isinstance(name, str) or not name:
            raise StepflowError(f"condition names must be non-empty strings, got {name!r}")
        if spec is None:
            if name not in CONDITIONS:
                raise StepflowError(f"unknown condition {name!r}; expected one of {sorted(CONDITIONS)} "
                                    "or a dict {name: [interventions]}")
            spec = CONDITIONS[name]
        ivs = spec() if callable(spec) else spec
        if not isinstance(ivs, (list, tuple)):
            raise StepflowError(f"condition {name!r} must be a list of interventions, got {type(ivs).__name__}")
        out[name] = list(ivs)
    if not out:
        raise StepflowError("no conditions given")
    return out


def _describe(iv) -> str:
    """A stable description of an intervention (reprs with memory addresses are not)."""
    text = repr(iv)
    if " at 0x" in text:
        public = {k: v for k, v in sorted(vars(iv).items()) if not k.startswith("_")}
        text = f"{type(iv).__name__}({json.dumps(public, default=str, sort_keys=True)})"
    return text


# --------------------------------------------------------------------------- seeds
def item_seed(seed: int, global_index: int) -> int:
    """The seed of item ``global_index`` (``problem_index * samples + sample``): generate's
    row seed of row ``global_index`` in a call with ``seed``."""
    from .generate import row_seed

    return row_seed(seed, global_index)


def _call_seed(seed: int, first_index: int) -> int:
    """The ``seed`` for `generate` that gives its row j the seed of item ``first_index + j``.

    `generate` seeds row j with ``(seed * 1_000_003 + j * 7_919 + 12_345) mod 2**62``;
    1_000_003 is odd, hence invertible modulo 2**62, so a run of consecutive items can
    start at any index. `_generate_items` checks the seeds generate reports.
    """
    inverse = pow(1_000_003, -1, _M62)
    return ((seed * 1_000_003 + first_index * 7_919) * inverse) % _M62


# --------------------------------------------------------------------------- results file
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
    missing = [k for k in ITEM_KEYS if k not in item]
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


# --------------------------------------------------------------------------- config
def _problem_fingerprint(problems: Sequence[Problem]) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.question, p.answer, p.kind, p.choices], default=list).encode())
    return h.hexdigest()[:16]


def study_config(model, problems, conditions: Dict[str, list], **settings) -> dict:
    """The JSON-safe description of a study that decides whether a results file can be
    resumed (batch size and process count are not part of it)."""
    from .backend import adapter

    a = adapter(model)
    cfg = getattr(model, "cfg", None)
    return {
        "model": str(getattr(cfg, "model_name", type(model).__name__)),
        "model_shape": [a.n_layers, a.n_heads, a.n_kv_heads, a.d_model],
        "n_problems": len(problems),
        "problems_sha": _problem_fingerprint(problems),
        "conditions": {name: [_describe(iv) for iv in ivs] for name, ivs in conditions.items()},
        **settings,
    }


# --------------------------------------------------------------------------- running
def _event_summary(events) -> tuple:
    counts: Dict[str, int] = {}
    kls = []
    for e in events:
        counts[e.intervention] = counts.get(e.intervention, 0) + 1
        if e.kl == e.kl:  # not NaN
            kls.append(e.kl)
    return counts, (sum(kls) / len(kls) if kls else None)


def _runs(indices: List[int], batch_size: int) -> List[List[int]]:
    """Batches of consecutive indices (a gap starts a new batch, so seeds line up)."""
    batches: List[List[int]] = []
    for i in indices:
        if batches and batches[-1][-1] == i - 1 and len(batches[-1]) < batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _saliency_path(results_path: Optional[Path], condition: str, problem_id: str, sample: int) -> Optional[Path]:
    if results_path is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in problem_id)
    return results_path.parent / f"{results_path.stem}.saliency" / condition / f"{safe}__s{sample}.npz"


def _distributed_state():
    """`accelerate.PartialState` when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def _shard_path(path: Path, rank: int, world: int) -> Path:
    return path.parent / f"{path.stem}.rank{rank}-of-{world}.jsonl"


def _shards(path: Path) -> List[Path]:
    return sorted(path.parent.glob(f"{path.stem}.rank*-of-*.jsonl"))


def evaluate(
    model,
    problems: Sequence[Problem],
    *,
    conditions=DEFAULT_CONDITIONS,
    samples: int = 1,
    seed: int = 0,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    results_path=None,
    progress: bool = True,
    saliency: Union[bool, int] = False,
    saliency_loss: str = "sequence",
    prompt_style: str = "chat",
    format: str = "auto",
    system: Optional[str] = None,
    reference: str = "baseline",
) -> StudyResult:
    """Run every condition on every problem ``samples`` times and grade the outputs.

    Args:
        model: a TL model (each process of an ``accelerate launch`` loads its own).
        problems: `Problem` list (unique ids).
        conditions: names from `CONDITIONS`, or ``{name: [interventions]}`` (values may
            also be callables returning the list).
        samples: generations per (problem, condition); item (problem i, sample s) has
            seed ``item_seed(seed, i * samples + s)`` in every condition.
        max_new_tokens, do_sample, temperature, top_p: decoding (greedy by default).
        batch_size: rows per `generate` call (a batch never spans a gap in the pending
            items, so resumed and fresh runs give every item the same seed).
        results_path: JSONL file to stream to and resume from (required with several
            processes).
        progress: a tqdm bar on the main process.
        saliency: ``True``: Step-Saliency (bounded mode) of every generated trace;
            an int k: of at most k correct and k incorrect traces per condition (per
            process under accelerate); maps are saved next to ``results_path``
            (``<stem>.saliency/``).
        saliency_loss: the loss of `step_saliency`.
        prompt_style, format, system: `prompt_for` style and `generate` options.
        reference: the condition the others are paired against.

    Returns:
        `StudyResult` of every finished item (all of them, merged over processes).

    Raises:
        StepflowError: bad arguments, or ``results_path`` written with another config.
    """
    from .generate import generate
    from .grading import grade
    from .problems import prompt_for

    problems = list(problems)
    if not problems:
        raise StepflowError("no problems given")
    if not all(isinstance(p, Problem) for p in problems):
        raise StepflowError("problems must be stepflow_tl.problems.Problem objects (see load_problems)")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise StepflowError("problem ids must be unique")
    if samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise StepflowError(f"samples, batch_size and max_new_tokens must be >= 1; got {samples}, "
                            f"{batch_size}, {max_new_tokens}")
    if not isinstance(saliency, (bool, int)) or saliency is not True and saliency < 0:
        raise StepflowError(f"saliency must be True/False or a number of maps >= 0, got {saliency!r}")
    conds = resolve_conditions(conditions)
    config = study_config(
        model, problems, conds, samples=samples, seed=seed, max_new_tokens=max_new_tokens,
        do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
        prompt_style=prompt_style, format=format, system=system,
        saliency=(saliency if saliency is True else int(saliency)), saliency_loss=saliency_loss,
    )
    path = Path(results_path) if results_path is not None else None
    state = _distributed_state()
    world, rank = (state.num_processes, state.process_index) if state else (1, 0)
    if world > 1 and path is None:
        raise StepflowError("a multi-process run needs results_path (each process writes a shard next to it)")

    # The main file first (the main process creates or checks it), then every process
    # reads what is done in it and in any shard left by an earlier run.
    if rank == 0 and path is not None:
        ResultsFile.open(path, config).close()
    if state:
        state.wait_for_everyone()
    done: Dict[tuple, dict] = {}
    if path is not None:
        for source in [path] + [s for s in _shards(path) if world == 1 or s != _shard_path(path, rank, world)]:
            header, recs = read_results(source, tolerate_partial=source != path)
            if header is not None:
                check_config(source, header, config)
            for r in recs:
                done.setdefault((r["problem_id"], r["condition"], r["sample"]), r)
    mine = list(range(len(problems)))
    if state:
        with state.split_between_processes(mine) as part:
            mine = list(part)
    out_path = _shard_path(path, rank, world) if (path is not None and world > 1) else path
    store = ResultsFile.open(out_path, config) if out_path is not None else None
    if store is not None:
        for r in store.records:
            done.setdefault((r["problem_id"], r["condition"], r["sample"]), r)
    memory: List[dict] = []  # the items of a run without a results file

    fresh_maps: Dict[tuple, object] = {}
    maps_made: Dict[tuple, int] = {}
    for r in done.values():
        if r["saliency"]:
            key = (r["condition"], bool(r["correct"]))
            maps_made[key] = maps_made.get(key, 0) + 1
    pending = {name: [g for g in (i * samples + s for i in mine for s in range(samples))
                      if (ids[g // samples], name, g % samples) not in done] for name in conds}
    total = sum(len(v) for v in pending.values())
    bar = None
    if progress and rank == 0 and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="item", desc="study", file=sys.stderr)
    try:
        for name, ivs in conds.items():
            if bar is not None:
                bar.set_description(name)
            for batch in _runs(pending[name], batch_size):
                probs = [problems[g // samples] for g in batch]
                t0 = time.perf_counter()
                gens = generate(
                    model, [prompt_for(p, style=prompt_style) for p in probs], max_new_tokens=max_new_tokens,
                    do_sample=do_sample, temperature=temperature, top_p=top_p, seed=_call_seed(seed, batch[0]),
                    interventions=ivs, format=format, system=system,
                )
                wall = (time.perf_counter() - t0) / len(batch)
                for g, p, gen in zip(batch, probs, gens):
                    if gen.seed != item_seed(seed, g):
                        raise StepflowError("generate's row seeds changed formula; update evaluate._call_seed")
                    verdict = grade(gen.text, p)
                    counts, mean_kl = _event_summary(gen.events)
                    sample = g % samples
                    rel = None
                    if saliency is not False:
                        key = (name, bool(verdict.correct))
                        # A step map needs two steps; a one-step answer has none to draw.
                        wanted = saliency is True or maps_made.get(key, 0) < saliency
                        if wanted and gen.trace.n_steps >= 2:
                            rel, result = _save_saliency(model, gen, p, name, sample, verdict.correct, path,
                                                         saliency_loss)
                            fresh_maps[(p.id, name, sample)] = result
                            maps_made[key] = maps_made.get(key, 0) + 1
                    item = {
                        "problem_id": p.id, "condition": name, "sample": sample, "seed": gen.seed,
                        "correct": bool(verdict.correct), "extracted": verdict.extracted, "gold": p.answer,
                        "output": gen.text, "n_tokens": len(gen.output_ids), "stop_reason": gen.stop_reason,
                        "wall_time_s": wall, "difficulty": p.difficulty, "events": counts,
                        "n_events": sum(counts.values()), "mean_kl": mean_kl, "saliency": rel,
                    }
                    if store is not None:
                        store.append(item)
                    else:
                        memory.append(item)
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        if store is not None:
            store.close()

    if state:
        state.wait_for_everyone()
    if path is not None:
        if rank == 0 and _shards(path):
            merge_shards(path, config)
        if state:
            state.wait_for_everyone()
        _, records = read_results(path)
    else:
        records = memory
    return _result(records, config, list(conds), reference, path, fresh_maps)


def _save_saliency(model, gen, problem, condition, sample, correct, path, loss) -> tuple:
    """Step-Saliency (bounded mode) of a generated trace, saved before the item line is
    written so a finished item always has its map. Returns (the path relative to the
    results file's directory, or "memory" without a results file; the result)."""
    from .saliency import step_saliency

    result = step_saliency(model, gen.trace, loss=loss, mode="bounded")
    result.meta.update(problem_id=problem.id, condition=condition, sample=sample, correct=bool(correct))
    target = _saliency_path(path, condition, problem.id, sample)
    if target is None:
        return "memory", result
    result.save(target)
    return str(target.relative_to(path.parent)), result


def _merged_records(path: Path, config: dict) -> List[dict]:
    seen: Dict[tuple, dict] = {}
    for source in [path] + _shards(path):
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
    for shard in _shards(path):
        shard.unlink()
    return path


def _result(records: List[dict], config: dict, conditions: List[str], reference: str,
            path: Optional[Path], fresh_maps: Optional[dict] = None) -> StudyResult:
    order = {c: i for i, c in enumerate(conditions)}
    frame = pd.DataFrame([{k: r.get(k) for k in ITEM_COLUMNS} for r in records], columns=ITEM_COLUMNS)
    if not frame.empty:
        frame["_c"] = frame["condition"].map(order)
        frame = frame.sort_values(["_c", "problem_id", "sample"], kind="stable").drop(columns="_c")
        frame = frame.reset_index(drop=True)
        frame["correct"] = frame["correct"].astype(bool)
    maps = {}
    for r in records:
        rel = r.get("saliency")
        key = (r["problem_id"], r["condition"], int(r["sample"]))
        if not rel:
            continue
        if fresh_maps and key in fresh_maps:
            maps[key] = fresh_maps[key]
        elif path is not None and rel != "memory":
            from .saliency import StepSaliency

            maps[key] = StepSaliency.load(path.parent / rel)
    return StudyResult(items=frame, config=config, conditions=conditions, reference=reference,
                       saliency=maps, results_path=path)


def load_study(results_path, *, reference: str = "baseline") -> StudyResult:
    """A `StudyResult` from a results file (finished or not), without a model."""
    path = Path(results_path)
    if not path.is_file():
        raise StepflowError(f"results file {str(path)!r} does not exist")
    header, records = read_results(path, tolerate_partial=True)
    if header is None:
        raise StepflowError(f"{path} has no config header")
    # The header's conditions are in key order; the reference goes first.
    names = sorted(header["conditions"], key=lambda c: c != reference)
    return _result(records, header, names, reference, path)


def ablate(model, problems: Sequence[Problem], **kwargs) -> StudyResult:
    """`evaluate` on the full grid `ABLATION`: baseline, StepFlow, OEB only, SMI only,
    the matched controls and the placement swaps."""
    kwargs.setdefault("conditions", ABLATION)
    return evaluate(model, problems, **kwargs)


# --------------------------------------------------------------------------- command line
def _add_study_arguments(parser, default_conditions: Sequence[str]) -> None:
    from .cli import _add_model_args

    parser.add_argument("problems", nargs="?", default="builtin",
                        help="problem file (.jsonl/.json/.csv/.parquet, see docs/problems.md) or 'builtin' "
                        "(the built-in suite, see --levels/--n-per-level)")
    _add_model_args(parser)
    parser.add_argument("--conditions", default=",".join(default_conditions),
                        help=f"comma-separated names from: {', '.join(CONDITIONS)}")
    parser.add_argument("--levels", default="1,2,3", help="built-in suite levels (comma-separated)")
    parser.add_argument("--n-per-level", type=int, default=10, help="built-in suite problems per level")
    parser.add_argument("--suite-seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--do-sample", action="store_true", help="nucleus sampling instead of greedy")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-style", choices=("chat", "r1"), default="chat")
    parser.add_argument("--format", choices=("auto", "r1", "plain", "harmony"), default="auto")
    parser.add_argument("--saliency", type=int, default=0,
                        help="Step-Saliency maps of up to N correct and N incorrect traces per condition "
                        "(-1: every trace; 0: none)")
    parser.add_argument("--results", default=None, help="results JSONL (default: OUT/results.jsonl); resumed if it exists")
    parser.add_argument("--out", required=True, help="directory for report.html and the CSV files")
    parser.add_argument("--no-progress", action="store_true")


def add_eval_arguments(parser) -> None:
    """Arguments of ``stepflow-tl eval`` (default conditions: baseline, StepFlow, its random control)."""
    _add_study_arguments(parser, DEFAULT_CONDITIONS)


def add_ablate_arguments(parser) -> None:
    """Arguments of ``stepflow-tl ablate`` (default conditions: the full grid)."""
    _add_study_arguments(parser, ABLATION)


def problems_from_args(args) -> List[Problem]:
    """The problems named on the command line."""
    from .problems import builtin_suite, load_problems

    if args.problems == "builtin":
        try:
            levels = tuple(int(x) for x in args.levels.split(",") if x.strip())
        except ValueError:
            raise StepflowError(f"--levels must be comma-separated integers, got {args.levels!r}") from None
        problems = builtin_suite(n_per_level=args.n_per_level, levels=levels, seed=args.suite_seed)
    else:
        problems = load_problems(args.problems)
    return problems[: args.limit] if args.limit else problems


def run_study_cli(args, *, title: Optional[str] = None, notes: str = "") -> StudyResult:
    """Load the model (per process under accelerate), run the study, and on the main
    process write report.html and the CSV files into ``args.out``."""
    from .cli import _load

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.device is None:
        from accelerate import PartialState

        args.device = str(PartialState().device)
    out = Path(args.out)
    results = Path(args.results) if args.results else out / "results.jsonl"
    problems = problems_from_args(args)
    model = _load(args)
    result = evaluate(
        model, problems, conditions=args.conditions, samples=args.samples, seed=args.seed,
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, batch_size=args.batch_size, results_path=results, progress=not args.no_progress,
        saliency=True if args.saliency < 0 else args.saliency, prompt_style=args.prompt_style, format=args.format,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        paths = result.to_csv(out)
        report = result.save_html(out / "report.html", title=title, notes=notes)
        print(f"report: {report}")
        print(f"csv: {', '.join(str(p) for p in paths.values())}")
        print(f"results: {results}")
        print(_headline(result))
    return result


def _headline(result: StudyResult) -> str:
    s = result.summary()
    lines = []
    for row in s.itertuples(index=False):
        line = (f"{row.condition:>16}: {row.n_correct}/{row.n} correct = {row.accuracy:.1%} "
                f"(Wilson 95% CI {row.acc_low:.1%}-{row.acc_high:.1%})")
        if row.condition != result.reference and row.n_paired:
            line += (f"; vs {result.reference}: {row.diff:+.1%} [{row.diff_low:+.1%}, {row.diff_high:+.1%}], "
                     f"McNemar p={row.mcnemar_p:.3g}")
        lines.append(line)
    return "\n".join(lines)


def run_eval_cli(args) -> int:
    """``stepflow-tl eval``."""
    run_study_cli(args)
    return 0


def run_ablate_cli(args) -> int:
    """``stepflow-tl ablate``."""
    run_study_cli(args)
    return 0


def main(argv=None) -> int:
    """``python -m stepflow_tl.evaluate {eval,ablate} ...`` (the same as ``stepflow-tl eval/ablate``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stepflow_tl.evaluate")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_arguments(sub.add_parser("eval", help="paired study of a few conditions"))
    add_ablate_arguments(sub.add_parser("ablate", help="the full ablation grid"))
    args = parser.parse_args(argv)
    try:
        return run_eval_cli(args) if args.command == "eval" else run_ablate_cli(args)
    except StepflowError as exc:
        print(f"stepflow-tl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
