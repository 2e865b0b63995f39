"""Benchmark 1: Step-Saliency, dense vs bounded vs tiled mode, on SmolLM2-135M.

For each trace length, each mode runs in its own fresh process (``--repeats`` times,
modes interleaved), and we print one row per length and mode:

- the peak resident set of the ``step_saliency`` call (counter reset after loading the
  model and building the trace), total and above the resident set at the start of the
  call, and its ratio to the ``--baseline`` mode (default bounded);
- the time of the call (min over repeats) and its ratio to the baseline;
- the max absolute and max relative difference of the mode's maps from the first mode's.

Run::

    .venv/bin/python benchmarks/saliency_memory.py                    # T = 512, 1024, 2048
    .venv/bin/python benchmarks/saliency_memory.py --tokens 4096 --modes bounded tiled
    .venv/bin/python benchmarks/saliency_memory.py --tokens 512 --repeats 1 --backend hooked
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def worker(args) -> None:
    import torch

    from stepflow_tl import load_model, step_saliency

    C.set_threads()
    model = load_model(backend=args.backend, device="cpu")
    trace = C.long_trace(model, args.tokens[0])
    with torch.no_grad():  # page in the weights and warm the allocator before measuring
        model(trace.token_ids[None, :64], **({"use_cache": False} if args.backend == "bridge" else {}))
    base = C.rss()
    C.reset_peak_rss()
    start = time.perf_counter()
    result = step_saliency(model, trace, mode=args.mode)
    seconds = time.perf_counter() - start
    peak = C.peak_rss()
    torch.save(result.maps, args.maps_out)
    C.emit({"seconds": seconds, "peak_rss": peak, "base_rss": base, "n_steps": trace.n_steps,
            "process_peak": C._status_kib("VmHWM") * 1024})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode and length (min time is kept)")
    parser.add_argument("--backend", default="bridge", choices=["bridge", "hooked"])
    parser.add_argument("--modes", nargs="+", default=["dense", "bounded", "tiled"],
                        choices=["dense", "bounded", "tiled"])
    parser.add_argument("--baseline", default="bounded", help="the mode the ratios divide by")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--maps-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch

    modes = tuple(args.modes)
    baseline = args.baseline if args.baseline in modes else modes[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_tokens in args.tokens:
            runs = {m: [] for m in modes}
            for rep in range(args.repeats):
                for mode in modes if rep % 2 == 0 else modes[::-1]:
                    out = Path(tmp) / f"{mode}-{n_tokens}.pt"
                    result = C.run_worker([
                        __file__, "--worker", "--mode", mode, "--tokens", n_tokens,
                        "--backend", args.backend, "--maps-out", out,
                    ])
                    if not result["ok"]:
                        raise SystemExit(f"{mode} at T={n_tokens} failed: {result['error']}")
                    runs[mode].append(result)
                    print(f"  T={n_tokens} {mode:7s} run {rep + 1}: {result['seconds']:.1f} s, "
                          f"peak {C.gib(result['peak_rss'])} GiB", file=sys.stderr, flush=True)
            first = torch.load(Path(tmp) / f"{modes[0]}-{n_tokens}.pt")
            peak = {m: max(r["peak_rss"] for r in runs[m]) for m in modes}
            above = {m: max(r["peak_rss"] - r["base_rss"] for r in runs[m]) for m in modes}
            secs = {m: min(r["seconds"] for r in runs[m]) for m in modes}
            for mode in modes:
                maps = torch.load(Path(tmp) / f"{mode}-{n_tokens}.pt")
                abs_diff = float((maps - first).abs().max())
                rows.append([
                    n_tokens, runs[mode][0]["n_steps"], mode,
                    C.gib(peak[mode]), f"{peak[mode] / peak[baseline]:.3f}",
                    C.gib(above[mode]), f"{above[mode] / above[baseline]:.3f}",
                    f"{secs[mode]:.1f}", f"{secs[mode] / secs[baseline]:.2f}",
                    f"{abs_diff:.2e}", f"{abs_diff / float(first.abs().max()):.2e}",
                ])
    print(f"Step-Saliency {' vs '.join(modes)}, SmolLM2-135M ({args.backend}), fp32, CPU, "
          f"{C.n_threads()} threads, min time of {args.repeats} runs per mode; ratios to {baseline}; "
          f"differences from {modes[0]}")
    print(C.table(
        ["T", "steps", "mode", "peak GiB", "ratio", "above start GiB", "ratio",
         "time s", "ratio", "max abs diff", "max rel diff"],
        rows,
    ))


if __name__ == "__main__":
    main()
