"""``stepflow-tl generate``: KV-cached generation, optionally with StepFlow or its parts."""

from __future__ import annotations

import json

from ..interventions import OddsEqualBridge, StepFlow, StepMomentum, generate
from ..traces.formats import FORMAT_CHOICES, SPLIT_CHOICES
from .common import add_model_args, load_from_args, parse_layers


def interventions_from_args(args) -> list:
    oeb = OddsEqualBridge(layers=args.oeb, tau_max=args.tau_max) if args.oeb is not None else None
    smi = StepMomentum(layers=args.smi, alpha=args.alpha, beta=args.beta) if args.smi is not None else None
    if args.stepflow:
        return [StepFlow(oeb=oeb, smi=smi)]
    return [i for i in (oeb, smi) if i is not None]


def cmd_generate(args) -> int:
    model = load_from_args(args)
    interventions = interventions_from_args(args)
    (result,) = generate(
        model, [args.prompt], max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        interventions=interventions, format=args.format, chat=not args.raw, split=args.split,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.text)
    events = result.to_dataframe()
    print(f"\n--- {len(result.output_ids)} tokens, stop: {result.stop_reason}, {result.format} format, "
          f"{result.trace.n_steps} steps by the '{result.split}' split, "
          f"{result.tokens_per_s:.1f} tokens/s; interventions: {', '.join(result.interventions) or 'none'}")
    if len(events):
        summary = events.groupby(["intervention", "layer"]).agg(
            queries=("position", "count"), lambda_b=("lambda_b", "mean"), kl=("kl", "mean"),
            injected_norm=("injected_norm", "mean"),
        )
        print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="KV-cached generation, optionally with StepFlow")
    gen.add_argument("prompt", help="the question (rendered through the chat template unless --raw)")
    add_model_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy")
    gen.add_argument("--temperature", type=float, default=0.6)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--format", choices=FORMAT_CHOICES, default="auto")
    gen.add_argument("--split", choices=SPLIT_CHOICES, default="auto",
                     help="how the output is cut into steps (auto: lines for the plain format, else blank_lines)")
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
