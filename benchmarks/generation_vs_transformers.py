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
of the batch / wall time of the call. Ratios are printed against ``transformers``.

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
            new = out[:, batch["input_ids"].shape[1]:]
            # tokens up to and including each row's first EOS, as `generate` counts them
            return sum(int(row.tolist().index(tok.eos_token_id)) + 1 if tok.eos_token_id in row.tolist()
                       else row.shape[0] for row in new)
    else:
        import contextlib

        import stepflow_tl.interventions.generate as generation
        from stepflow_tl import StepFlow, generate, load_model

        if args.variant in ("bridged", "explicit"):
            generation.bypass_idle_bridges = lambda model: contextlib.nullcontext()
        model = load_model(device="cpu")
        n_layers = model.cfg.n_layers
        forced = [(f"blocks.{layer}.attn.hook_pattern", lambda x, hook: None) for layer in range(n_layers)]

        def run():
            hooks = model.hooks(fwd_hooks=forced if args.variant == "explicit" else [])
            with hooks:
                out = generate(model, questions, max_new_tokens=args.new_tokens,
                               interventions=[StepFlow()] if args.variant == "stepflow" else ())
            return sum(len(g.output_ids) for g in out)

    run()  # warm-up: first-call allocations and caches
    start = time.perf_counter()
    n_tokens = run()
    seconds = time.perf_counter() - start
    C.emit({"tokens": n_tokens, "seconds": seconds, "tok_s": n_tokens / seconds})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.batch = args.batch[0]
        return worker(args)

    rows = []
    for batch in args.batch:
        best = {v: None for v in args.variants}
        tokens = {}
        for rep in range(args.repeats):
            order = args.variants[rep % len(args.variants):] + args.variants[: rep % len(args.variants)]
            for variant in order:
                res = C.run_worker([__file__, "--worker", "--variant", variant, "--batch", batch,
                                    "--new-tokens", args.new_tokens])
                if not res["ok"]:
                    print(f"  batch {batch} {variant}: {res['error']}", file=sys.stderr, flush=True)
                    continue
                tokens[variant] = res["tokens"]
                best[variant] = max(best[variant] or 0.0, res["tok_s"])
                print(f"  batch {batch} {variant:12s} run {rep + 1}: {res['tok_s']:.2f} tok/s "
                      f"({res['tokens']} tokens)", file=sys.stderr, flush=True)
        base = best.get("transformers")
        for variant in args.variants:
            speed = best[variant]
            ratio = f"{speed / base:.2f}" if speed and base else "-"
            rows.append([batch, variant, tokens.get(variant, "-"), f"{speed:.2f}" if speed else "-", ratio])
    print(f"Generation vs transformers (SDPA), SmolLM2-135M fp32, CPU, {C.n_threads()} thread(s), greedy, "
          f"max_new_tokens={args.new_tokens}, best of {args.repeats} interleaved runs, one process each")
    print(C.table(["batch", "variant", "tokens", "tok/s", "x transformers"], rows))


if __name__ == "__main__":
    main()
