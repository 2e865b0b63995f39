"""Benchmark 5: `generate` against transformers' own `generate` (SDPA attention).

Greedy decoding of the same prompts (questions of ``r1_traces.jsonl``, rendered with the
chat template, left-padded) on the embedded SmolLM2-135M-Instruct, fp32, CPU:

- ``transformers``: ``AutoModelForCausalLM`` with ``attn_implementation="sdpa"``,
  ``model.generate(do_sample=False)``: the speed a user gets without this plugin;
- ``plain``: ``stepflow_tl.generate(model, prompts)`` (layers whose pattern nothing
  reads run the fused kernel; bridge components no hook watches run as the transformers
  modules they wrap, `tl.bypass`);
- ``stepflow``: ``stepflow_tl.generate(model, prompts, interventions=[StepFlow()])``;
- ``bridged``: ``plain`` with every bridge component kept (the bypass replaced by a
  no-op): what `generate` did before the bypass;
- ``explicit``: ``bridged`` with a do-nothing hook on every ``hook_pattern``, which forces
  every layer onto the explicit attention path: what `generate` did before issue 24.

One fresh process per measurement (model load excluded, one warm-up call, then the
timed call), the variants interleaved and rotated, ``--repeats`` times; the best
tokens/s of the repeats is kept (noise only slows a run). Tokens/s is generated tokens
of the batch / wall time of the call (``--clock cpu``: the process's CPU time, which on a
shared machine leaves out the time other processes held the core). Ratios are printed against ``transformers``, and
whether every run's greedy tokens are transformers' own.

Run::

    .venv/bin/python benchmarks/generation_vs_transformers.py                  # batch 1 and 8
    .venv/bin/python benchmarks/generation_vs_transformers.py --batch 1 --new-tokens 32 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = ("transformers", "plain", "stepflow", "bridged", "explicit")


def worker(args) -> None:
    import torch

    C.set_threads()
    questions = [r["question"] for r in C.trace_records()][: args.batch]
    if args.variant == "transformers":
        from transformers import AutoModelForCausalLM

        from stepflow_tl.tl.models import embedded_hf_dir, load_embedded_tokenizer
        from stepflow_tl.traces.formats import render_prompt

        tok = load_embedded_tokenizer()
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(embedded_hf_dir(), dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
        texts = [render_prompt(tok, q) for q in questions]
        batch = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)

        def run():
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            new = out[:, batch["input_ids"].shape[1]:].tolist()
            # tokens up to and including each row's first EOS, as `generate` counts them
            return [row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in new]
    else:
        import contextlib
        import importlib

        from stepflow_tl import StepFlow, generate, load_model

        if args.variant in ("bridged", "explicit"):
            # (the package exports the function `generate` under the module's name)
            generation = importlib.import_module("stepflow_tl.interventions.generate")
            generation.bypass_idle_bridges = lambda model: contextlib.nullcontext()
        model = load_model(device="cpu")
        n_layers = model.cfg.n_layers
        forced = [(f"blocks.{layer}.attn.hook_pattern", lambda x, hook: None) for layer in range(n_layers)]

        def run():
            hooks = model.hooks(fwd_hooks=forced if args.variant == "explicit" else [])
            with hooks:
                out = generate(model, questions, max_new_tokens=args.new_tokens,
                               interventions=[StepFlow()] if args.variant == "stepflow" else ())
            return [g.output_ids for g in out]

    run()  # warm-up: first-call allocations and caches
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    start = clock()
    outputs = run()
    seconds = clock() - start
    n_tokens = sum(map(len, outputs))
    C.emit({"tokens": n_tokens, "seconds": seconds, "tok_s": n_tokens / seconds, "outputs": outputs})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time a call by wall clock or by the process's CPU time (with one thread, "
                             "the same on a quiet machine; on a shared one, CPU time leaves out the "
                             "time other processes held the core)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.batch = args.batch[0]
        return worker(args)

    rows = []
    for batch in args.batch:
        best, outputs = C.interleaved_best(
            args.variants, args.repeats,
            lambda variant: [__file__, "--worker", "--variant", variant, "--batch", batch,
                             "--new-tokens", args.new_tokens, "--clock", args.clock],
            lambda res: f"batch {batch}: {res['tok_s']:.2f} tok/s ({res['tokens']} tokens)")
        base = best.get("transformers", {}).get("tok_s")
        reference = outputs.get("transformers", [None])[0]
        for variant in args.variants:
            speed = best.get(variant, {}).get("tok_s")
            ratio = f"{speed / base:.2f}" if speed and base else "-"
            # greedy tokens of every run against transformers' (StepFlow changes them on purpose)
            same = "-" if reference is None or variant not in outputs else (
                "yes" if all(o == reference for o in outputs[variant]) else "no")
            rows.append([batch, variant, best.get(variant, {}).get("tokens", "-"), f"{speed:.2f}" if speed else "-",
                         ratio, same])
    print(f"Generation vs transformers (SDPA), SmolLM2-135M fp32, CPU, {C.n_threads()} thread(s), greedy, "
          f"max_new_tokens={args.new_tokens}, best of {args.repeats} interleaved runs, one process each, "
          f"{args.clock} clock")
    print(C.table(["batch", "variant", "tokens", "tok/s", "x transformers", "tokens as transformers"], rows))


if __name__ == "__main__":
    main()
