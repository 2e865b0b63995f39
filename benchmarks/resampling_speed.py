"""Benchmark 8: resampling importance on a short real trace with the embedded SmolLM2,
this tree's code against another tree's (e.g. the commit before a change).

One record of ``r1_traces.jsonl`` (``--index``, default 63: 473 tokens, 5 thinking steps,
gold 9), ``--n-samples`` continuations of ``--max-new-tokens`` from each of its 6 prefixes,
`resampling_importance` as the library runs it. Each measurement is a fresh process that
imports ``stepflow_tl`` from one source tree (this one, and ``--before DIR`` if given: a
checkout of another commit, e.g. ``git worktree add /tmp/before <commit>``); trees are
interleaved, best of ``--repeats``. Printed per tree: wall time, `generate` calls, prefill
calls / rows / tokens run and their time, decoding steps / row-steps and their time, grading
time, and a digest of every rollout's output ids (equal digests: the same rollouts).

Run::

    .venv/bin/python benchmarks/resampling_speed.py --before /tmp/before
    .venv/bin/python benchmarks/resampling_speed.py --n-samples 4 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def worker(args) -> None:
    import tempfile
    import warnings

    warnings.simplefilter("ignore")
    import stepflow_tl
    import stepflow_tl.study.resampling as R
    from stepflow_tl import load_model
    from stepflow_tl.study.problems import Problem
    from stepflow_tl.tl.adapter import ModelAdapter
    from stepflow_tl.traces import load_traces

    C.set_threads()
    model = load_model()
    record = C.trace_records()[args.index]
    path = Path(tempfile.mkdtemp()) / "trace.jsonl"
    path.write_text(json.dumps(record) + "\n")
    trace = load_traces(str(path), model)[0]
    question = "\n\n".join(trace.steps[i].text for i in trace.question_steps)
    problem = Problem(id="p", question=question, answer=str(record["gold"]), kind="math")
    stats = {"generate_calls": 0, "prefill_calls": 0, "prefill_rows": 0, "prefill_tokens": 0, "prefill_s": 0.0,
             "decode_steps": 0, "decode_row_steps": 0, "decode_s": 0.0, "grade_s": 0.0}
    prefill, decode, generate, grade = ModelAdapter.prefill, ModelAdapter.decode, R.generate, R.grade

    def timed(fn, before, key):
        def wrapped(*a, **k):
            before(*a, **k)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            stats[key] += time.perf_counter() - t0
            return out
        return wrapped

    def count_prefill(self, tokens, mask):
        stats["prefill_calls"] += 1
        stats["prefill_rows"] += tokens.shape[0]
        stats["prefill_tokens"] += tokens.numel()

    def count_decode(self, state, nxt):
        stats["decode_steps"] += 1
        stats["decode_row_steps"] += nxt.shape[0]

    def count_generate(*a, **k):
        stats["generate_calls"] += 1

    ModelAdapter.prefill = timed(prefill, count_prefill, "prefill_s")
    ModelAdapter.decode = timed(decode, count_decode, "decode_s")
    R.generate = lambda *a, **k: (count_generate(), generate(*a, **k))[1]
    R.grade = timed(grade, lambda *a, **k: None, "grade_s")
    t0 = time.perf_counter()
    found = R.resampling_importance(model, trace, problem, n_samples=args.n_samples,
                                    max_new_tokens=args.max_new_tokens, seed=0)
    stats["total_s"] = time.perf_counter() - t0
    outputs = found.rollouts.sort_values(["prefix", "sample"])["output"].tolist()
    stats["digest"] = hashlib.sha256("\x00".join(outputs).encode()).hexdigest()[:12]
    stats["rollouts"] = len(outputs)
    stats["n_tokens"] = int(sum(len(x) for x in outputs))
    stats["tree"] = str(Path(stepflow_tl.__file__).resolve().parents[1])
    C.emit(stats)


def run_tree(tree: Path, argv: list) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True, env=env,
                          cwd=tree)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(C.RESULT_PREFIX):
            return json.loads(line[len(C.RESULT_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise RuntimeError(f"{tree}: exit code {proc.returncode}: {tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=int, default=63, help="record of r1_traces.jsonl (default 63: 5 thinking steps)")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--before", type=Path, default=None, help="another source tree to measure first")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    argv = ["--index", str(args.index), "--n-samples", str(args.n_samples), "--max-new-tokens", str(args.max_new_tokens)]
    trees = ([("before", args.before.resolve())] if args.before else []) + [("this tree", C.REPO)]
    best: dict = {}
    for _ in range(args.repeats):
        for name, tree in trees:
            result = run_tree(tree, argv)
            if name not in best or result["total_s"] < best[name]["total_s"]:
                best[name] = result
    base = best[trees[0][0]]["total_s"]
    rows = []
    for name, _ in trees:
        r = best[name]
        rows.append([name, f"{r['total_s']:.1f}", f"{base / r['total_s']:.2f}x", r["generate_calls"],
                     f"{r['prefill_calls']} / {r['prefill_rows']} / {r['prefill_tokens']}", f"{r['prefill_s']:.1f}",
                     f"{r['decode_steps']} / {r['decode_row_steps']}", f"{r['decode_s']:.1f}", f"{r['grade_s']:.2f}",
                     r["digest"]])
    print(f"record {args.index}, {args.n_samples} samples x {best[trees[0][0]]['rollouts'] // args.n_samples} "
          f"prefixes, max_new_tokens {args.max_new_tokens}, {C.n_threads()} thread(s), best of {args.repeats}")
    print(C.table(["tree", "wall s", "speed-up", "generate calls", "prefill calls / rows / tokens", "prefill s",
                   "decode steps / row-steps", "decode s", "grade s", "rollouts digest"], rows))


if __name__ == "__main__":
    main()
