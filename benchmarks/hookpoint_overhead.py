"""Benchmark 4: cost of attached but unused step hook points on a forward pass.

A forward pass of SmolLM2-135M on a real trace, with ``attach_trace(model, trace)``
active and nothing hooked on ``hook_step_pattern``/``hook_step_resid``, against the
same forward with no trace attached. The two are interleaved ``--repeats`` times under
``torch.no_grad()`` and the min time of each is kept.

Run::

    .venv/bin/python benchmarks/hookpoint_overhead.py
    .venv/bin/python benchmarks/hookpoint_overhead.py --tokens 256 --repeats 5 --backend hooked
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", default="bridge", choices=["bridge", "hooked"])
    args = parser.parse_args(argv)

    import torch

    from stepflow_tl import attach_trace, load_model
    from stepflow_tl.tl import adapter

    C.set_threads()
    model = load_model(backend=args.backend, device="cpu")
    extra = {"use_cache": False} if adapter(model).kind == "bridge" else {}

    rows = []
    for n_tokens in args.tokens:
        trace = C.long_trace(model, n_tokens)
        tokens = trace.token_ids[None]

        def forward(attached: bool) -> float:
            with torch.no_grad():
                if attached:
                    with attach_trace(model, trace):
                        start = time.perf_counter()
                        model(tokens, **extra)
                        return time.perf_counter() - start
                start = time.perf_counter()
                model(tokens, **extra)
                return time.perf_counter() - start

        forward(False), forward(True)  # warm-up
        times = {False: [], True: []}
        for rep in range(args.repeats):
            for attached in (False, True) if rep % 2 == 0 else (True, False):
                times[attached].append(forward(attached))
        plain, attached = min(times[False]), min(times[True])
        rows.append([n_tokens, f"{plain * 1000:.0f}", f"{attached * 1000:.0f}", f"{attached / plain:.3f}",
                     f"{100 * (attached / plain - 1):+.1f}%"])
        print(f"  T={n_tokens}: none {plain:.3f} s, attached {attached:.3f} s", file=sys.stderr, flush=True)
    print(f"Forward pass with step hook points attached but unused, SmolLM2-135M ({args.backend}), fp32, "
          f"CPU, {C.n_threads()} threads, no_grad, min of {args.repeats} interleaved runs")
    print(C.table(["T", "no trace ms", "attached ms", "ratio", "overhead"], rows))


if __name__ == "__main__":
    main()
