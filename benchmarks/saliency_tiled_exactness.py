"""Benchmark 5: tiled vs dense Step-Saliency maps on a real trace, for every built-in loss and pool.

The issue-16 target is fp32 tiled maps within 1e-5 relative of ``mode="dense"`` at
T <= 2048 on SmolLM2, for the sequence, summary and answer losses and both pools. The
trace is the longest record of ``r1_traces.jsonl`` whose whole trace fits
``--max-tokens`` and whose summary states an answer (so all three losses apply), read
as it is (not cut). For each loss and pool, dense and tiled run one after the other in
this process (exactness does not depend on the process; time is not measured here).
Printed per (loss, pool): max |tiled - dense|, that over max |dense| ("max rel diff",
the measure of the other saliency benchmarks), and the loss values of both modes.

Run::

    .venv/bin/python benchmarks/saliency_tiled_exactness.py                 # T <= 2048, all 6 pairs
    .venv/bin/python benchmarks/saliency_tiled_exactness.py --max-tokens 400 --losses sequence --pools mean
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def pick_trace(model, max_tokens: int):
    """``(record index, Trace)``: the longest whole trace within ``max_tokens`` with a stated answer."""
    from stepflow_tl import StepflowError, load_traces
    from stepflow_tl.saliency.losses import answer_token_positions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # real records: truncation and format warnings are not the point
        # every record is read whole, even those beyond the model's context: the length filter is ours
        traces = load_traces(C.TRACES, model, max_tokens=1 << 20)
    best = None
    for index, trace in enumerate(traces):
        n = trace.token_ids.shape[0]
        if n > max_tokens or (best is not None and n <= best[1].token_ids.shape[0]):
            continue
        try:
            answer_token_positions(trace)
        except StepflowError:
            continue
        best = (index, trace)
    if best is None:
        raise SystemExit(f"no record of {C.TRACES} fits {max_tokens} tokens with a stated answer")
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--losses", nargs="+", default=["sequence", "summary", "answer"])
    parser.add_argument("--pools", nargs="+", default=["mean", "causal_mean"])
    args = parser.parse_args(argv)

    from stepflow_tl import load_model, step_saliency

    C.set_threads()
    model = load_model(device="cpu")
    index, trace = pick_trace(model, args.max_tokens)
    rows = []
    for loss in args.losses:
        for pool in args.pools:
            dense = step_saliency(model, trace, loss=loss, pool=pool, mode="dense")
            tiled = step_saliency(model, trace, loss=loss, pool=pool, mode="tiled")
            diff = float((tiled.maps - dense.maps).abs().max())
            rows.append([loss, pool, f"{diff:.2e}", f"{diff / float(dense.maps.abs().max()):.2e}",
                         f"{dense.meta['loss_value']:.6f}", f"{tiled.meta['loss_value']:.6f}"])
            print(f"  {loss} / {pool}: max rel diff {rows[-1][3]}", file=sys.stderr, flush=True)
    print(f"Tiled vs dense Step-Saliency, SmolLM2-135M (bridge), fp32, CPU, record {index} of "
          f"{Path(C.TRACES).name}: T = {trace.token_ids.shape[0]}, {trace.n_steps} steps, all {len(dense.layers)} layers")
    print(C.table(["loss", "pool", "max abs diff", "max rel diff", "loss dense", "loss tiled"], rows))


if __name__ == "__main__":
    main()
