"""Benchmark 6: a long-tailed batch, static (rows kept until the longest ends) vs shrinking.

16 prompts (questions of ``r1_traces.jsonl``) whose answers end between 16 and 256
tokens (per-prompt ``max_new_tokens``, log-uniform: 16, 19, 23, ..., 256), greedy, one
`generate` call of batch 16:

- ``static``: ``static_batch=True``, what `generate` and studies did before issue 24:
  every row runs until the longest row ends;
- ``shrinking``: finished rows leave the batch (the default).

Printed per variant: decoding row-steps run (counted at ``ModelAdapter.decode``), the
wasted fraction (row-steps of rows that had already finished / all row-steps), generated
tokens / wall time, and the ratio of tokens/s to ``static``. One fresh process per
measurement, variants interleaved, best of ``--repeats``. The model is a random-weight
4-layer Llama of SmolLM2-135M's width (``--layers``), so a run takes a minute, not an hour.

Run::

    .venv/bin/python benchmarks/generation_long_tail.py
    .venv/bin/python benchmarks/generation_long_tail.py --longest 64 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from saliency_tiled_scaling import SMOLLM2_WIDTH, build_model  # noqa: E402

VARIANTS = ("static", "shrinking")


def budgets(n: int, shortest: int, longest: int) -> list:
    return [round(shortest * (longest / shortest) ** (k / (n - 1))) for k in range(n)]


def worker(args) -> None:
    import torch

    from stepflow_tl import generate
    from stepflow_tl.tl.adapter import ModelAdapter

    C.set_threads()
    model = build_model(args.layers, 4096, SMOLLM2_WIDTH, torch.float32, "cpu")
    questions = [r["question"] for r in C.trace_records()][: args.rows]
    lengths = budgets(args.rows, args.shortest, args.longest)
    rows = []
    decode = ModelAdapter.decode

    def counted(self, state, next_tokens):
        rows.append(next_tokens.shape[0])
        return decode(self, state, next_tokens)

    ModelAdapter.decode = counted
    kw = dict(max_new_tokens=lengths, static_batch=args.variant == "static")
    # Random weights never say EOS; the answers end at their budgets.
    generate(model, questions[:2], max_new_tokens=4)  # warm-up
    rows.clear()
    start = time.perf_counter()
    out = generate(model, questions, **kw)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(g.output_ids) for g in out)
    useful = sum(len(g.output_ids) - 1 for g in out)  # the last token of a row is never run
    C.emit({"tokens": n_tokens, "seconds": seconds, "tok_s": n_tokens / seconds, "row_steps": sum(rows),
            "wasted": 1 - useful / sum(rows), "outputs": [g.output_ids for g in out]})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--shortest", type=int, default=16)
    parser.add_argument("--longest", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    best, results = C.interleaved_best(
        VARIANTS, args.repeats,
        lambda variant: [__file__, "--worker", "--variant", variant, "--rows", args.rows, "--shortest",
                         args.shortest, "--longest", args.longest, "--layers", args.layers],
        lambda res: f"{res['tok_s']:.1f} tok/s, {res['row_steps']} row-steps, {res['wasted']:.1%} wasted")
    same = len({repr(o) for outs in results.values() for o in outs}) == 1
    base = best.get("static", {}).get("tok_s")
    rows = [[v, best[v]["tokens"], best[v]["row_steps"], f"{best[v]['wasted']:.1%}", f"{best[v]['tok_s']:.1f}",
             f"{best[v]['tok_s'] / base:.2f}" if base else "-"] for v in VARIANTS if v in best]
    print(f"Long-tailed batch: {args.rows} prompts, answers of {budgets(args.rows, args.shortest, args.longest)} "
          f"tokens, random {args.layers}-layer SmolLM2-width Llama (bridge), fp32, CPU, {C.n_threads()} thread(s), "
          f"greedy, best of {args.repeats} interleaved runs, one process each; same tokens in every run: {same}")
    print(C.table(["variant", "tokens", "decoding row-steps", "wasted row-steps", "tok/s", "x static"], rows))


if __name__ == "__main__":
    main()
