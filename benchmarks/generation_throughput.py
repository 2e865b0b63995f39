"""Benchmark 3: generation tokens/s with StepFlow vs plain (SmolLM2-135M unless ``--model``).

``stepflow_tl.generate(model, prompts, max_new_tokens=256,
interventions=[StepFlow()])`` against ``interventions=()``, greedy, batch 1 and batch 4
(questions of ``r1_traces.jsonl``). Both variants run in the same process, interleaved
(plain, StepFlow, StepFlow, plain, ...), ``--repeats`` times each after one warm-up
pair; tokens/s is the generated tokens of the batch divided by the wall time of the
``generate`` call (prefill, decoding, tracking and the final ``Trace`` included), and
the best (max) of the repeats is kept, since noise on a shared machine only slows runs.

Run::

    .venv/bin/python benchmarks/generation_throughput.py
    .venv/bin/python benchmarks/generation_throughput.py --batch 1 --new-tokens 64 --repeats 1
    python benchmarks/generation_throughput.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \
        --device cuda --dtype bfloat16 --batch 1 16         # on a GPU, with your model
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
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="bridge", choices=["bridge", "hooked"])
    parser.add_argument("--model", default=None,
                        help="hub name or local directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    short_dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    args = parser.parse_args(argv)

    from stepflow_tl import DTYPES, StepFlow, generate, load_model

    C.set_threads()
    model = load_model(args.model, backend=args.backend, device=args.device, dtype=args.dtype)
    records = C.trace_records()
    questions = [r["question"] for r in records]

    def run(prompts, stepflow: bool):
        start = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=args.new_tokens,
                       interventions=[StepFlow()] if stepflow else ())
        seconds = time.perf_counter() - start
        n_tokens = sum(len(g.output_ids) for g in out)
        return n_tokens / seconds, n_tokens

    rows = []
    for batch in args.batch:
        prompts = questions[:batch]
        run(prompts, False), run(prompts, True)  # warm-up: first-call allocations and caches
        speed = {False: [], True: []}
        tokens = {False: 0, True: 0}
        for rep in range(args.repeats):
            for stepflow in (False, True) if rep % 2 == 0 else (True, False):
                tps, n = run(prompts, stepflow)
                speed[stepflow].append(tps)
                tokens[stepflow] = n
                print(f"  batch {batch} {'stepflow' if stepflow else 'plain':8s} run {rep + 1}: "
                      f"{tps:.1f} tok/s ({n} tokens)", file=sys.stderr, flush=True)
        plain, flow = max(speed[False]), max(speed[True])
        rows.append([batch, tokens[False], tokens[True], f"{plain:.1f}", f"{flow:.1f}", f"{flow / plain:.2f}"])
    name = args.model or "SmolLM2-135M"
    where = f"CPU, {C.n_threads()} threads" if args.device == "cpu" else args.device
    print(f"Generation, {name} ({args.backend}), {short_dtype[args.dtype]}, {where}, "
          f"greedy, max_new_tokens={args.new_tokens}, best of {args.repeats} interleaved runs")
    print(C.table(["batch", "tokens plain", "tokens StepFlow", "plain tok/s", "StepFlow tok/s",
                   "ratio StepFlow/plain"], rows))


if __name__ == "__main__":
    main()
