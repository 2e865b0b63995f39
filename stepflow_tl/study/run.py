"""Paired studies: conditions x problems x samples, streamed to a resumable JSONL file.

`evaluate(model, problems, conditions=...)` generates every (problem, condition, sample)
with `stepflow_tl.interventions.generate`, grades it, and appends one JSON line per finished
item to ``results_path``, which it locks for the whole run (one writer per file). Every condition sees the same problems and, for a given
(problem, sample), the same seed whatever the batch it runs in, so the comparison with
the baseline is paired. `ablate` runs the full grid of docs/method.md (ablations).

Under ``accelerate launch`` the problems are split across processes
(``accelerate.PartialState``); each process streams to its own shard file and the main
process merges the shards into ``results_path`` at the end. See ``docs/study.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import pandas as pd
from tqdm.auto import tqdm

from ..checks import check_bool, check_int, check_real
from ..engines.vllm import VLLMEngine
from ..errors import StepflowError
from ..interventions.generate import Generation, generate, row_seed, seed_for_rows
from ..saliency.compute import step_saliency
from ..saliency.losses import LOSSES
from ..saliency.maps import StepSaliency
from ..tl.adapter import TLModel, adapter, tokenizer_of
from ..traces.formats import SPLIT_CHOICES, render_prompt, resolve_format, resolve_split
from .conditions import ABLATION, ConditionSpec, DEFAULT_CONDITIONS, describe, resolve_conditions
from .grading import grade
from .jobs import distributed_state, software_versions
from .problems import Problem, prompt_for
from .result import StudyResult
from .results import (
    ITEM_COLUMNS,
    ResultsFile,
    check_config,
    check_items_in_study,
    merge_shards,
    read_results,
    shard_path,
    shards,
)


def item_seed(seed: int, global_index: int) -> int:
    """The seed of item ``global_index`` (``problem_index * samples + sample``): generate's
    row seed of row ``global_index`` in a call with ``seed``."""
    return row_seed(seed, global_index)


# --------------------------------------------------------------------------- config
def _problem_fingerprint(problems: Sequence[Problem]) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.question, p.answer, p.kind, p.choices], default=list).encode())
    return h.hexdigest()[:16]


def _software() -> Dict[str, str]:
    """Versions of the packages whose numerics decide a generated token."""
    return software_versions()


def study_config(model: Union[TLModel, VLLMEngine], problems: Sequence[Problem], conditions: Dict[str, list], **settings: Any) -> dict:
    """The JSON-safe description of a study that decides whether a results file can be
    resumed (batch size, device and process count are not part of it). It names the
    model's dtype and the versions of torch, transformers and TransformerLens, so items
    made by other numerics are never mixed into one paired comparison."""
    if isinstance(model, VLLMEngine):
        # Another engine is other numerics: its items never pair with the TL engine's.
        return {
            "model": model.name, "model_shape": [model.n_layers, model.n_heads, model.n_kv_heads, model.d_model],
            "dtype": str(model.dtype).removeprefix("torch."), "software": {**_software(), **model.software()},
            "engine": "vllm", "n_problems": len(problems), "problems_sha": _problem_fingerprint(problems),
            "conditions": {name: [describe(iv) for iv in ivs] for name, ivs in conditions.items()}, **settings,
        }
    a = adapter(model)
    cfg = getattr(model, "cfg", None)
    return {
        "model": str(getattr(cfg, "model_name", type(model).__name__)),
        "model_shape": [a.n_layers, a.n_heads, a.n_kv_heads, a.d_model],
        "dtype": str(a.dtype).removeprefix("torch."),
        "software": _software(),
        "n_problems": len(problems),
        "problems_sha": _problem_fingerprint(problems),
        "conditions": {name: [describe(iv) for iv in ivs] for name, ivs in conditions.items()},
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
    """Batches of consecutive indices (a gap starts a new batch, so seeds line up): the
    calls a study makes to a vLLM engine."""
    batches: List[List[int]] = []
    for i in indices:
        if batches and batches[-1][-1] == i - 1 and len(batches[-1]) < batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def safe_file_name(raw: str, keep: int = 48) -> str:
    """A portable file name for ``raw``: up to ``keep`` of its ASCII letters, digits,
    ``-`` and ``_`` (anything else becomes ``_``), then 10 hex digits of the SHA-256 of
    the raw text. Ids that sanitise alike (``p/1`` and ``p_1``, or ``P1`` and ``p1`` on a
    case-insensitive disk) keep apart; ``/``, ``..`` and 300-character ids stay one
    short name inside the directory."""
    readable = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in raw)[:keep]
    return f"{readable}-{hashlib.sha256(raw.encode('utf-8')).hexdigest()[:10]}"


def _saliency_path(results_path: Optional[Path], condition: str, problem_id: str, sample: int) -> Optional[Path]:
    if results_path is None:
        return None
    return (results_path.parent / f"{results_path.stem}.saliency" / safe_file_name(condition)
            / f"{safe_file_name(problem_id)}__s{sample}.npz")


def evaluate(
    model: Union[TLModel, VLLMEngine],
    problems: Sequence[Problem],
    *,
    conditions: ConditionSpec = DEFAULT_CONDITIONS,
    samples: int = 1,
    seed: int = 0,
    max_new_tokens: Union[int, str] = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    results_path: Optional[Union[str, Path]] = None,
    progress: bool = True,
    saliency: Union[bool, int] = False,
    saliency_loss: str = "sequence",
    prompt_style: str = "chat",
    format: str = "auto",
    system: Optional[str] = None,
    reference: str = "baseline",
    split: str = "auto",
    split_summary: bool = False,
) -> StudyResult:
    """Run every condition on every problem ``samples`` times and grade the outputs.

    Args:
        model: a TL model (each process of an ``accelerate launch`` loads its own), or a
            `VLLMEngine` to generate with vLLM (docs/vllm.md; no saliency maps then).
        problems: `Problem` list (unique ids).
        conditions: names from `CONDITIONS`, or ``{name: [interventions]}`` (values may
            also be callables returning the list).
        samples: generations per (problem, condition); item (problem i, sample s) has
            seed ``item_seed(seed, i * samples + s)`` in every condition.
        max_new_tokens, do_sample, temperature, top_p: decoding (greedy by default);
            ``max_new_tokens="benchmark"``: each problem's own budget,
            ``meta["max_new_tokens"]`` (`load_problems(..., benchmark=...)`).
        batch_size: rows decoded at once. Each condition's pending items run in one
            `generate` call: a finished item leaves the batch and the next waiting one
            joins with its own seed, so every item's output is the same for any batch
            size and whichever items run beside it (a resumed run included). With a
            `VLLMEngine`, one call per run of up to ``batch_size`` consecutive items.
        results_path: JSONL file to stream to and resume from (required with several
            processes).
        progress: a tqdm bar on the main process.
        saliency: ``True``: Step-Saliency (``mode="auto"``: tiled where the model's
            attention allows it, else dense where it fits in memory, see
            `saliency.compute.auto_mode`) of every generated trace;
            an int k: of at most k correct and k incorrect traces per condition (per
            process under accelerate); maps are saved next to ``results_path``
            (``<stem>.saliency/``).
        saliency_loss: the loss of `step_saliency`.
        prompt_style, format, system: `prompt_for` style and `generate` options.
        split: how generated traces are cut into steps (`generate`'s ``split``, by name;
            ``"auto"`` is resolved once for the model's format, and the config records
            the split and format used as ``split`` and ``trace_format``).
        split_summary: also split the summary into steps (the authors' convention;
            recorded in the config only when on, so older results files still resume).
        reference: the condition the others are paired against.

    Returns:
        `StudyResult` of every finished item (all of them, merged over processes).

    Raises:
        StepflowError: bad arguments; ``results_path`` written with another config,
            holding duplicated or foreign items, or being written by another run (its
            `RunLock` is held; see ``docs/reliability.md``).
    """
    problems = list(problems)
    if not problems:
        raise StepflowError("no problems given")
    if not all(isinstance(p, Problem) for p in problems):
        raise StepflowError("problems must be stepflow_tl.Problem objects (see load_problems)")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise StepflowError("problem ids must be unique")
    budgets = None
    if max_new_tokens == "benchmark":
        lacking = [p.id for p in problems if not isinstance(p.meta.get("max_new_tokens"), int)]
        if lacking:
            raise StepflowError(f"max_new_tokens='benchmark' needs a budget on every problem; {lacking[:3]} have "
                                "none (load them with load_problems(..., benchmark='aime'/'gpqa'/'auto'))")
        budgets = {p.id: p.meta["max_new_tokens"] for p in problems}
        max_new_tokens = max(budgets.values())
    samples, batch_size, max_new_tokens = (check_int(name, value, low=1) for name, value in (
        ("samples", samples), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)))
    seed = check_int("seed", seed)
    do_sample = check_bool("do_sample", do_sample)
    temperature = check_real("temperature", temperature, low=0.0, low_open=True)
    top_p = check_real("top_p", top_p, low=0.0, high=1.0, low_open=True)
    if saliency is not True and saliency is not False:
        saliency = check_int("saliency (True, False or a number of maps >= 0)", saliency, low=0)
    if saliency_loss not in LOSSES:
        raise StepflowError(f"saliency_loss must be one of {list(LOSSES)}, got {saliency_loss!r}")
    conds = resolve_conditions(conditions)
    on_vllm = isinstance(model, VLLMEngine)
    if on_vllm and saliency is not False and saliency != 0:
        raise StepflowError("saliency maps need a TransformerLens model; evaluate on a VLLMEngine without "
                            "saliency and map the saved traces with the TL engine")
    if on_vllm and split_summary:
        raise StepflowError("split_summary is not in the vLLM engine yet; use the TL engine or drop it")
    if split not in SPLIT_CHOICES:
        raise StepflowError(f"split must be one of {SPLIT_CHOICES} (a study records it by name), got {split!r}")
    tok = tokenizer_of(model)
    trace_format = resolve_format(tok, render_prompt(tok, prompt_for(problems[0], style=prompt_style), system),
                                  format)
    split = resolve_split(split, trace_format)
    config = study_config(
        model, problems, conds, samples=samples, seed=seed,
        max_new_tokens=max_new_tokens if budgets is None else {"benchmark": budgets},
        do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
        prompt_style=prompt_style, format=format, system=system, trace_format=trace_format, split=split,
        saliency=(saliency if saliency is True else int(saliency)), saliency_loss=saliency_loss,
        **({"split_summary": True} if split_summary else {}),
    )
    path = Path(results_path) if results_path is not None else None
    state = distributed_state()
    world, rank = (state.num_processes, state.process_index) if state else (1, 0)
    if world > 1 and path is None:
        raise StepflowError("a multi-process run needs results_path (each process writes a shard next to it)")

    with contextlib.ExitStack() as held:
        # The main process locks the results file for the whole run, before anyone reads
        # what is done, so a second study on the same file is refused instead of running
        # every item again; in a multi-process run each process also locks its shard.
        main_store = held.enter_context(ResultsFile.open(path, config)) if rank == 0 and path is not None else None
        if state:
            state.wait_for_everyone()
        done: Dict[tuple, dict] = {}
        if path is not None:
            own = shard_path(path, rank, world) if world > 1 else None
            for source in [path] + [s for s in shards(path) if s != own]:
                header, recs = read_results(source, tolerate_partial=source != path)
                if header is not None:
                    check_config(source, header, config)
                check_items_in_study(source, recs, ids)
                for r in recs:
                    done.setdefault((r["problem_id"], r["condition"], r["sample"]), r)
        mine = list(range(len(problems)))
        if state:
            with state.split_between_processes(mine) as part:
                mine = list(part)
        store = main_store
        if path is not None and world > 1:
            store = held.enter_context(ResultsFile.open(shard_path(path, rank, world), config))
            check_items_in_study(store.path, store.records, ids)
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
            bar = held.enter_context(tqdm(total=total, unit="item", desc="study", file=sys.stderr))
        for name, ivs in conds.items():
            if bar is not None:
                bar.set_description(name)
            order = pending[name]
            if not order:
                continue
            probs = [problems[g // samples] for g in order]
            finished: Dict[int, Generation] = {}
            deferred: List[tuple] = []  # items whose map is drawn once generation is over
            flushed = [0, time.perf_counter()]  # items recorded in order; when the last one was

            def record(g, p, gen, verdict, rel, wall):
                counts, mean_kl = _event_summary(gen.events)
                item = {
                    "problem_id": p.id, "condition": name, "sample": g % samples, "seed": gen.seed,
                    "correct": bool(verdict.correct), "extracted": verdict.extracted, "gold": p.answer,
                    "output": gen.text, "n_tokens": len(gen.output_ids), "stop_reason": gen.stop_reason,
                    "wall_time_s": wall, "difficulty": p.difficulty, "events": counts,
                    "n_events": sum(counts.values()), "mean_kl": mean_kl, "saliency": rel,
                    "prompt_ids": list(gen.prompt_ids), "output_ids": list(gen.output_ids),
                }
                if store is not None:
                    store.append(item)
                else:
                    memory.append(item)
                if bar is not None:
                    bar.update(1)

            def on_finish(j, gen):
                """Rows finish out of order; items are graded and recorded in item order (so
                which items get a map does not depend on the batch), each as soon as every
                earlier one has finished. (Called within this condition's `generate` call.)"""
                finished[j] = gen
                while flushed[0] in finished:
                    k = flushed[0]
                    g, p, gen = order[k], probs[k], finished.pop(k)
                    if gen.seed != item_seed(seed, g):
                        raise StepflowError("generate reported other row seeds than the study's item seeds")
                    now = time.perf_counter()
                    # Generation's wall time, split between items as they are recorded: the
                    # items' times sum to the condition's generation time.
                    wall, flushed[0], flushed[1] = now - flushed[1], k + 1, now
                    verdict = grade(gen.text, p)
                    key = (name, bool(verdict.correct))
                    # A step map needs two steps; a one-step answer has none to draw.
                    wanted = saliency is not False and (saliency is True or maps_made.get(key, 0) < saliency)
                    if wanted and gen.trace.n_steps >= 2:
                        maps_made[key] = maps_made.get(key, 0) + 1
                        deferred.append((g, p, gen, verdict, wall))
                    else:
                        record(g, p, gen, verdict, None, wall)

            options = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, interventions=ivs,
                           format=trace_format, system=system, split=split,
                           **({"split_summary": True} if split_summary else {}))

            def budget(items):
                return max_new_tokens if budgets is None else [budgets[problems[g // samples].id] for g in items]

            if on_vllm:
                # vLLM batches continuously inside a call; a call takes a run of consecutive
                # items, whose seeds `seed_for_rows` lines up.
                where = {g: j for j, g in enumerate(order)}
                for batch in _runs(order, batch_size):
                    gens = model.generate([prompt_for(problems[g // samples], style=prompt_style) for g in batch],
                                          max_new_tokens=budget(batch), seed=seed_for_rows(seed, batch[0]),
                                          **options)
                    for g, gen in zip(batch, gens):
                        on_finish(where[g], gen)
            else:
                generate(model, [prompt_for(p, style=prompt_style) for p in probs], max_new_tokens=budget(order),
                         seed=seed, row_seeds=[item_seed(seed, g) for g in order], batch_size=batch_size,
                         on_finish=on_finish, **options)
            # Maps need the model without generation's hooks; an item's line is written
            # after its map, so a recorded item always has its map.
            for g, p, gen, verdict, wall in deferred:
                rel, result = _save_saliency(model, gen, p, name, g % samples, verdict.correct, path,
                                             saliency_loss)
                fresh_maps[(p.id, name, g % samples)] = result
                record(g, p, gen, verdict, rel, wall)

        if state:
            state.wait_for_everyone()
        if path is None:
            records = memory
        else:
            if rank == 0 and shards(path):
                merge_shards(path, config)
            if state:
                state.wait_for_everyone()
            _, records = read_results(path)
    return _result(records, config, list(conds), reference, path, fresh_maps)


def _save_saliency(model, gen, problem, condition, sample, correct, path, loss) -> tuple:
    """Step-Saliency (``mode="auto"``, so long traces are tiled) of a generated trace,
    saved before the item line is written so a finished item always has its map. Returns
    (the path relative to the results file's directory, or "memory" without a results
    file; the result)."""
    result = step_saliency(model, gen.trace, loss=loss, mode="auto")
    result.meta.update(problem_id=problem.id, condition=condition, sample=sample, correct=bool(correct))
    target = _saliency_path(path, condition, problem.id, sample)
    if target is None:
        return "memory", result
    result.save(target)
    return str(target.relative_to(path.parent)), result


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
            maps[key] = StepSaliency.load(path.parent / rel)
    return StudyResult(items=frame, config=config, conditions=conditions, reference=reference,
                       saliency=maps, results_path=path)


def load_study(results_path: Union[str, Path], *, reference: str = "baseline") -> StudyResult:
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


def ablate(model: Union[TLModel, VLLMEngine], problems: Sequence[Problem], **kwargs: Any) -> StudyResult:
    """`evaluate` on the full grid `ABLATION`: baseline, StepFlow, OEB only, SMI only,
    the matched controls and the placement swaps."""
    kwargs.setdefault("conditions", ABLATION)
    return evaluate(model, problems, **kwargs)
