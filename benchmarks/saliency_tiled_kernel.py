"""Benchmark: one layer of tiled attention with Step-Saliency pooling against torch's fused
attention, at SmolLM2-135M's attention shape (9 query heads, 3 key/value heads of 64).

Per trace length, two variants, one fresh process each, best of ``--repeats`` calls inside it:

- ``sdpa``: ``scaled_dot_product_attention`` (causal, grouped-query) forward + backward, what
  the floor of `saliency_vs_authors.py` pays per layer;
- ``tiled`` (one per ``--blocks`` side): `tl.attention.tiled_attention_heads` forward +
  backward with a `saliency.tiled.TilePooler` pooling ``|A * dL/dA|`` of every tile into
  40-token steps, what tiled Step-Saliency pays per layer.

Printed: milliseconds per layer and the ratio tiled/sdpa.

Run::

    .venv/bin/python benchmarks/saliency_tiled_kernel.py                          # T = 1024 2048 4096, blocks 128 256
    .venv/bin/python benchmarks/saliency_tiled_kernel.py --tokens 2048 --blocks 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HEADS, KV_HEADS, D_HEAD, STEP_TOKENS = 9, 3, 64, 40


def worker(args) -> None:
    import torch

    from stepflow_tl.saliency.tiled import TilePooler
    from stepflow_tl.tl.attention import TileSpec, tiled_attention_heads
    from stepflow_tl.traces.pooling import step_onehot

    C.set_threads()
    n = args.tokens[0]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, n, D_HEAD, generator=g).requires_grad_()
    k = torch.randn(1, KV_HEADS, n, D_HEAD, generator=g).requires_grad_()
    v = torch.randn(1, KV_HEADS, n, D_HEAD, generator=g).requires_grad_()
    steps = torch.arange(n) // STEP_TOKENS
    onehot = step_onehot(steps, int(steps.max()) + 1)

    def call():
        if args.variant == "sdpa":
            z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            pooler = TilePooler(steps, onehot, HEADS, per_head=False)
            z = tiled_attention_heads(q, k, v, TileSpec(D_HEAD ** -0.5, block=int(args.variant)), on_tile=pooler)
        torch.autograd.grad(z.square().sum(), [q, k, v])

    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    C.emit({"seconds": best})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256], help="tile sides of tiled mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    variants = ["sdpa", *map(str, args.blocks)]
    rows = []
    for n in args.tokens:
        ms = {}
        for v in variants:
            res = C.run_worker([__file__, "--worker", "--variant", v, "--tokens", n, "--repeats", args.repeats])
            ms[v] = res["seconds"] * 1000 if res["ok"] else None
            print(f"  T={n} {v}: " + (f"{ms[v]:.0f} ms" if res["ok"] else res["error"]), file=sys.stderr, flush=True)
        rows.append([n] + [f"{ms[v]:.0f}" if ms[v] else "-" for v in variants]
                    + [f"{ms[v] / ms['sdpa']:.2f}" if ms[v] and ms["sdpa"] else "-" for v in variants[1:]])
    print(f"One attention layer, forward + backward, {HEADS}/{KV_HEADS} heads of {D_HEAD}, fp32, CPU, "
          f"{C.n_threads()} thread(s), best of {args.repeats}, one process per measurement")
    print(C.table(["T", "sdpa ms"] + [f"tiled {b} ms" for b in args.blocks]
                  + [f"tiled {b} / sdpa" for b in args.blocks], rows))


if __name__ == "__main__":
    main()
