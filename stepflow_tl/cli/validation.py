"""``stepflow-tl validate``: does StepFlow repair the step maps beyond matched controls,
does saliency agree with step knockout, correct vs incorrect (docs/validation.md)."""

from __future__ import annotations

import warnings

from ..errors import StepflowError
from ..saliency.losses import LOSSES
from ..study import CONDITIONS, VALIDATION_CONDITIONS, ValidationConfig, validate
from ..traces import TraceWarning, load_traces
from ..traces.formats import SPLIT_CHOICES
from .common import (
    add_model_args,
    check_flags,
    launch_state,
    load_from_args,
    prepare_out,
    refuse_unused,
    trace_records_from_args,
)


def add_validate_arguments(parser) -> None:
    """Arguments of ``stepflow-tl validate``."""
    parser.add_argument("traces", help="JSONL/JSON file of records with 'question' and 'output' (and 'correct')")
    add_model_args(parser)
    parser.add_argument("--out", required=True, help="directory for results.jsonl, the CSV files and report.html")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="cut every trace to its first N tokens (default: the model's context)")
    parser.add_argument("--skip-longer", action="store_true",
                        help="with --max-tokens: leave out longer traces instead of cutting them")
    parser.add_argument("--limit", type=int, default=None, help="only the first N traces (after --skip-longer)")
    parser.add_argument("--conditions", default=",".join(VALIDATION_CONDITIONS),
                        help=f"comma-separated, with 'baseline'; names from: {', '.join(CONDITIONS)}")
    parser.add_argument("--max-key-steps", type=int, default=8,
                        help="knock out at most N steps per trace (seeded sample; -1: all)")
    parser.add_argument("--knockout-bands", action="store_true",
                        help="also knock out in each layer band alone (3 more forwards per key step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="blank_lines",
                        help="how the thinking is cut into steps (default blank_lines; sentences_min15: the authors' sentences)")
    parser.add_argument("--split-summary", action="store_true",
                        help="also split the summary into steps (the authors' convention; default: the summary is one step)")
    parser.add_argument("--loss", choices=LOSSES, default="sequence")
    parser.add_argument("--mode", choices=("dense", "bounded"), default="bounded")
    parser.add_argument("--n-boot", type=int, default=10000)
    parser.add_argument("--maps-in-report", type=int, default=3)
    parser.add_argument("--resampling", type=int, default=0, metavar="N",
                        help="also measure Thought Anchors' resampling importance (N >= 2 continuations per prefix, "
                             "graded against each record's 'gold') and how Step-Saliency, receiver heads and "
                             "knockout agree with it (slow: (thinking steps + 1) x N generations per trace)")
    parser.add_argument("--resampling-tokens", type=int, default=128, help="token budget of each continuation")
    parser.add_argument("--resampling-kind", choices=("math", "integer", "choice"), default="math",
                        help="how the gold of the records is graded")
    parser.add_argument("--no-progress", action="store_true")


def traces_from_args(args, model) -> tuple:
    """``(traces, settings for the config)`` as the command line asks."""
    limit = args.max_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)  # cut traces: `complete` says it
        steps = {"split": args.split, "split_summary": args.split_summary}
        if limit is not None and args.skip_longer:
            traces = [t for t in load_traces(args.traces, model, max_tokens=10 ** 9, **steps) if t.n_tokens <= limit]
        else:
            traces = load_traces(args.traces, model, max_tokens=limit, truncate=limit is not None, **steps)
    for i, t in enumerate(traces):
        t.meta.setdefault("trace_id", t.meta.get("record_index", i))
    if not traces:
        raise StepflowError(f"every trace of {args.traces} is longer than --max-tokens {limit}, so --skip-longer "
                            "left none; raise --max-tokens or drop --skip-longer to cut them instead")
    if args.limit:
        traces = traces[: args.limit]
    settings = {"max_tokens": limit, "longer": "skip" if args.skip_longer else "cut"}
    if args.split != "blank_lines" or args.split_summary:  # only then, so older results files still resume
        settings.update(split=args.split, split_summary=args.split_summary)
    return traces, settings


def run_validate_cli(args) -> int:
    """The study, then (main process) the CSV files and the report. Every flag and the
    trace file are checked before the model loads."""
    if args.max_tokens is None:
        refuse_unused(args, {"skip_longer": "--skip-longer"}, "without --max-tokens N",
                      "add --max-tokens N (traces longer than N are left out) or drop --skip-longer")
    check_flags(args, ints=[("max_tokens", 1, None), ("limit", 1, None), ("max_key_steps", -1, None),
                            ("n_boot", 100, None), ("maps_in_report", 0, None)])
    config = ValidationConfig(conditions=args.conditions,
                              max_key_steps=None if args.max_key_steps < 0 else args.max_key_steps,
                              knockout_bands=args.knockout_bands, seed=args.seed, loss=args.loss, mode=args.mode,
                              n_boot=args.n_boot, maps_in_report=args.maps_in_report, resampling=args.resampling,
                              resampling_tokens=args.resampling_tokens, resampling_kind=args.resampling_kind)
    prepare_out(args.out)
    trace_records_from_args(args.traces)
    state = launch_state(args)
    model = load_from_args(args)
    traces, settings = traces_from_args(args, model)
    result = validate(model, traces, args.out, config=config, progress=not args.no_progress, **settings)
    if not state or state.is_main_process:
        paths = result.to_csv()
        print(f"report: {result.save_html()}")
        print(f"csv: {', '.join(str(p) for p in paths.values())}")
        print(result.headline())
    return 0


def add_commands(sub) -> None:
    va = sub.add_parser("validate", help="does StepFlow repair the maps, beyond matched controls; does "
                        "saliency agree with step knockout; correct vs incorrect")
    add_validate_arguments(va)
    va.set_defaults(func=run_validate_cli)
