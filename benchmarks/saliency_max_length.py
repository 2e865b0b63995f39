"""Benchmark 2: the longest trace each Step-Saliency mode completes under a memory cap.

Each (mode, length) runs ``benchmarks/saliency_memory.py``'s worker in a fresh process
whose resident set is polled every 50 ms; a run whose peak RSS passes ``--cap-gib`` is
killed and counts as a failure, and a mode stops at its first failure (longer traces
only need more). Traces are real thinking text from ``r1_traces.jsonl``, concatenated
and cut to the length (SmolLM2's context is 8192 tokens).

Run::

    .venv/bin/python benchmarks/saliency_max_length.py                 # cap 16 GiB
    .venv/bin/python benchmarks/saliency_max_length.py --cap-gib 8 --tokens 1024 2048
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

WORKER = Path(__file__).resolve().parent / "saliency_memory.py"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-gib", type=float, default=16.0, help="peak RSS cap per run (GiB)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--modes", nargs="+", default=["dense", "bounded", "tiled"],
                        choices=["dense", "bounded", "tiled"])
    parser.add_argument("--backend", default="bridge", choices=["bridge", "hooked"])
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run")
    args = parser.parse_args(argv)
    cap = int(args.cap_gib * C.GiB)

    rows, longest = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for n_tokens in sorted(args.tokens):
                result = C.run_worker(
                    [WORKER, "--worker", "--mode", mode, "--tokens", n_tokens, "--backend", args.backend,
                     "--maps-out", Path(tmp) / "maps.pt"],
                    timeout=args.timeout, mem_cap=cap,
                )
                # the call's own peak (counter reset after loading) or, for a killed run,
                # the largest resident set the parent saw, model load included
                peak = max(result.get("peak_rss") or 0, result.get("peak_rss_seen") or 0)
                status = "ok" if result["ok"] else result["error"]
                rows.append([mode, n_tokens, C.gib(peak),
                             f"{result['seconds']:.0f}" if result["ok"] else "-", status])
                print(f"  {mode} T={n_tokens}: {status}, peak {C.gib(peak)} GiB", file=sys.stderr, flush=True)
                if not result["ok"]:
                    break
                longest[mode] = n_tokens
    print(f"Longest trace under a {args.cap_gib:g} GiB peak-RSS cap, SmolLM2-135M ({args.backend}), fp32, CPU")
    print(C.table(["mode", "T", "peak RSS GiB", "time s", "status"], rows))
    for mode in args.modes:
        print(f"{mode}: longest completed T = {longest.get(mode, 'none')}")


if __name__ == "__main__":
    main()
