"""``stepflow-tl resample``: Thought Anchors' resampling importance of one trace's thinking
steps, with its Step-Saliency maps and receiver heads beside it in the report."""

from __future__ import annotations

import numpy as np

from ..errors import StepflowError
from ..saliency import step_saliency
from ..saliency.receivers import PROXIMITY_IGNORE, receiver_heads
from ..study.problems import Problem
from ..study.resampling import resampling_importance
from ..traces import load_traces
from ..viz import Report, plot_receiver_heads
from .common import add_model_args, load_from_args, prepare_out


def cmd_resample(args) -> int:
    if args.index < 0:
        raise StepflowError(f"--index must be >= 0, got {args.index}")
    if args.n_samples < 2:
        raise StepflowError(f"--n-samples must be >= 2 (one continuation is no distribution), got {args.n_samples}")
    model = load_from_args(args)
    traces = load_traces(args.traces, model)
    if args.index >= len(traces):
        raise StepflowError(f"--index {args.index}: {args.traces} has {len(traces)} traces")
    trace = traces[args.index]
    gold = trace.meta.get("gold", trace.meta.get("answer"))
    if gold in (None, ""):
        raise StepflowError(f"record {args.index} of {args.traces} has no 'gold' (or 'answer'); resampling grades "
                            "the continuations against it")
    question = "\n\n".join(trace.steps[i].text for i in trace.question_steps)
    problem = Problem(id=str(trace.meta.get("id", args.index)), question=question, answer=str(gold), kind=args.kind)
    out = prepare_out(args.out)
    result = resampling_importance(model, trace, problem, n_samples=args.n_samples,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                                   results_path=out / "rollouts.jsonl", progress=not args.no_progress)
    result.steps.to_csv(out / "importance.csv", index=False)
    result.save_step_importance(out / "step_importance.json")
    report = Report(f"Resampling importance of {args.traces}, record {args.index}")
    report.add_table(result.steps.drop(columns=["text"]),
                     caption=f"{args.n_samples} continuations per prefix; importance = accuracy with the step - "
                             "without it, and KL(answers without || with)")
    if not args.no_maps:
        maps = step_saliency(model, trace, mode="auto")
        report.add_step_maps(maps, title="Step-Saliency of the trace")
        try:
            found = receiver_heads(model, trace, proximity_ignore=args.proximity_ignore)
        except StepflowError as exc:  # too few steps for the proximity window: say so, keep the rest
            report.add_text(f"receiver heads: {exc}", css_class="note")
        else:
            importance = np.full(len(found.steps), np.nan)
            for step, value in zip(result.steps["step"], result.steps["importance_accuracy"]):
                if step in found.steps:
                    importance[found.steps.index(step)] = value
            report.add_figure(plot_receiver_heads(found.kurtosis, found.layers, found.step_scores(),
                                                  found.step_labels, importance=importance,
                                                  importance_label="resampling importance (accuracy)"),
                              caption="receiver heads (kurtosis, receiver score per step) beside the resampling "
                                      "importance of each thinking step")
    path = report.save(out / "report.html")
    print(f"wrote {out / 'importance.csv'}, {out / 'step_importance.json'} and {path}")
    return 0


def add_commands(sub) -> None:
    rs = sub.add_parser("resample", help="resampling importance of a trace's thinking steps (Thought Anchors)")
    rs.add_argument("traces", help="JSONL/JSON file of records with 'question', 'output' and 'gold'")
    add_model_args(rs)
    rs.add_argument("--index", type=int, default=0, help="which record (default 0)")
    rs.add_argument("--kind", choices=("math", "integer", "choice"), default="math", help="how the gold is graded")
    rs.add_argument("--n-samples", type=int, default=8, help="continuations per prefix (>= 2)")
    rs.add_argument("--max-new-tokens", type=int, default=128,
                    help="budget of each continuation (default 128; cost: (thinking steps + 1) x N x this)")
    rs.add_argument("--temperature", type=float, default=0.6)
    rs.add_argument("--top-p", type=float, default=0.95)
    rs.add_argument("--seed", type=int, default=0)
    rs.add_argument("--batch-size", type=int, default=None,
                    help="rollouts decoded at once (default: --n-samples); the batch refills across prefixes")
    rs.add_argument("--proximity-ignore", type=int, default=PROXIMITY_IGNORE)
    rs.add_argument("--no-maps", action="store_true", help="skip the step maps and receiver heads in the report")
    rs.add_argument("--no-progress", action="store_true")
    rs.add_argument("--out", required=True, help="directory: rollouts.jsonl (resumable), importance.csv, "
                                                 "step_importance.json, report.html")
    rs.set_defaults(func=cmd_resample)
