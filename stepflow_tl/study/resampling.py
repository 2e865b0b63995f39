"""Counterfactual importance by resampling (Thought Anchors' "resampling importance").

For a trace with thinking steps ``1..n``, prefix ``p`` is the trace's text up to the
start of thinking step ``p + 1`` (prefix 0: the prompt and nothing of the thinking; prefix
``n``: the whole thinking). From every prefix, ``n_samples`` continuations are sampled
with our `generate` (``chat=False``: the prefix is the prompt text, the question is the
problem's) and graded as in studies (`grading.grade`). Step ``i``'s continuations
"without" it start at prefix ``i - 1`` (resampled from just before it) and "with" it at
prefix ``i`` (kept), so, as in Thought Anchors, ``n + 1`` prefixes serve ``n`` steps:

- ``importance_accuracy[i] = accuracy(prefix i) - accuracy(prefix i - 1)``;
- ``importance_kl[i] = KL(answers without || answers with)`` over the extracted answers
  (unanswered rollouts count as one answer, "none"), Laplace-smoothed (``alpha=1``:
  Thought Anchors default to 1e-9, which makes a KL of tens where one side misses an answer);
- ``matrix[i, j]`` (``j > i``): the share of continuations with step ``i`` that contain step
  ``j`` minus the share without it, a continuation "containing" step ``j`` when one of its
  steps matches it (``difflib`` ratio >= ``match``, on lower-cased, space-normalised text).
  Thought Anchors match with sentence embeddings; a lexical match is the model-free stand-in.

Rollout ``g = prefix * n_samples + sample`` has the seed ``row_seed(seed, g)``, the study's
row-seed rule, so every rollout replays alone, whatever batch it runs in. All pending
rollouts run in one refilling `generate` call (``batch_size`` rows at once, a finished
row's place taken by the next rollout at once; the rollouts of a prefix share its
prefill). They go to a study results file (`results.ResultsFile`: config header, one
fsynced line per rollout, written in rollout order as soon as every earlier rollout has
finished, a lock), so an interrupted run resumes where it stopped; the file's items use
the study item schema with ``condition = "prefix<p>"``.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import pandas as pd

from ..checks import check_int, check_real
from ..errors import StepflowError
from ..interventions.generate import generate
from ..saliency.graph import step_importance_records
from ..stats import spearman
from ..tl.adapter import TLModel
from ..traces.trace import Trace
from .grading import grade
from .problems import Problem
from .results import ResultsFile, read_results
from .run import item_seed

MATCH = 0.8


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _kl(without: List[str], with_: List[str], alpha: float = 1.0) -> float:
    """KL(P_without || P_with) of two answer samples, Laplace-smoothed over their union."""
    a, b = Counter(without), Counter(with_)
    support = sorted(set(a) | set(b))
    na, nb, v = sum(a.values()), sum(b.values()), len(support)
    total = 0.0
    for answer in support:
        p = (a[answer] + alpha) / (na + alpha * v)
        q = (b[answer] + alpha) / (nb + alpha * v)
        total += p * math.log(p / q)
    return max(0.0, total)


@dataclass
class ResamplingResult:
    """Resampling importance of the thinking steps of one trace.

    Attributes:
        steps: per thinking step: ``step`` (trace step index), ``label``, ``text``,
            ``accuracy_without``, ``accuracy_with``, ``importance_accuracy``, ``importance_kl``.
        rollouts: one row per continuation: ``prefix``, ``sample``, ``seed``, ``correct``,
            ``extracted``, ``output``.
        matrix: ``[step, step]`` step-to-step importance (rows: source, columns: later target).
        config: what was run.
    """

    steps: pd.DataFrame
    rollouts: pd.DataFrame
    matrix: np.ndarray
    config: Dict[str, Any] = field(default_factory=dict)

    def importance(self, metric: str = "importance_accuracy") -> np.ndarray:
        return self.steps[metric].to_numpy(dtype=np.float64)

    def save_step_importance(self, path: Union[str, Path]) -> Path:
        """The step-by-step matrix as Thought Anchors' ``step_importance.json``."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(step_importance_records(self.matrix, list(self.steps["text"])), indent=2))
        return path


def _prefixes(trace: Trace) -> tuple:
    thinking = [s for s in trace.steps if s.kind == "thinking"]
    if len(thinking) < 1:
        raise StepflowError("resampling needs a trace with at least one thinking step")
    starts = [s.char_span[0] for s in thinking]
    prefixes = [trace.text[:start] for start in starts] + [trace.text[:thinking[-1].char_span[1]]]
    return thinking, prefixes


def resampling_importance(
    model: TLModel,
    trace: Trace,
    problem: Problem,
    *,
    n_samples: int = 8,
    max_new_tokens: int = 128,
    temperature: float = 0.6,
    top_p: float = 0.95,
    seed: int = 0,
    batch_size: Optional[int] = None,
    results_path: Optional[Union[str, Path]] = None,
    match: float = MATCH,
    progress: bool = False,
) -> ResamplingResult:
    """Resampling importance of every thinking step of ``trace`` (module docstring).

    Args:
        trace: a trace whose text starts with the rendered prompt (a `Generation.trace`,
            or `load_traces` / `Trace.from_parts` with the model's tokenizer).
        problem: its question and gold, to grade the continuations.
        n_samples: continuations per prefix (at least 2: one rollout is no distribution).
        max_new_tokens: each continuation's budget (default 128, as `validate`'s
            ``resampling_tokens``). The cost is (thinking steps + 1) x ``n_samples``
            continuations of up to this many tokens; a continuation cut by the budget
            before it answers counts as unanswered, so a reasoning model that answers
            thousands of tokens after the prefix needs a budget to match.
        temperature, top_p, seed: sampling, as in `generate` (temperature 0.6 and top_p
            0.95: Thought Anchors' rollouts).
        batch_size: rollouts decoded at once (default ``n_samples``); the batch refills
            across prefixes, so it need not divide anything.
        results_path: a results file to write each rollout to and resume from.
        match: the ``difflib`` ratio at which a continuation's step matches a trace step.
    """
    n_samples = check_int("n_samples", n_samples, low=2)
    check_int("max_new_tokens", max_new_tokens, low=1)
    check_real("temperature", temperature, low=0.0, low_open=True)
    check_real("top_p", top_p, low=0.0, high=1.0, low_open=True)
    check_real("match", match, low=0.0, high=1.0)
    thinking, prefixes = _prefixes(trace)
    config = {
        "kind": "resampling", "problem_id": problem.id, "gold": problem.answer,
        "trace_sha": hashlib.sha256(trace.text.encode("utf-8")).hexdigest()[:16],
        "n_samples": n_samples, "samples": n_samples, "n_problems": 1, "max_new_tokens": max_new_tokens,
        "temperature": temperature, "top_p": top_p, "seed": seed,
        "conditions": {f"prefix{p}": len(prefixes[p]) for p in range(len(prefixes))},
    }
    records: List[dict] = []
    store = ResultsFile.open(results_path, config) if results_path is not None else None
    try:
        if store is not None:
            records = list(store.records)
        done = {(r["condition"], r["sample"]) for r in records}
        pending = [g for g in range(len(prefixes) * n_samples)
                   if (f"prefix{g // n_samples}", g % n_samples) not in done]
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(pending), unit="rollout", desc="resampling")
        finished: Dict[int, Any] = {}
        flushed = [0, time.perf_counter()]  # rollouts recorded in order; when the last one was

        def on_finish(j, gen):
            """Rollouts finish out of order; each is graded and recorded (one fsynced line)
            as soon as every earlier one has finished, so a stopped run loses only the rows
            still running. (Called within the `generate` call.)"""
            finished[j] = gen
            while flushed[0] in finished:
                k = flushed[0]
                g, gen = pending[k], finished.pop(k)
                now = time.perf_counter()
                # generation's wall time, split between rollouts as they are recorded
                wall, flushed[0], flushed[1] = now - flushed[1], k + 1, now
                verdict = grade(gen.text, problem)
                item = {
                    "problem_id": problem.id, "condition": f"prefix{g // n_samples}", "sample": g % n_samples,
                    "seed": gen.seed, "correct": bool(verdict.correct), "extracted": verdict.extracted,
                    "gold": problem.answer, "difficulty": problem.difficulty, "n_tokens": len(gen.output_ids),
                    "stop_reason": gen.stop_reason, "wall_time_s": wall, "n_events": 0, "events": {},
                    "mean_kl": None, "saliency": None, "output": gen.text,
                    "prompt_ids": list(gen.prompt_ids), "output_ids": list(gen.output_ids),
                }
                records.append(item)
                if store is not None:
                    store.append(item)
                if bar is not None:
                    bar.update(1)

        if pending:
            # One refilling call for every pending rollout: a finished row's place goes to the
            # next rollout at once, and the rollouts of one prefix share its prefill.
            generate(model, [prefixes[g // n_samples] for g in pending], max_new_tokens=max_new_tokens,
                     do_sample=True, temperature=temperature, top_p=top_p, seed=seed,
                     row_seeds=[item_seed(seed, g) for g in pending], chat=False,
                     questions=[problem.question] * len(pending), batch_size=batch_size or n_samples,
                     on_finish=on_finish)
        if bar is not None:
            bar.close()
    finally:
        if store is not None:
            store.close()
    return _summarise(records, trace, thinking, n_samples, match, config)


def load_resampling(results_path: Union[str, Path], trace: Trace, *, match: float = MATCH) -> ResamplingResult:
    """The `ResamplingResult` of a finished results file (no model needed)."""
    header, records = read_results(results_path)
    if not header or header.get("kind") != "resampling":
        raise StepflowError(f"{results_path} is not a resampling results file")
    thinking, prefixes = _prefixes(trace)
    if len(header["conditions"]) != len(prefixes):
        raise StepflowError(f"{results_path} was made from a trace with {len(header['conditions']) - 1} thinking "
                            f"steps; this one has {len(thinking)}")
    return _summarise(records, trace, thinking, header["n_samples"], match, header)


def _summarise(records, trace, thinking, n_samples, match, config) -> ResamplingResult:
    rollouts = pd.DataFrame([{"prefix": int(r["condition"][len("prefix"):]), "sample": r["sample"], "seed": r["seed"],
                              "correct": r["correct"], "extracted": r["extracted"], "output": r["output"]}
                             for r in records]).sort_values(["prefix", "sample"], kind="stable").reset_index(drop=True)
    n = len(thinking)
    missing = [p for p in range(n + 1) if (rollouts["prefix"] == p).sum() < n_samples]
    if missing:
        raise StepflowError(f"prefixes {missing[:5]} lack rollouts; run resampling_importance again to finish them")
    by_prefix = {p: rollouts[rollouts["prefix"] == p] for p in range(n + 1)}
    accuracy = [float(by_prefix[p]["correct"].mean()) for p in range(n + 1)]
    answers = [[a if isinstance(a, str) else "none" for a in by_prefix[p]["extracted"]] for p in range(n + 1)]
    steps = pd.DataFrame({
        "step": [s.index for s in thinking],
        "label": [trace.step_labels[s.index] for s in thinking],
        "text": [s.text for s in thinking],
        "accuracy_without": accuracy[:-1],
        "accuracy_with": accuracy[1:],
        "importance_accuracy": np.diff(accuracy),
        "importance_kl": [_kl(answers[i], answers[i + 1]) for i in range(n)],
    })
    # which trace steps each continuation reproduces
    targets = [_norm(s.text) for s in thinking]
    contains = {}
    for p in range(n + 1):
        rows = []
        for output in by_prefix[p]["output"]:
            pieces = [_norm(x) for x in re.split(r"\n\s*\n|(?<=[.!?])\s+", output) if x.strip()]
            rows.append([any(difflib.SequenceMatcher(None, t, x).ratio() >= match for x in pieces) for t in targets])
        contains[p] = np.asarray(rows, dtype=np.float64).mean(0)
    matrix = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = contains[i + 1][j] - contains[i][j]
    return ResamplingResult(steps=steps, rollouts=rollouts, matrix=matrix, config=dict(config))


# --------------------------------------------------------------------------- cheap signals vs resampling
def outgoing(matrix: np.ndarray, steps: List[int]) -> np.ndarray:
    """For each step ``s`` of ``steps``: the mean of ``matrix[q, s]`` over the later steps
    ``q > s`` where it is finite (how much the rest of the trace draws on ``s``: a step
    map's column below the diagonal, or a knockout matrix's column); NaN where none."""
    matrix = np.asarray(matrix, dtype=np.float64)
    out = []
    for s in steps:
        column = matrix[s + 1:, s]
        column = column[np.isfinite(column)]
        out.append(float(column.mean()) if column.size else np.nan)
    return np.asarray(out)


def signal_agreement(signals: Dict[str, np.ndarray], importance: Dict[str, np.ndarray]) -> Dict[str, Optional[float]]:
    """Spearman's rho over steps of every cheap signal with every resampling importance
    (``"<signal>|all|resampling_<metric>"`` -> rho; None with fewer than 3 steps where both
    are finite, or a constant side)."""
    rho: Dict[str, Optional[float]] = {}
    for name, values in signals.items():
        for metric, target in importance.items():
            known = np.isfinite(values) & np.isfinite(target)
            value = math.nan
            if int(known.sum()) >= 3 and np.ptp(values[known]) > 0 and np.ptp(target[known]) > 0:
                value = float(spearman(values[known], target[known]))
            rho[f"{name}|all|resampling_{metric}"] = value if math.isfinite(value) else None
    return rho
