"""Results of a paired study: per-item outcomes, per-condition statistics, report and CSV.

A `StudyResult` holds one row per (problem, condition, sample). Every condition ran on
the same problems with the same per-item seeds, so outcomes are compared pairwise
against the reference condition (``"baseline"``): accuracy with a Wilson interval, the
paired difference with a bootstrap interval over problems, McNemar's exact p (Holm-
adjusted across conditions), mean tokens generated and the wall-time ratio.
See ``docs/study.md`` and ``docs/statistics.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

from ..errors import StepflowError
from ..saliency.diagnostics import compare
from ..stats import holm, mcnemar_exact, paired_bootstrap_ci, wilson_interval
from ..viz import Report, plot_accuracy_by_difficulty

ItemKey = Tuple[str, str, int]

# How the report shows the summary's machine columns (summary.csv keeps them as they are).
SUMMARY_KINDS = {"accuracy": "pct", "acc_low": "pct", "diff": "pp", "diff_low": "pp", "wall_time_s": "seconds",
                 "time_ratio": "ratio", "mean_tokens": "num", "events_per_item": "num"}
BY_DIFFICULTY_KINDS = {"accuracy": "pct", "low": "pct"}
SUMMARY_ACCURACY = ["condition", "n", "n_correct", "accuracy", "acc_low", "acc_high", "n_paired", "diff", "diff_low",
                    "diff_high", "n_changed", "b01", "b10", "mcnemar_p", "p_holm"]
SUMMARY_COST = ["condition", "mean_tokens", "wall_time_s", "time_ratio", "events_per_item"]


@dataclass
class StudyResult:
    """Outcomes of `stepflow_tl.study.evaluate` / `ablate`.

    Attributes:
        items: one row per (problem, condition, sample), columns `stepflow_tl.study.results.ITEM_COLUMNS`.
        config: the study config (JSON-safe; the header of the results file).
        conditions: condition names in run order.
        reference: the condition every other one is paired against.
        saliency: StepSaliency results by ``(problem_id, condition, sample)``, for the
            items that have one.
        results_path: the JSONL file the items were streamed to (or None).
    """

    items: pd.DataFrame
    config: dict
    conditions: List[str]
    reference: str = "baseline"
    saliency: Dict[ItemKey, object] = field(default_factory=dict)
    results_path: Optional[Path] = None

    # ------------------------------------------------------------------ tables
    def to_dataframe(self) -> pd.DataFrame:
        """The per-item table (a copy)."""
        return self.items.copy()

    def _outcomes(self, condition: str) -> pd.Series:
        """0/1 correctness indexed by (problem_id, sample)."""
        sub = self.items[self.items["condition"] == condition]
        return sub.set_index(["problem_id", "sample"])["correct"].astype(float).sort_index()

    def summary(self, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
        """One row per condition.

        Columns: condition, n, n_correct, accuracy, acc_low, acc_high (Wilson), and against
        the reference on the items both have: n_paired, n_changed (items whose output text
        differs from the reference's), diff (condition - reference),
        diff_low, diff_high (percentile bootstrap over problems, samples of a problem kept
        together), b01 (reference wrong, condition right), b10 (the reverse), mcnemar_p,
        p_holm (Holm across the non-reference conditions), mean_tokens, wall_time_s (sum),
        time_ratio (wall time / the reference's on the paired items), events_per_item.
        """
        if self.items.empty:
            raise StepflowError("the study has no finished items yet")
        ref = self._outcomes(self.reference) if self.reference in self.conditions else None
        rows = []
        for cond in self.conditions:
            sub = self.items[self.items["condition"] == cond]
            if sub.empty:
                continue
            k, n = int(sub["correct"].sum()), len(sub)
            acc = wilson_interval(k, n, level=level)
            row = {
                "condition": cond, "n": n, "n_correct": k, "accuracy": acc.estimate,
                "acc_low": acc.low, "acc_high": acc.high,
                "n_paired": 0, "n_changed": pd.NA, "diff": math.nan, "diff_low": math.nan, "diff_high": math.nan,
                "b01": pd.NA, "b10": pd.NA, "mcnemar_p": math.nan,
                "mean_tokens": float(sub["n_tokens"].mean()),
                "wall_time_s": float(sub["wall_time_s"].sum()),
                "time_ratio": math.nan,
                "events_per_item": float(sub["n_events"].mean()),
            }
            if ref is not None and cond != self.reference:
                mine = self._outcomes(cond)
                common = ref.index.intersection(mine.index)
                if len(common):
                    a, b = ref.loc[common], mine.loc[common]
                    # Bootstrap over problems: a problem's samples share its difficulty.
                    per_problem = pd.DataFrame({"a": a, "b": b}).groupby(level=0).mean()
                    if len(per_problem) >= 1:
                        ci = paired_bootstrap_ci(per_problem["a"].to_numpy(), per_problem["b"].to_numpy(),
                                                 n_boot=n_boot, seed=seed, level=level)
                        row.update(diff=ci.diff, diff_low=ci.low, diff_high=ci.high)
                    mc = mcnemar_exact(a.to_numpy(), b.to_numpy())
                    row.update(n_paired=len(common), b01=mc.b01, b10=mc.b10, mcnemar_p=mc.p)
                    keyed = lambda c: self.items[self.items["condition"] == c].set_index(["problem_id", "sample"])
                    outputs = keyed(cond).loc[common, "output"] != keyed(self.reference).loc[common, "output"]
                    row["n_changed"] = int(outputs.sum())
                    t_ref = keyed(self.reference).loc[common, "wall_time_s"].sum()
                    t_me = keyed(cond).loc[common, "wall_time_s"].sum()
                    row["time_ratio"] = float(t_me / t_ref) if t_ref > 0 else math.nan
            elif cond == self.reference:
                row.update(n_paired=n, n_changed=0, diff=0.0, diff_low=0.0, diff_high=0.0, time_ratio=1.0)
            rows.append(row)
        df = pd.DataFrame(rows)
        df["p_holm"] = holm(df["mcnemar_p"].to_numpy(dtype=np.float64))
        cols = ["condition", "n", "n_correct", "accuracy", "acc_low", "acc_high", "n_paired", "n_changed", "diff",
                "diff_low", "diff_high", "b01", "b10", "mcnemar_p", "p_holm", "mean_tokens", "wall_time_s",
                "time_ratio", "events_per_item"]
        return df[cols]

    def by_difficulty(self, *, level: float = 0.95) -> pd.DataFrame:
        """Accuracy per (condition, difficulty) with Wilson intervals: columns condition,
        difficulty, n, accuracy, low, high (items without a difficulty are left out)."""
        rows = []
        known = self.items.dropna(subset=["difficulty"])
        for cond in self.conditions:
            sub = known[known["condition"] == cond]
            for diff, group in sub.groupby("difficulty", sort=True):
                p = wilson_interval(int(group["correct"].sum()), len(group), level=level)
                rows.append({"condition": cond, "difficulty": int(diff), "n": len(group),
                             "accuracy": p.estimate, "low": p.low, "high": p.high})
        return pd.DataFrame(rows, columns=["condition", "difficulty", "n", "accuracy", "low", "high"])

    def saliency_groups(self, condition: str) -> Tuple[list, list]:
        """(correct, incorrect) StepSaliency results of one condition."""
        correct, incorrect = [], []
        flags = self.items.set_index(["problem_id", "condition", "sample"])["correct"]
        for key, result in self.saliency.items():
            if key[1] == condition and key in flags.index:
                (correct if bool(flags.loc[key]) else incorrect).append(result)
        return correct, incorrect

    def compare_saliency(self, condition: Optional[str] = None, **kwargs: Any) -> pd.DataFrame:
        """`stepflow_tl.saliency.diagnostics.compare` of correct vs incorrect traces, per condition
        with at least two maps in each group (column ``condition`` added)."""
        frames = []
        for cond in [condition] if condition else self.conditions:
            correct, incorrect = self.saliency_groups(cond)
            if len(correct) >= 2 and len(incorrect) >= 2:
                df = compare(correct, incorrect, **kwargs)
                df.insert(0, "condition", cond)
                frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # ------------------------------------------------------------------ output
    def headline(self) -> str:
        """One line per condition: accuracy with its Wilson interval and, against the
        reference, the paired difference with its interval and McNemar's p."""
        s = self.summary()
        lines = []
        for row in s.itertuples(index=False):
            line = (f"{row.condition:>16}: {row.n_correct}/{row.n} correct = {row.accuracy:.1%} "
                    f"(Wilson 95% CI {row.acc_low:.1%}-{row.acc_high:.1%})")
            if row.condition != self.reference and row.n_paired:
                line += (f"; vs {self.reference}: {row.diff:+.1%} [{row.diff_low:+.1%}, {row.diff_high:+.1%}], "
                         f"McNemar p={row.mcnemar_p:.3g}")
            lines.append(line)
        return "\n".join(lines)

    def to_csv(self, directory: Union[str, Path]) -> Dict[str, Path]:
        """Write items.csv, summary.csv, by_difficulty.csv (and saliency_compare.csv when
        there are maps to compare) into ``directory``; returns the paths by name."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        items = self.items.copy()
        items["events"] = items["events"].map(lambda e: json.dumps(e, sort_keys=True))
        paths = {"items": directory / "items.csv", "summary": directory / "summary.csv",
                 "by_difficulty": directory / "by_difficulty.csv"}
        items.to_csv(paths["items"], index=False)
        self.summary().to_csv(paths["summary"], index=False)
        self.by_difficulty().to_csv(paths["by_difficulty"], index=False)
        comparison = self.compare_saliency() if self.saliency else pd.DataFrame()
        if not comparison.empty:
            paths["saliency_compare"] = directory / "saliency_compare.csv"
            comparison.to_csv(paths["saliency_compare"], index=False)
        return paths

    def report(self, *, title: Optional[str] = None, notes: str = "", maps: int = 2):
        """A `stepflow_tl.viz.Report`: notes, the summary table, accuracy by difficulty,
        correct-vs-incorrect saliency comparisons and step maps of up to ``maps`` correct
        and ``maps`` incorrect traces per condition that has maps."""
        cfg = self.config
        report = Report(title or f"Study: {', '.join(self.conditions)} on {cfg.get('model', '?')}")
        facts = (
            f"model: {cfg.get('model')} | problems: {cfg.get('n_problems')} | samples per problem: "
            f"{cfg.get('samples')} | decoding: {'sampling T=%s top_p=%s' % (cfg.get('temperature'), cfg.get('top_p')) if cfg.get('do_sample') else 'greedy'}"
            f" | max_new_tokens: {cfg.get('max_new_tokens')} | seed: {cfg.get('seed')}"
            f" | steps: {cfg.get('trace_format', '?')} format, split '{cfg.get('split', '?')}'"
            f"{' (auto)' if cfg.get('format') == 'auto' else ''}"
        )
        report.add_text(facts, css_class="note")
        if notes:
            report.add_text(notes)
        report.add_heading("Results per condition")
        report.add_text(
            f"accuracy with its Wilson 95% interval. 'vs {self.reference}': the paired difference in "
            f"accuracy (condition minus {self.reference}, percentage points) with a percentile bootstrap 95% "
            f"interval over problems. changed outputs: outputs that differ from {self.reference}'s. only condition "
            f"right / only {self.reference} right: the discordant pairs McNemar's exact test counts; p (Holm): "
            f"Holm-adjusted across conditions. time ratio: wall time relative to {self.reference}. A dash: "
            f"not defined for that row (the {self.reference} row has no difference to itself). summary.csv holds the same numbers unrounded, under their machine "
            f"names (acc_low, diff_low, b01, mcnemar_p, ...).", css_class="note")
        summary = self.summary()
        shown = summary.astype({c: "float64" for c in ("diff", "diff_low", "diff_high")})
        # The reference's difference to itself is 0 by construction: a dash says "not a result".
        shown.loc[shown["condition"] == self.reference, ["diff", "diff_low", "diff_high"]] = math.nan
        report.add_table(shown[SUMMARY_ACCURACY], caption="Summary: accuracy", kinds=SUMMARY_KINDS, headers={
            "n_correct": "correct", "diff": f"vs {self.reference}", "b01": "only condition right",
            "b10": f"only {self.reference} right"}, estimates={"acc_low": "accuracy"})
        report.add_table(shown[SUMMARY_COST], caption="Summary: cost", kinds=SUMMARY_KINDS)
        diff = self.by_difficulty()
        if not diff.empty:
            report.add_heading("Accuracy by difficulty")
            report.add_figure(plot_accuracy_by_difficulty(diff, title="Accuracy by difficulty (Wilson 95% intervals)"),
                              caption="Error bars: Wilson 95% intervals per condition and difficulty.")
            report.add_table(diff, caption="Accuracy by difficulty", kinds=BY_DIFFICULTY_KINDS)
        if self.saliency:
            comparison = self.compare_saliency()
            if not comparison.empty:
                report.add_heading("Step-Saliency: correct vs incorrect traces")
                bands = comparison[comparison["level"] == "band"].drop(columns=["level", "layer"])
                report.add_table(bands, caption="Per band (effect: Cliff's delta, positive = correct larger)")
            report.add_heading("Step maps of example traces")
            for cond in self.conditions:
                correct, incorrect = self.saliency_groups(cond)
                for label, group in (("correct", correct), ("incorrect", incorrect)):
                    for result in group[:maps]:
                        m = result.meta
                        report.add_step_maps(
                            result, title=f"{cond}: {m.get('problem_id')} sample {m.get('sample')} ({label})")
        report.add_heading("Example outputs")
        shown = self.items.groupby("condition", sort=False).head(3)
        report.add_table(shown[["problem_id", "condition", "sample", "gold", "extracted", "correct", "n_tokens",
                                "output"]], caption="First items of each condition")
        return report

    def save_html(self, path: Union[str, Path], **kwargs: Any) -> Path:
        """Write the self-contained HTML report (see `report`)."""
        return self.report(**kwargs).save(path)
