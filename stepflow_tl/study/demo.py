"""The demo (``stepflow-tl demo``, ``make demo``): a small paired study on the embedded SmolLM2-135M-Instruct.

Greedy decoding on the built-in arithmetic suite under the baseline, StepFlow and its
matched random control (``random_stepflow``: a random bridge of the same size and a
random direction of the same norm, at the same layers and positions), a couple of
Step-Saliency maps, and one HTML report. More conditions: ``stepflow-tl eval/ablate``. The study
streams to ``OUT/results.jsonl``, so a second run resumes (or just re-renders).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

from ..checks import check_int
from ..errors import StepflowError
from ..tl.models import load_model
from .conditions import CONDITIONS
from .problems import builtin_suite
from .run import evaluate


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs: the built-in suite's ``levels`` x ``n_per_level`` problems
    under ``conditions``, greedy, at most ``max_new_tokens`` per answer, and Step-Saliency
    maps of up to ``saliency`` correct and ``saliency`` incorrect traces per condition."""

    levels: Tuple[int, ...] = (1, 2, 3)
    n_per_level: int = 6
    conditions: Tuple[str, ...] = ("baseline", "stepflow", "random_stepflow", "oeb")
    max_new_tokens: int = 80
    batch_size: int = 9
    saliency: int = 1
    seed: int = 0

    def __post_init__(self):
        if not self.levels or not self.conditions:
            raise StepflowError("DemoConfig needs at least one level and one condition")
        for i, level in enumerate(self.levels):
            check_int(f"DemoConfig.levels[{i}]", level, low=1)
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown:
            raise StepflowError(f"DemoConfig.conditions: unknown {unknown}; expected names from {sorted(CONDITIONS)}")
        for name in ("n_per_level", "max_new_tokens", "batch_size"):
            check_int(f"DemoConfig.{name}", getattr(self, name), low=1)
        check_int("DemoConfig.saliency", self.saliency, low=0)
        check_int("DemoConfig.seed", self.seed)


FULL = DemoConfig()
QUICK = DemoConfig(levels=(1, 2), n_per_level=1, conditions=("baseline", "stepflow"), max_new_tokens=16,
                   batch_size=2, saliency=0)

HONESTY = (
    "Read these numbers for what they are. {model_note} {n} problems are far too few to detect "
    "effects of a few points. The demo shows "
    "the study machinery (paired seeds, grading, statistics, report) on a model that runs on a laptop; "
    "it does not test the paper's claim. Accuracy intervals are Wilson 95% intervals for each "
    "condition on these problems; 'vs baseline' is the paired difference (condition minus baseline) "
    "with a percentile bootstrap 95% interval over problems; an interval that contains 0 means no "
    "detectable difference at this sample size. McNemar's exact p tests the same pairing."
)
SMOLLM2_NOTE = (
    "SmolLM2-135M-Instruct is a small instruct model, not a reasoning model: its answers are a few "
    "sentences, not the long thinking traces StepFlow was designed for."
)


def honesty_note(model_name: str, n_problems: int) -> str:
    """The caveat printed with the demo's numbers."""
    note = SMOLLM2_NOTE if "SmolLM2" in model_name else f"This run used {model_name}, not the embedded SmolLM2."
    return HONESTY.format(model_note=note, n=n_problems)


def run_demo(out: Union[str, Path], *, quick: bool = False, model_name: Optional[str] = None, progress: bool = True):
    """Run the demo study; returns ``(StudyResult, report path, seconds)``."""
    cfg = QUICK if quick else FULL
    out = Path(out)
    t0 = time.perf_counter()
    model = load_model(model_name, device="cpu")
    problems = builtin_suite(n_per_level=cfg.n_per_level, levels=cfg.levels, seed=cfg.seed)
    result = evaluate(
        model, problems, conditions=cfg.conditions, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size, results_path=out / "results.jsonl", progress=progress, saliency=cfg.saliency,
    )
    result.to_csv(out)
    notes = honesty_note(result.config["model"], len(problems))
    report = result.save_html(out / "report.html", title="stepflow_tl demo: StepFlow on SmolLM2-135M-Instruct",
                              notes=notes)
    return result, report, time.perf_counter() - t0
