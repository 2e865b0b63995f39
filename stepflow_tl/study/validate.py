"""Validation study: does StepFlow repair what it claims, and does Step-Saliency
predict causal effect? (docs/validation.md)

Per trace, read teacher-forced (`validate_trace`):

- **repair**: Step-Saliency maps and their diagnostics under the baseline and every
  condition (StepFlow, OEB only, SMI only, the matched controls), the interventions
  editing the forward exactly as KV-cached generation would edit each position;
- **causal agreement**: the step-knockout effect matrix `knockout_matrix` ``E[i, j]``
  (increase of the mean loss of step i's tokens when the tokens of later steps may not
  attend to step j) and the Spearman correlation, over pairs j < i, of E with the
  saliency maps (per layer and per band), with plain step attention and with the
  distance-only map 1 / (i - j);
- the baseline maps, for correct vs incorrect groups;
- with ``resampling=N``: Thought Anchors' resampling importance of each thinking step
  (`stepflow_tl.study.resampling`, N continuations per prefix, graded against the
  trace's ``gold``) and the Spearman correlation, over thinking steps, of three cheap
  signals with it: Step-Saliency (how much later steps draw on the step, all layers),
  the receiver-head score, and the step-knockout effect on later steps.

`validate` streams one JSON line per trace to a resumable results file (sharded
under ``accelerate launch`` like `stepflow_tl.study.evaluate`); `ValidationResult`
turns the lines into the tables (paired differences with bootstrap intervals,
Wilcoxon p and Holm's correction; the specificity contrasts; agreement means) and a
report.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..checks import check_bool, check_int
from ..errors import StepflowError
from ..interventions.generate import row_seed
from ..interventions.state import StepState
from ..saliency.compute import step_attention, step_saliency
from ..saliency.diagnostics import BANDS, METRICS, band_layers, compare, diagnose
from ..saliency.losses import LOSSES
from ..saliency.maps import StepSaliency
from ..saliency.receivers import receiver_heads
from ..stats import bootstrap_mean_ci, holm, spearman, wilcoxon_signed_rank
from ..tl.adapter import TLModel, adapter
from ..tl.hooks import temporary_hooks
from ..traces.hookpoints import attach_trace, step_pattern_name
from ..traces.trace import Trace
from ..viz import Report
from .conditions import CONDITIONS, describe, resolve_conditions
from .jobs import JobSchema, read_jobs, refuse_foreign_files, run_jobs, software_versions, traces_within_header
from .problems import Problem
from .resampling import outgoing, resampling_importance, signal_agreement

VALIDATION_CONDITIONS = ("baseline", "stepflow", "oeb", "smi", "random_bridge", "matched_noise",
                         "random_momentum", "random_stepflow")
# Each treatment and the control that copies its mechanics at matched strength.
MATCHED_CONTROLS = (("stepflow", "random_stepflow"), ("oeb", "random_bridge"), ("oeb", "matched_noise"),
                    ("smi", "random_momentum"))
# The failure metrics StepFlow claims to move, with the direction that counts as repair:
# less shallow lock-in, more question share while thinking; against deep decay a larger
# thinking share of summary rows, a less negative slope, a smaller anomaly ratio.
REPAIR_TARGETS = (("lock_in", "shallow", -1), ("question_share", "shallow", +1),
                  ("summary_thinking_share", "deep", +1), ("ds_slope", "deep", +1),
                  ("anomaly_ratio", "deep", -1))
MAPS = ("saliency", "attention", "distance")
VALIDATION_VERSION = 1


# --------------------------------------------------------------------------- knockout
@dataclass
class StepKnockout:
    """Step-knockout effects of one trace.

    Attributes:
        effects: ``[step_i, step_j]`` float64: mean loss of step i's tokens with the
            attention of later steps' tokens to step j removed, minus the clean mean
            loss; NaN where j >= i, where j was not knocked out, or where step i has
            no predicted token.
        key_steps: the knocked-out steps j (ascending).
        layers: the layers the knockout acted in.
        clean_step_loss: ``[step]`` mean next-token loss of each step's tokens.
    """

    effects: Float[Tensor, "step_q step_k"]
    key_steps: List[int]
    layers: List[int]
    clean_step_loss: Float[Tensor, " step"]


def _step_losses(logits: Tensor, token_ids: Tensor, token_steps: Tensor, n_steps: int) -> Tensor:
    """``[step]`` mean cross-entropy of predicting each step's tokens (NaN: none predicted)."""
    logits = logits[0]
    targets = token_ids.to(logits.device)[1:]
    losses = torch.empty(targets.shape[0], dtype=torch.float64)
    # float64: effects are small differences of losses. [block, vocab] at a time, not the whole sequence.
    block = 256
    for start in range(0, targets.shape[0], block):
        part = logits[start:start + block].double()
        logp = part.log_softmax(-1).gather(-1, targets[start:start + block, None])[:, 0]
        losses[start:start + block] = -logp.cpu()
    steps = token_steps[1:]
    sums = torch.zeros(n_steps + 1, dtype=torch.float64).index_add_(0, torch.where(steps >= 0, steps, n_steps), losses)
    counts = torch.zeros(n_steps + 1, dtype=torch.float64).index_add_(
        0, torch.where(steps >= 0, steps, n_steps), torch.ones_like(losses))
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan)[:n_steps]


def _forward(model, tokens, fwd_hooks=()):
    with temporary_hooks(model, fwd_hooks):
        return adapter(model).forward(tokens)


def knockout_matrix(model: TLModel, trace: Trace, *, key_steps: Optional[Sequence[int]] = None,
                    layers: Optional[Sequence[int]] = None) -> StepKnockout:
    """Step-knockout effect matrix of one trace (one forward per key step).

    For key step j, in every layer of ``layers`` (default all), the tokens of every
    later step i > j get no attention to step j's tokens: the step hook point
    ``blocks.{l}.attn.hook_step_pattern`` is set to 0 in the rows i > j of column j,
    which removes exactly those keys before the softmax (`stepflow_tl.hookpoints`).
    Markup tokens belong to no step and keep their attention. ``E[i, j]`` is the
    resulting increase of the mean next-token loss over step i's tokens.

    Args:
        key_steps: the steps j to knock out (default every step with a later step).
        layers: model layers to knock out in.
    """
    return _knockout(model, trace, key_steps, layers)


@torch.no_grad()
def _knockout(model, trace, key_steps, layers, clean: Optional[Tensor] = None) -> StepKnockout:
    """`knockout_matrix`; ``clean``: the trace's clean per-step losses when already known
    (the layer bands of one trace share them), else one more forward computes them."""
    a = adapter(model)
    trace.check_tokenizer(model)
    n = trace.n_steps
    layers = a.check_layers(range(a.n_layers) if layers is None else layers)
    eligible = list(range(n - 1))
    key_steps = eligible if key_steps is None else sorted({int(j) for j in key_steps})
    bad = [j for j in key_steps if j not in eligible]
    if bad:
        raise StepflowError(f"key steps {bad} have no later step to knock out from (the trace has {n} steps)")
    tokens = trace.token_ids[None].to(a.device)
    if clean is None:
        clean = _step_losses(_forward(model, tokens), trace.token_ids, trace.token_steps, n)
    effects = torch.full((n, n), torch.nan, dtype=torch.float64)
    with attach_trace(model, trace, layers=layers):
        for j in key_steps:
            def knock_out(pattern, hook, j=j):
                pattern = pattern.clone()
                pattern[:, :, j + 1:, j] = 0.0
                return pattern

            logits = _forward(model, tokens, [(step_pattern_name(l), knock_out) for l in layers])
            effects[j + 1:, j] = (_step_losses(logits, trace.token_ids, trace.token_steps, n) - clean)[j + 1:]
    return StepKnockout(effects=effects, key_steps=key_steps, layers=list(layers), clean_step_loss=clean)


def sample_key_steps(n_steps: int, max_key_steps: Optional[int], seed: int, index: int) -> List[int]:
    """The key steps of trace ``index``: all steps with a later step, or a uniform sample
    of ``max_key_steps`` of them drawn by ``numpy.random.default_rng([seed, index])``."""
    eligible = list(range(n_steps - 1))
    if max_key_steps is None or len(eligible) <= max_key_steps:
        return eligible
    rng = np.random.default_rng([int(seed), int(index)])
    return sorted(int(j) for j in rng.choice(eligible, size=int(max_key_steps), replace=False))


# --------------------------------------------------------------------------- agreement
def distance_map(n_steps: int) -> Float[Tensor, "step_q step_k"]:
    """``1 / (i - j)`` below the diagonal, 0 elsewhere."""
    i = torch.arange(n_steps, dtype=torch.float64)[:, None]
    j = torch.arange(n_steps, dtype=torch.float64)[None, :]
    return torch.where(j < i, 1.0 / (i - j).clamp_min(1), 0.0)


def agreement(map_: Tensor, effects: Tensor) -> float:
    """Spearman's rho of a step map and knockout effects over the pairs j < i where
    the effect is known (NaN with fewer than 3 pairs or a constant side)."""
    n = effects.shape[0]
    below = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)
    known = below & torch.isfinite(effects)
    if int(known.sum()) < 3:
        return math.nan
    return spearman(map_.double()[known].numpy(), effects[known].numpy())


def _band_maps(result, bands: Dict[str, List[int]]) -> Dict[str, Tensor]:
    """``{"L<l>": layer map, band: mean over its layers, "all": mean over all}``."""
    out = {f"L{l}": result.maps[i] for i, l in enumerate(result.layers)}
    for band, ls in bands.items():
        rows = [result.layers.index(l) for l in ls if l in result.layers]
        if rows:
            out[band] = result.maps[rows].mean(0)
    out["all"] = result.maps.mean(0)
    return out


# --------------------------------------------------------------------------- per trace
@dataclass
class ValidationConfig:
    """Settings of a validation run (what decides whether a results file resumes).

    Attributes:
        conditions: names from `stepflow_tl.study.CONDITIONS`; "baseline" is required.
        max_key_steps: knock out at most this many steps per trace (a seeded sample); None: all.
        knockout_bands: also knock out in each layer band alone (one more forward per
            key step and band) and compare each band's maps with its own knockout.
        seed: seeds the key-step samples and the random controls (row seeds as in `generate`).
        loss, mode: of `step_saliency`.
        n_boot: bootstrap resamples of every interval.
        maps_in_report: traces whose maps under every condition are kept for the report.
        resampling: continuations per prefix for the resampling importance (0: off; else
            at least 2); resampling_tokens: their token budget; resampling_kind: how the
            trace's ``gold`` is graded (``"math"``, ``"integer"``, ``"choice"``).
    """

    conditions: Sequence[str] = VALIDATION_CONDITIONS
    max_key_steps: Optional[int] = 8
    knockout_bands: bool = False
    seed: int = 0
    loss: str = "sequence"
    mode: str = "bounded"
    n_boot: int = 10000
    maps_in_report: int = 3
    resampling: int = 0
    resampling_tokens: int = 128
    resampling_kind: str = "math"

    def __post_init__(self):
        if isinstance(self.conditions, str):
            self.conditions = [c.strip() for c in self.conditions.split(",") if c.strip()]
        self.conditions = list(self.conditions)
        if "baseline" not in self.conditions:
            raise StepflowError("the conditions must include 'baseline' (every difference is against it)")
        resolve_conditions(self.conditions)  # unknown names fail here
        if self.max_key_steps is not None:
            self.max_key_steps = check_int("max_key_steps (>= 0, or None for all)", self.max_key_steps, low=0)
        self.knockout_bands = check_bool("knockout_bands", self.knockout_bands)
        self.seed = check_int("seed", self.seed)
        if self.loss not in LOSSES:
            raise StepflowError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.mode not in ("dense", "bounded"):
            raise StepflowError(f"mode must be 'dense' or 'bounded' (the knockout needs hook_pattern), got {self.mode!r}")
        self.n_boot = check_int("n_boot (bootstrap resamples)", self.n_boot, low=100)
        self.maps_in_report = check_int("maps_in_report", self.maps_in_report, low=0)
        if self.resampling != 0 and self.resampling < 2:
            raise StepflowError(f"resampling must be 0 (off) or >= 2 continuations per prefix, got {self.resampling}")


def _maps_path(directory: Path, index: int, condition: str) -> Path:
    return directory / "maps" / f"trace{index:04d}.{condition}.npz"


def validate_trace(model: TLModel, trace: Trace, index: int, config: ValidationConfig, maps_dir: Optional[Path] = None,
                   progress: Optional[tqdm] = None) -> dict:
    """Every measurement of one trace as a JSON-safe record (see the module docstring)."""
    t0 = time.perf_counter()
    a = adapter(model)
    bands = band_layers(a.n_layers)
    seed = row_seed(config.seed, index)
    conds = resolve_conditions(config.conditions)
    state = StepState.from_trace(trace, device=a.device, row_seed=seed)
    metrics, baseline = {}, None
    for name, ivs in conds.items():
        if progress is not None:
            progress.set_postfix_str(f"trace {index}: {name}")
        result = step_saliency(model, trace, loss=config.loss, mode=config.mode, interventions=ivs,
                               state=state if ivs else None)
        diag = diagnose(result)
        means = diag.band_means()
        metrics[name] = {"bands": {b: {m: _num(means.loc[b, m]) for m in METRICS} for b in BANDS},
                         "ds_slope": _num(diag.ds_slope_deep)}
        if maps_dir is not None and (name == "baseline" or index < config.maps_in_report):
            result.meta.update(trace_index=index, condition=name)
            result.save(_maps_path(maps_dir, index, name))
        if name == "baseline":
            baseline = result
    record = {"index": index, "trace_id": trace.meta.get("trace_id", index), "n_tokens": trace.n_tokens,
              "n_steps": trace.n_steps, "step_kinds": list(trace.step_kinds), "correct": trace.meta.get("correct"),
              "row_seed": seed, "metrics": metrics}
    key_steps = sample_key_steps(trace.n_steps, config.max_key_steps, config.seed, index)
    rho: Dict[str, Dict[str, float]] = {}
    effects = {}
    if key_steps:
        if progress is not None:
            progress.set_postfix_str(f"trace {index}: knockout")
        knock = {"all": knockout_matrix(model, trace, key_steps=key_steps)}
        if config.knockout_bands:
            for band, ls in bands.items():
                if ls:
                    knock[band] = _knockout(model, trace, key_steps, ls, clean=knock["all"].clean_step_loss)
        attention = step_attention(model, trace)
        maps = {"saliency": _band_maps(baseline, bands), "attention": _band_maps(attention, bands)}
        for kind, by_band in maps.items():
            for band, m in by_band.items():
                rho[f"{kind}|{band}|all"] = _num(agreement(m, knock["all"].effects))
                if band in knock and band != "all":
                    rho[f"{kind}|{band}|{band}"] = _num(agreement(m, knock[band].effects))
        rho["distance|all|all"] = _num(agreement(distance_map(trace.n_steps), knock["all"].effects))
        effects = {k: _matrix(v.effects) for k, v in knock.items()}
        record["clean_step_loss"] = [_num(v) for v in knock["all"].clean_step_loss.tolist()]
    if config.resampling:
        record["resampling"], resampled_rho = _resampling(model, trace, index, config, baseline,
                                                          knock["all"] if key_steps else None, maps_dir, progress)
        rho.update(resampled_rho)
    record.update(key_steps=key_steps, rho=rho, effects=effects, wall_s=time.perf_counter() - t0)
    return record


def _resampling(model, trace, index, config, baseline, knock, maps_dir, progress) -> tuple:
    """Resampling importance of the thinking steps and its agreement with the cheap signals."""
    gold = trace.meta.get("gold", trace.meta.get("answer"))
    if gold in (None, ""):
        raise StepflowError(f"trace {index} has no 'gold' (or 'answer'): resampling grades continuations against it; "
                            "use traces with a gold answer or turn resampling off")
    if progress is not None:
        progress.set_postfix_str(f"trace {index}: resampling")
    question = "\n\n".join(trace.steps[i].text for i in trace.question_steps)
    problem = Problem(id=str(trace.meta.get("trace_id", index)), question=question, answer=str(gold),
                      kind=config.resampling_kind)
    path = None if maps_dir is None else Path(maps_dir) / "resampling" / f"trace{index:04d}.jsonl"
    found = resampling_importance(model, trace, problem, n_samples=config.resampling,
                                  max_new_tokens=config.resampling_tokens, seed=row_seed(config.seed, index),
                                  results_path=path)
    steps = [int(s) for s in found.steps["step"]]
    signals = {"saliency": outgoing(baseline.maps.mean(0).numpy(), steps)}
    try:
        receivers = receiver_heads(model, trace)
        scores = dict(zip(receivers.steps, receivers.step_scores()))
        signals["receiver"] = np.array([scores.get(s, np.nan) for s in steps], dtype=np.float64)
    except StepflowError:  # too few steps for the proximity window: no receiver scores
        signals["receiver"] = np.full(len(steps), np.nan)
    if knock is not None:
        signals["knockout"] = outgoing(knock.effects.numpy(), steps)
    importance = {"accuracy": np.abs(found.importance("importance_accuracy")),
                  "kl": found.importance("importance_kl")}
    summary = {"steps": steps, **{f"importance_{k}": [_num(v) for v in found.importance(f"importance_{k}")]
                                  for k in ("accuracy", "kl")},
               **{f"signal_{k}": [_num(v) for v in v_] for k, v_ in signals.items()}}
    return summary, signal_agreement(signals, importance)


def _num(v) -> Optional[float]:
    """A float for JSON, None for NaN (so the file is strict JSON)."""
    v = float(v)
    return v if math.isfinite(v) else None


def _matrix(t: Tensor) -> list:
    return [[_num(v) for v in row] for row in t.tolist()]


# --------------------------------------------------------------------------- results file
def _check_record(record: dict, path, where: str) -> None:
    index = record.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not isinstance(record.get("metrics"), dict):
        raise StepflowError(f"{path}, {where}: a trace record needs an integer 'index' and 'metrics' (edited by "
                            "hand?); delete the file or use another --out to start over")


VALIDATION_SCHEMA = JobSchema(
    line_type="trace", version=VALIDATION_VERSION, what="validation run", key=lambda r: int(r["index"]),
    name=lambda r: f"trace {r['index']}", check=_check_record, fits=traces_within_header, allow_nan=False,
)


def read_validation(path: Union[str, Path], *, tolerate_partial: bool = False):
    """``(config header or None, [trace records])`` of a validation results file
    (refusing duplicated or foreign traces, like every results file of the job runner)."""
    return read_jobs(path, VALIDATION_SCHEMA, tolerate_partial=tolerate_partial)


def _traces_sha(traces) -> str:
    h = hashlib.sha256()
    for t in traces:
        h.update(t.token_ids.numpy().tobytes())
        h.update(t.token_steps.numpy().tobytes())
    return h.hexdigest()[:16]


def run_config(model: TLModel, traces: Sequence[Trace], config: ValidationConfig, **settings: Any) -> dict:
    a = adapter(model)
    return {
        "model": str(getattr(model.cfg, "model_name", type(model).__name__)),
        "model_shape": [a.n_layers, a.n_heads, a.n_kv_heads, a.d_model],
        "dtype": str(a.dtype).removeprefix("torch."), "software": software_versions(),
        "n_traces": len(traces), "traces_sha": _traces_sha(traces),
        "conditions": {n: [describe(iv) for iv in ivs] for n, ivs in resolve_conditions(config.conditions).items()},
        "max_key_steps": config.max_key_steps, "knockout_bands": config.knockout_bands, "seed": config.seed,
        "loss": config.loss, "mode": config.mode, "maps_in_report": config.maps_in_report, **settings,
        # only when on, so results files from before resampling existed still resume
        **({"resampling": config.resampling, "resampling_tokens": config.resampling_tokens,
            "resampling_kind": config.resampling_kind} if config.resampling else {}),
    }


def validate(model: TLModel, traces: Sequence[Trace], out: Union[str, Path], *, config: Optional[ValidationConfig] = None, progress: bool = True,
             **settings: Any) -> "ValidationResult":
    """Run the validation study on ``traces`` into directory ``out`` (resumable).

    ``out/results.jsonl`` gets one line per trace, written by the job runner
    (`stepflow_tl.study.jobs.run_jobs`): the file is locked for the whole run (a second
    run on it is refused), a rerun skips the traces already in it, and a file written
    with another config is refused, as is an ``out`` holding maps but no results file;
    the maps go to ``out/maps/``. Under ``accelerate launch`` the traces are split
    across processes, each streams to its own shard and the main process merges them.
    ``settings`` (e.g. how the traces were cut) join the config.
    """
    config = config or ValidationConfig()
    traces = list(traces)
    if not traces:
        raise StepflowError("no traces given")
    short = [i for i, t in enumerate(traces) if t.n_steps < 2]
    if short:
        raise StepflowError(f"traces {short[:8]} have fewer than two steps; a step map needs two")
    out = Path(out)
    path = out / "results.jsonl"
    refuse_foreign_files(out, path, ["maps/trace*.npz"], "validation run")
    header = run_config(model, traces, config, **settings)

    def one(i: int, bar) -> dict:
        return validate_trace(model, traces[i], i, config, maps_dir=out, progress=bar)

    run_jobs(path, header, VALIDATION_SCHEMA, list(range(len(traces))), one, progress=progress, desc="validate",
             unit="trace")
    return load_validation(out, n_boot=config.n_boot)


# --------------------------------------------------------------------------- tables
def _metric_value(record: dict, condition: str, metric: str, band: str) -> float:
    m = record["metrics"].get(condition)
    if m is None:
        return math.nan
    v = m["ds_slope"] if metric == "ds_slope" else m["bands"][band][metric]
    return math.nan if v is None else float(v)


def _metric_rows():
    return [(m, b) for m in METRICS for b in BANDS] + [("ds_slope", "deep")]


def _paired_row(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict:
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    row = {"n": int(keep.sum()), "mean_a": float(x.mean()) if x.size else math.nan,
           "mean_b": float(y.mean()) if y.size else math.nan}
    if not x.size:
        return {**row, "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan}
    ci = bootstrap_mean_ci(y - x, n_boot=n_boot, seed=seed)
    return {**row, "diff": ci.diff, "ci_low": ci.low, "ci_high": ci.high, "p": wilcoxon_signed_rank(x, y)}


def repair_table(records: Sequence[dict], conditions: Sequence[str], *, n_boot: int = 10000,
                 seed: int = 0) -> pd.DataFrame:
    """Per condition, metric and band: the paired difference condition - baseline over
    traces (``diff``, bootstrap 95% ``ci_low``/``ci_high``), the Wilcoxon signed-rank
    ``p`` and ``p_holm`` (Holm over the metric x band rows of the condition)."""
    rows = []
    for cond in conditions:
        if cond == "baseline":
            continue
        part = []
        for metric, band in _metric_rows():
            base = np.array([_metric_value(r, "baseline", metric, band) for r in records])
            mine = np.array([_metric_value(r, cond, metric, band) for r in records])
            res = _paired_row(base, mine, n_boot, seed)
            part.append({"condition": cond, "metric": metric, "band": band, "n": res["n"],
                         "baseline_mean": res["mean_a"], "condition_mean": res["mean_b"], "diff": res["diff"],
                         "ci_low": res["ci_low"], "ci_high": res["ci_high"], "p": res["p"]})
        frame = pd.DataFrame(part)
        frame["p_holm"] = holm(frame["p"].to_numpy(dtype=np.float64))
        rows.append(frame)
    cols = ["condition", "metric", "band", "n", "baseline_mean", "condition_mean", "diff", "ci_low", "ci_high",
            "p", "p_holm"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


def specificity_table(records: Sequence[dict], conditions: Sequence[str], *, n_boot: int = 10000,
                      seed: int = 0) -> pd.DataFrame:
    """Does a treatment move the failure metrics in the repair direction more than its
    matched control? Per trace ``advantage = direction * (treatment - control)`` (the
    baseline cancels); its mean with a bootstrap interval, the Wilcoxon p and Holm over
    all rows. ``treatment_diff``/``control_diff``: the mean change of each against the
    baseline."""
    rows = []
    for treat, ctrl in MATCHED_CONTROLS:
        if treat not in conditions or ctrl not in conditions:
            continue
        for metric, band, sign in REPAIR_TARGETS:
            base = np.array([_metric_value(r, "baseline", metric, band) for r in records])
            t = np.array([_metric_value(r, treat, metric, band) for r in records])
            c = np.array([_metric_value(r, ctrl, metric, band) for r in records])
            keep = np.isfinite(base) & np.isfinite(t) & np.isfinite(c)
            res = _paired_row(sign * c[keep], sign * t[keep], n_boot, seed)
            rows.append({"treatment": treat, "control": ctrl, "metric": metric, "band": band,
                         "repair_direction": "+" if sign > 0 else "-", "n": res["n"],
                         "treatment_diff": float((t - base)[keep].mean()) if keep.any() else math.nan,
                         "control_diff": float((c - base)[keep].mean()) if keep.any() else math.nan,
                         "advantage": res["diff"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
                         "p": res["p"]})
    cols = ["treatment", "control", "metric", "band", "repair_direction", "n", "treatment_diff", "control_diff",
            "advantage", "ci_low", "ci_high", "p", "p_holm"]
    frame = pd.DataFrame(rows, columns=[c for c in cols if c != "p_holm"])
    frame["p_holm"] = holm(frame["p"].to_numpy(dtype=np.float64)) if len(frame) else []
    return frame[cols]


def agreement_table(records: Sequence[dict], *, n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Per map (saliency, attention, distance), band of the map (``L<l>``, a band or
    ``all``) and knockout (``all`` layers or the same band): the mean over traces of
    Spearman's rho with the knockout effects, a bootstrap 95% interval over traces and
    the Wilcoxon signed-rank p of the rhos against 0."""
    keys: List[str] = []
    for r in records:
        keys.extend(k for k in r["rho"] if k not in keys)
    rows = []
    for key in keys:
        kind, band, knock = key.split("|")
        rhos = np.array([r["rho"].get(key) for r in records if r["rho"].get(key) is not None], dtype=np.float64)
        row = {"map": kind, "band": band, "knockout": knock, "n_traces": int(rhos.size)}
        if rhos.size:
            ci = bootstrap_mean_ci(rhos, n_boot=n_boot, seed=seed)
            row.update(rho_mean=ci.diff, ci_low=ci.low, ci_high=ci.high,
                       p=wilcoxon_signed_rank(np.zeros_like(rhos), rhos))
        else:
            row.update(rho_mean=math.nan, ci_low=math.nan, ci_high=math.nan, p=math.nan)
        rows.append(row)
    cols = ["map", "band", "knockout", "n_traces", "rho_mean", "ci_low", "ci_high", "p"]
    frame = pd.DataFrame(rows, columns=cols)
    order = {"all": 0, **{b: i + 1 for i, b in enumerate(BANDS)}}
    frame["_band"] = frame["band"].map(lambda b: order.get(b, 10 + int(b[1:]) if b.startswith("L") else 99))
    frame["_map"] = frame["map"].map({m: i for i, m in enumerate(MAPS + ("receiver", "knockout"))})
    return frame.sort_values(["_map", "knockout", "_band"], kind="stable").drop(columns=["_band", "_map"]) \
        .reset_index(drop=True)


@dataclass
class ValidationResult:
    """The tables of a validation run (`load_validation`), and where its files are."""

    records: List[dict]
    config: dict
    repair: pd.DataFrame
    specificity: pd.DataFrame
    agreement: pd.DataFrame
    groups: Optional[pd.DataFrame]
    directory: Path
    notes: List[str] = field(default_factory=list)

    def to_csv(self, directory: Optional[Union[str, Path]] = None) -> Dict[str, Path]:
        """repair.csv, specificity.csv, agreement.csv and (with labels) groups.csv."""
        directory = Path(directory or self.directory)
        directory.mkdir(parents=True, exist_ok=True)
        tables = {"repair": self.repair, "specificity": self.specificity, "agreement": self.agreement}
        if self.groups is not None:
            tables["groups"] = self.groups
        paths = {}
        for name, frame in tables.items():
            paths[name] = directory / f"{name}.csv"
            frame.to_csv(paths[name], index=False)
        return paths

    def headline(self) -> str:
        """The specificity rows and the all-layer agreement, one line each."""
        lines = [f"{len(self.records)} traces"]
        for row in self.specificity.itertuples(index=False):
            lines.append(f"{row.treatment} vs {row.control}, {row.metric} ({row.band}): advantage "
                         f"{row.advantage:+.4g} [{row.ci_low:+.4g}, {row.ci_high:+.4g}], p_holm={row.p_holm:.3g} "
                         f"(n={row.n})")
        for row in self.agreement[self.agreement["band"] == "all"].itertuples(index=False):
            against = (f"resampling importance ({row.knockout[len('resampling_'):]})"
                       if row.knockout.startswith("resampling_") else f"knockout {row.knockout}")
            lines.append(f"agreement {row.map} (all layers) vs {against}: rho {row.rho_mean:+.3f} "
                         f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}] over {row.n_traces} traces")
        return "\n".join(lines)

    def save_html(self, path: Optional[Union[str, Path]] = None, *, title: Optional[str] = None) -> Path:
        """A self-contained report: before/after step maps side by side and the tables."""
        path = Path(path or self.directory / "report.html")
        report = Report(title or "StepFlow validation")
        report.add_text(_REPORT_INTRO)
        cfg = self.config
        report.add_text(f"{len(self.records)} traces; model {cfg['model']}; conditions "
                        f"{', '.join(cfg['conditions'])}; key steps per trace <= {cfg['max_key_steps']}; "
                        f"seed {cfg['seed']}; loss {cfg['loss']}; "
                        + ", ".join(f"{k} {cfg[k]}" for k in ("max_tokens", "longer") if k in cfg) + ".")
        for note in self.notes:
            report.add_text(note, css_class="note")
        report.add_heading("Repair: each condition against the baseline")
        main = self.repair[self.repair.apply(lambda r: (r["metric"], r["band"]) in
                                             {(m, b) for m, b, _ in REPAIR_TARGETS}, axis=1)]
        report.add_table(main, caption="Failure metrics StepFlow targets: paired diff (condition - baseline), "
                         "bootstrap 95% CI, Wilcoxon p, Holm over the condition's metrics")
        report.add_heading("Specificity: treatment against its matched control")
        report.add_table(self.specificity, caption="advantage = direction x (treatment - control) per trace; "
                         "> 0 means the treatment repairs more than its control")
        report.add_heading("Causal agreement: maps against step knockout")
        report.add_table(self.agreement[~self.agreement["band"].str.startswith("L")],
                         caption="Spearman rho over pairs j < i, mean over traces (bands and all layers)")
        report.add_table(self.agreement[self.agreement["band"].str.startswith("L")],
                         caption="Spearman rho per layer")
        if self.groups is not None:
            report.add_heading("Correct vs incorrect traces (baseline maps)")
            report.add_table(self.groups, caption="Per band: Cliff's delta and Mann-Whitney p (Holm over bands)")
        shown = [r for r in self.records if r["index"] < int(cfg["maps_in_report"])]
        if shown:
            report.add_heading("Step maps before and after")
        for r in shown:
            pair = []
            for cond in ("baseline", "stepflow"):
                p = _maps_path(self.directory, r["index"], cond)
                if p.exists():
                    pair.append((StepSaliency.load(p), f"trace {r['index']}: {cond}"))
            if pair:
                report.add_step_maps_row(pair)
            per_cond = pd.DataFrame([{"condition": c, **{f"{m} ({b})": _metric_value(r, c, m, b)
                                                          for m, b, _ in REPAIR_TARGETS}}
                                     for c in cfg["conditions"] if c in r["metrics"]])
            report.add_table(per_cond, caption=f"trace {r['index']}: the targeted metrics under each condition")
        report.add_heading("Full repair table")
        report.add_table(self.repair, caption="every metric and band")
        return report.save(path)


_REPORT_INTRO = (
    "Three questions. (1) Repair: do OEB and SMI change the Step-Saliency maps where the paper says "
    "reasoning fails (Shallow Lock-in, Deep Decay)? (2) Specificity: do they change them more than "
    "matched controls (random bridge, matched logit noise, random momentum) that perturb the same layers "
    "as strongly? (3) Causal agreement: does saliency rank step pairs like the causal effect of knocking "
    "the key step out? Every trace is read teacher-forced; interventions edit that forward exactly as "
    "generation would edit each position. Metric definitions: docs/diagnostics.md; method: "
    "docs/validation.md.")


def load_validation(directory: Union[str, Path], *, n_boot: int = 10000) -> ValidationResult:
    """The tables of the validation run in ``directory`` (finished or not), without a model."""
    directory = Path(directory)
    path = directory / "results.jsonl"
    if not path.is_file():
        raise StepflowError(f"{path} does not exist; run `stepflow-tl validate` first")
    header, records = read_validation(path, tolerate_partial=True)
    records = sorted(records, key=lambda r: r["index"])
    conditions = list(header["conditions"])
    seed = int(header["seed"])
    notes = []
    groups = None
    labels = [r.get("correct") for r in records]
    correct = [r for r in records if r.get("correct") is True]
    incorrect = [r for r in records if r.get("correct") is False]
    if len(correct) >= 2 and len(incorrect) >= 2:
        load = lambda rs: [StepSaliency.load(_maps_path(directory, r["index"], "baseline")) for r in rs]
        table = compare(load(correct), load(incorrect))
        groups = table[table["level"] == "band"].drop(columns=["level", "layer"]).reset_index(drop=True)
    elif any(v is not None for v in labels):
        notes.append(f"groups: {len(correct)} correct and {len(incorrect)} incorrect traces; "
                     "need at least 2 of each")
    return ValidationResult(
        records=records, config=header,
        repair=repair_table(records, conditions, n_boot=n_boot, seed=seed),
        specificity=specificity_table(records, conditions, n_boot=n_boot, seed=seed),
        agreement=agreement_table(records, n_boot=n_boot, seed=seed),
        groups=groups, directory=directory, notes=notes,
    )
