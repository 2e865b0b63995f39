"""Benchmark 7: a study on a long-tailed workload, batches run one after another vs one
refilling batch.

``--items`` problems (questions of ``r1_traces.jsonl``, which has 71), one condition (baseline), sampled
(temperature 1). Random weights never say EOS, so the workload gets its long tail from a
rule applied at every decoding step (`ModelAdapter.decode`): a row ends after any token
whose id is a multiple of ``--end-every`` (a 1-in-k chance per token, so answer lengths are
geometric, mean ~k, capped at ``--max-new-tokens``). The rule reads only the row's own token,
so every variant gives every item the same tokens. Variants:

- ``static``: `evaluate` before issue 24: one `generate` per ``--batch`` consecutive items,
  every row running until the batch's longest ends (``static_batch=True``);
- ``per_batch``: `evaluate` before this change: the same calls, finished rows leaving
  (the batch shrinks, but the next items wait for the whole batch to end);
- ``refilling``: `evaluate` now: one `generate` for the condition's items, a finished item
  leaving and the next one joining with its own seed.

The first two replay the old loop (``generate`` per batch, each item's seed, `grade`); the
last one is `evaluate` itself. Printed per variant: decoding steps and row-steps run, the
wasted fraction (row-steps of rows that had already finished / all row-steps), the batch's
occupancy (useful row-steps / ``batch`` x decoding steps: a batch that shrinks without
refilling runs part-empty), tokens / wall time and the ratios.
One fresh process per measurement, variants interleaved, best of ``--repeats``. The model is
a random-weight 4-layer Llama of SmolLM2-135M's width.

Run::

    .venv/bin/python benchmarks/study_long_tail.py
    .venv/bin/python benchmarks/study_long_tail.py --items 32 --max-new-tokens 128 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from saliency_tiled_scaling import SMOLLM2_WIDTH, build_model  # noqa: E402

VARIANTS = ("static", "per_batch", "refilling")


def worker(args) -> None:
    import torch

    from stepflow_tl import Problem, evaluate, generate
    from stepflow_tl.study.grading import grade
    from stepflow_tl.study.problems import prompt_for
    from stepflow_tl.study.run import item_seed
    from stepflow_tl.tl.adapter import ModelAdapter

    C.set_threads()
    model = build_model(args.layers, 4096, SMOLLM2_WIDTH, torch.float32, "cpu")
    eos = model.tokenizer.eos_token_id
    problems = [Problem(f"q{i}", r["question"], "1", "integer") for i, r in enumerate(C.trace_records()[: args.items])]
    rows = []
    decode = ModelAdapter.decode

    def ending_and_counted(self, state, next_tokens):
        rows.append(next_tokens.shape[0])
        logits, state = decode(self, state, next_tokens)
        logits[next_tokens[:, 0] % args.end_every == 0, -1, eos] = 1e4
        return logits, state

    ModelAdapter.decode = ending_and_counted
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, seed=0)
    generate(model, [problems[0].question], max_new_tokens=4)  # warm-up
    rows.clear()
    start = time.perf_counter()
    if args.variant == "refilling":
        items = evaluate(model, problems, conditions=["baseline"], batch_size=args.batch, progress=False,
                         **kw).items
        items = items.assign(index=items["problem_id"].str[1:].astype(int)).sort_values("index")
        outputs = [[int(n), text] for n, text in zip(items["n_tokens"], items["output"])]
    else:
        outputs = []
        for first in range(0, len(problems), args.batch):
            batch = problems[first:first + args.batch]
            gens = generate(model, [prompt_for(p) for p in batch], row_seeds=[item_seed(0, first + j)
                                                                              for j in range(len(batch))],
                            static_batch=args.variant == "static", **kw)
            for p, g in zip(batch, gens):
                grade(g.text, p)
                outputs.append([len(g.output_ids), g.text])
    seconds = time.perf_counter() - start
    n_tokens = sum(n for n, _ in outputs)
    useful = n_tokens - len(outputs)  # the last token of a row is never run
    C.emit({"tokens": n_tokens, "seconds": seconds, "tok_s": n_tokens / seconds, "row_steps": sum(rows),
            "steps": len(rows), "wasted": 1 - useful / sum(rows), "occupancy": useful / (args.batch * len(rows)),
            "outputs": outputs})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--end-every", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    best, results = C.interleaved_best(
        VARIANTS, args.repeats,
        lambda variant: [__file__, "--worker", "--variant", variant, "--items", args.items, "--batch", args.batch,
                         "--max-new-tokens", args.max_new_tokens, "--end-every", args.end_every,
                         "--layers", args.layers],
        lambda res: (f"{res['tok_s']:.1f} tok/s, {res['row_steps']} row-steps, {res['wasted']:.1%} wasted, "
                     f"{res['occupancy']:.1%} occupied"))
    same = len({repr(o) for outs in results.values() for o in outs}) == 1
    lengths = sorted(n for n, _ in next(iter(best.values()))["outputs"]) if best else []
    ratio = lambda v, base: f"{best[v]['tok_s'] / best[base]['tok_s']:.2f}" if base in best else "-"
    rows = [[v, best[v]["tokens"], best[v]["steps"], best[v]["row_steps"], f"{best[v]['wasted']:.1%}",
             f"{best[v]['occupancy']:.1%}", f"{best[v]['tok_s']:.1f}", ratio(v, "static"), ratio(v, "per_batch")]
            for v in VARIANTS if v in best]
    print(f"Study, long-tailed: {len(lengths)} items, batch {args.batch}, answer lengths {lengths} "
          f"(EOS after a token id divisible by {args.end_every}, at most {args.max_new_tokens}), random "
          f"{args.layers}-layer SmolLM2-width Llama (bridge), fp32, CPU, {C.n_threads()} thread(s), sampled, "
          f"best of {args.repeats} interleaved runs, one process each; same tokens in every run: {same}")
    print(C.table(["variant", "tokens", "decoding steps", "row-steps", "wasted row-steps", "batch occupancy",
                   "tok/s", "x static", "x per_batch"], rows))


if __name__ == "__main__":
    main()
