"""Benchmark: StepFlow on the vLLM engine against plain vLLM and against the TL engine.

Greedy decoding of the built-in suite's questions (chat template) on the embedded
SmolLM2-135M-Instruct, fp32, CPU, one thread, in the vLLM lane (``.venv-vllm``, where
both engines run):

- ``vllm_plain``: ``VLLMEngine.generate(prompts)`` (no hooks installed: vLLM as it is,
  eager mode, continuous batching over ``--max-num-seqs`` rows);
- ``vllm_stepflow``: the same with ``interventions=[StepFlow()]`` (what our hooks,
  store and tracker cost inside the engine);
- ``tl_stepflow_bN``: ``stepflow_tl.generate(model, prompts, interventions=[StepFlow()],
  batch_size=N)`` for each ``--tl-batches`` N (the best is the TL engine's number);
- the long-tailed batch (``--long-tail``): each prompt gets its own budget between 16
  and 256 tokens (seeded), ``vllm_stepflow_tail`` against ``tl_stepflow_tail`` (the TL
  engine with its shrinking batch at the best N) and ``tl_stepflow_tail_static``
  (``static_batch=True``); the fraction of row-steps a static batch wastes is computed
  from the static run's own output lengths.

One fresh process per measurement (engine or model load excluded, one warm-up call on
two prompts, then the timed call); tokens/s is generated tokens / wall time of the call.

Run (under the suite lock on a shared machine)::

    VLLM_CPU_OMP_THREADS_BIND=nobind flock /work/wt/suite.lock .venv-vllm/bin/python benchmarks/vllm_throughput.py
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --prompts 8 --new-tokens 32 --tl-batches 8 --no-long-tail
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def _prompts(n: int) -> list:
    from stepflow_tl.study import builtin_suite
    from stepflow_tl.study.problems import prompt_for

    problems = builtin_suite(n_per_level=(n + 3) // 4, levels=(1, 2, 3, 4))[:n]
    return [prompt_for(p, style="chat") for p in problems]


def _budgets(n: int, new_tokens: int, tail: bool) -> list:
    if not tail:
        return [new_tokens] * n
    rng = random.Random(0)
    return [rng.randint(16, 256) for _ in range(n)]


def worker(args) -> None:
    C.set_threads()
    prompts = _prompts(args.prompts)
    budgets = _budgets(args.prompts, args.new_tokens, args.tail)
    stepflow = "stepflow" in args.variant
    if args.variant.startswith("vllm"):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from stepflow_tl import StepFlow
        from stepflow_tl.engines.vllm import VLLMEngine

        engine = VLLMEngine("smollm2", dtype="float32", max_num_seqs=args.max_num_seqs, max_model_len=1024)

        def run(ps, bs):
            return engine.generate(ps, max_new_tokens=bs, interventions=[StepFlow()] if stepflow else ())
    else:
        from stepflow_tl import StepFlow, generate, load_model

        model = load_model(device="cpu")

        def run(ps, bs):
            return generate(model, ps, max_new_tokens=bs, interventions=[StepFlow()] if stepflow else (),
                            batch_size=args.batch, static_batch=args.static)

    run(prompts[:2], [8, 8])  # warm-up: first-call allocations and caches
    start = time.perf_counter()
    gens = run(prompts, budgets)
    seconds = time.perf_counter() - start
    lengths = [len(g.output_ids) for g in gens]
    C.emit({"tokens": sum(lengths), "seconds": seconds, "tok_s": sum(lengths) / seconds, "lengths": lengths,
            "outputs": [g.output_ids for g in gens]})


def static_waste(lengths: list, batch: int) -> float:
    """Share of the row-steps of a static batch (rows of ``batch`` run until the longest
    ends) that compute tokens nobody keeps."""
    run = kept = 0
    for i in range(0, len(lengths), batch):
        part = lengths[i:i + batch]
        run += len(part) * max(part)
        kept += sum(part)
    return 1 - kept / run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--tl-batches", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--no-long-tail", dest="long_tail", action="store_false")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--static", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tail", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    common = ["--prompts", args.prompts, "--new-tokens", args.new_tokens, "--max-num-seqs", args.max_num_seqs]
    results = {}

    def measure(name, *extra):
        res = C.run_worker([__file__, "--worker", *common, *extra])
        if not res["ok"]:
            print(f"  {name}: {res['error']}", file=sys.stderr, flush=True)
            return None
        print(f"  {name:26s} {res['tok_s']:.2f} tok/s ({res['tokens']} tokens, {res['seconds']:.1f} s)",
              file=sys.stderr, flush=True)
        results[name] = res
        return res

    measure("vllm_plain", "--variant", "vllm_plain")
    measure("vllm_stepflow", "--variant", "vllm_stepflow")
    for b in args.tl_batches:
        measure(f"tl_stepflow_b{b}", "--variant", "tl_stepflow", "--batch", b)
    tl = {k: v for k, v in results.items() if k.startswith("tl_stepflow_b")}
    best_tl = max(tl, key=lambda k: tl[k]["tok_s"]) if tl else None
    rows = []
    vp, vs = results.get("vllm_plain"), results.get("vllm_stepflow")
    for name, res in results.items():
        rows.append([name, res["tokens"], f"{res['tok_s']:.2f}"])
    print(f"vLLM engine vs plain vLLM vs TL generate, SmolLM2-135M fp32, CPU, {C.n_threads()} thread(s), greedy, "
          f"{args.prompts} built-in prompts x {args.new_tokens} new tokens, vLLM max_num_seqs={args.max_num_seqs}, "
          "one process each")
    print(C.table(["variant", "tokens", "tok/s"], rows))
    if vp and vs:
        print(f"vllm_stepflow / vllm_plain: {vs['tok_s'] / vp['tok_s']:.2f}x (target >= 0.8)")
    if vs and best_tl:
        print(f"vllm_stepflow / {best_tl} (the TL engine's best batch): {vs['tok_s'] / tl[best_tl]['tok_s']:.2f}x "
              "(target >= 1.5)")
    if vs and best_tl:
        same = sum(a == b for a, b in zip(vs["outputs"], tl[best_tl]["outputs"]))
        print(f"identical outputs vllm_stepflow vs {best_tl}: {same}/{args.prompts}")
    if args.long_tail and best_tl:
        b = int(best_tl.removeprefix("tl_stepflow_b"))
        tail = [measure("vllm_stepflow_tail", "--variant", "vllm_stepflow", "--tail"),
                measure(f"tl_stepflow_tail_b{b}", "--variant", "tl_stepflow", "--batch", b, "--tail"),
                measure(f"tl_stepflow_tail_static_b{b}", "--variant", "tl_stepflow", "--batch", b, "--tail",
                        "--static")]
        rows = [[n, r["tokens"], f"{r['tok_s']:.2f}"] for n, r in zip(
            ["vllm_stepflow_tail", f"tl_stepflow_tail_b{b}", f"tl_stepflow_tail_static_b{b}"], tail) if r]
        print(f"\nLong-tailed batch: budgets 16-256 tokens per prompt (seeded), {args.prompts} prompts")
        print(C.table(["variant", "tokens", "tok/s"], rows))
        if tail[2]:
            print(f"row-steps a static batch of {b} wastes: {static_waste(tail[2]['lengths'], b):.1%}")
        if tail[0] and tail[1]:
            print(f"vllm_stepflow_tail / tl_stepflow_tail_b{b}: {tail[0]['tok_s'] / tail[1]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
