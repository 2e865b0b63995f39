"""``stepflow-tl generate``: KV-cached generation, optionally with StepFlow or its parts."""

from __future__ import annotations

import json

from ..errors import StepflowError
from ..interventions import OddsEqualBridge, StepFlow, StepMomentum, generate, resolve_layers
from ..interventions.base import layer_indices
from ..traces.formats import FORMAT_CHOICES, REASONING_EFFORTS, SPLIT_CHOICES
from .common import (
    SAMPLING_DEFAULTS,
    add_engine_arg,
    add_model_args,
    check_engine_args,
    check_flags,
    check_sampling_flags,
    load_from_args,
    parse_layers,
    refuse_unused,
)


def interventions_from_args(args) -> list:
    """The interventions of ``stepflow-tl generate``. ``--stepflow`` is OEB and SMI with
    the paper's defaults; ``--oeb``/``--smi`` pick layers (alone, or inside
    ``--stepflow``); ``--tau-max`` tunes whichever OEB runs and ``--alpha``/``--beta``
    whichever SMI runs. A value without an intervention it could tune is refused."""
    with_oeb = args.stepflow or args.oeb is not None
    with_smi = args.stepflow or args.smi is not None
    if not with_oeb:
        refuse_unused(args, {"tau_max": "--tau-max"}, "without --oeb LAYERS or --stepflow, which run the Odds-Equal "
                      "Bridge", "add one of them or drop the flag")
    if not with_smi:
        refuse_unused(args, {"alpha": "--alpha", "beta": "--beta"}, "without --smi LAYERS or --stepflow, which run Step "
                      "Momentum Injection", "add one of them or drop the flag")

    def build(cls, flags, **given):
        try:
            return cls(**{k: v for k, v in given.items() if v is not None})
        except StepflowError as exc:
            raise StepflowError(f"{flags}: {exc}") from None

    oeb = build(OddsEqualBridge, "--oeb/--tau-max", layers=args.oeb, tau_max=args.tau_max) if with_oeb else None
    smi = (build(StepMomentum, "--smi/--alpha/--beta", layers=args.smi, alpha=args.alpha, beta=args.beta)
           if with_smi else None)
    if args.stepflow:
        return [StepFlow(oeb=oeb, smi=smi)]
    return [i for i in (oeb, smi) if i is not None]


def cmd_generate(args) -> int:
    if not args.sample:
        refuse_unused(args, {"temperature": "--temperature", "top_p": "--top-p", "seed": "--seed"},
                      "without --sample (greedy decoding draws nothing)", "add --sample or drop the flag")
    check_flags(args, ints=[("max_new_tokens", 1, None)])
    check_sampling_flags(args)
    if args.preset is not None:
        refuse_unused(args, {"stepflow": "--stepflow", "oeb": "--oeb", "smi": "--smi", "beta": "--beta"},
                      "with --preset (it chooses the layers)", "drop the flag, or drop --preset")
    interventions = [] if args.preset else interventions_from_args(args)  # before loading: a bad flag costs nothing
    check_engine_args(args)
    vllm = args.engine == "vllm"
    if vllm:
        refuse_unused(args, {"preset": "--preset", "split_summary": "--split-summary",
                             "reasoning_effort": "--reasoning-effort"}, "with --engine vllm (not there yet)",
                      "drop the flag or use the TL engine")
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    model = load_from_args(args)
    if args.preset == "gpt-oss":
        interventions = [StepFlow.gpt_oss(model, tau_max=args.tau_max, alpha=args.alpha)]
    for iv in [p for i in interventions for p in getattr(i, "parts", lambda: [i])()]:
        flag = "--oeb" if isinstance(iv, OddsEqualBridge) else "--smi"
        try:
            layers = layer_indices(iv.layers, model.n_layers) if vllm else resolve_layers(iv.layers, model)
            if vllm and max(layers) >= model.n_layers:
                raise StepflowError(f"layers {[x for x in layers if x >= model.n_layers]} are outside the model, "
                                    f"which has {model.n_layers} layers")
        except StepflowError as exc:
            raise StepflowError(f"{flag} {getattr(args, flag[2:]) or iv.layers}: {exc}") from None
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, interventions=interventions,
                   format=args.format, chat=not args.raw, split=args.split,
                   **{**SAMPLING_DEFAULTS, **{k: v for k, v in sampling.items() if v is not None}})
    if not vllm:
        options.update(split_summary=args.split_summary, reasoning_effort=args.reasoning_effort)
    results = model.generate(args.prompt, **options) if vllm else generate(model, args.prompt, **options)
    if args.json:
        # one object per prompt (one line each when there are several)
        for result in results:
            print(json.dumps(result.to_dict(), indent=2 if len(results) == 1 else None))
        return 0
    for result in results:
        _print_result(result)
    return 0


def _print_result(result) -> None:
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


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="KV-cached generation, optionally with StepFlow")
    gen.add_argument("prompt", nargs="+", help="the questions (each rendered through the chat template unless --raw)")
    add_model_args(gen)
    add_engine_arg(gen)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy")
    gen.add_argument("--temperature", type=float, default=None,
                     help=f"with --sample (default {SAMPLING_DEFAULTS['temperature']})")
    gen.add_argument("--top-p", type=float, default=None, help=f"with --sample (default {SAMPLING_DEFAULTS['top_p']})")
    gen.add_argument("--seed", type=int, default=None, help="with --sample (default 0)")
    gen.add_argument("--format", choices=FORMAT_CHOICES, default="auto")
    gen.add_argument("--split", choices=SPLIT_CHOICES, default="auto",
                     help="how the output is cut into steps (auto: lines for the plain format, else blank_lines; "
                     "sentences_min15: sentences, a short one joined to the next, as the authors do)")
    gen.add_argument("--split-summary", action="store_true",
                     help="also split the summary into steps (the authors' convention; default: the summary is one step)")
    gen.add_argument("--preset", choices=("gpt-oss",), default=None,
                     help="gpt-oss: StepFlow with OEB only on the full-attention layers of the model config's "
                          "layer_types (the authors' GPT-OSS runs); --tau-max/--alpha tune it")
    gen.add_argument("--reasoning-effort", choices=REASONING_EFFORTS, default=None,
                     help="harmony's reasoning effort in the prompt (GPT-OSS chat templates)")
    gen.add_argument("--raw", action="store_true", help="the prompt is already rendered text")
    gen.add_argument("--stepflow", action="store_true",
                     help="OEB + SMI with the paper's defaults (--oeb/--smi set their layers, --tau-max/--alpha/"
                     "--beta their strengths)")
    gen.add_argument("--oeb", type=parse_layers, default=None, metavar="LAYERS",
                     help="Odds-Equal Bridge on these layers (bottom_quarter, 0-6, 0,1,2)")
    gen.add_argument("--tau-max", type=float, default=None,
                     help="cap of the bridge target, in [0, 1) (default 0.15); with --oeb or --stepflow")
    gen.add_argument("--smi", type=parse_layers, default=None, metavar="LAYERS",
                     help="Step Momentum Injection on these layers (top_quarter, 23-29, ...)")
    gen.add_argument("--alpha", type=float, default=None,
                     help="injection strength, any finite number (default 0.06); with --smi or --stepflow")
    gen.add_argument("--beta", type=float, default=None,
                     help="momentum decay over steps, in [0, 1) (default 0); with --smi or --stepflow")
    gen.add_argument("--json", action="store_true",
                     help="print each result (prompt_ids, output_ids, text, events, trace) as JSON, one object per prompt")
    gen.set_defaults(func=cmd_generate)
