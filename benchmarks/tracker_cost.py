"""Online tracking and decoded-offset cost per token on the longest real trace.

Prints the StepTracker's time per pushed token and Trace.from_ids' time relative to
Trace.from_text (which tokenises with offsets in Rust) for the same ids, with the
embedded SmolLM2 tokenizer; min of --repeats runs each, interleaved.

    python benchmarks/tracker_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

from _common import set_threads, trace_records
from stepflow_tl.tl.models import load_embedded_tokenizer
from stepflow_tl.traces.trace import Trace
from stepflow_tl.traces.tracker import StepTracker, prompt_positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    set_threads()
    tok = load_embedded_tokenizer()
    records = trace_records()
    rec = max(records, key=lambda r: len(r["output"]))
    warnings.simplefilter("ignore")
    trace = Trace.from_record(tok, rec)
    prompt = trace.text[: len(trace.text) - len(rec["output"])]
    ids, qpos = prompt_positions(tok, prompt)
    out = trace.token_ids[len(ids):].tolist()
    times = {"tracker": [], "from_text": [], "from_ids": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tracker = StepTracker(tok, prompt_ids=ids, question_positions=qpos)
        tracker.extend(out)
        t1 = time.perf_counter()
        Trace.from_text(tok, prompt, rec["output"], "r1", question=rec["question"])
        t2 = time.perf_counter()
        Trace.from_ids(tok, ids, out, "r1", question=rec["question"])
        t3 = time.perf_counter()
        times["tracker"].append(t1 - t0)
        times["from_text"].append(t2 - t1)
        times["from_ids"].append(t3 - t2)
    best = {k: min(v) for k, v in times.items()}
    print(f"longest real trace: {len(out)} generated tokens ({rec['source'].split(':')[0]})")
    print("| measurement | min over runs | per token |")
    print("|---|---|---|")
    print(f"| StepTracker.push | {best['tracker']:.2f} s | {best['tracker'] / len(out) * 1e6:.0f} µs |")
    print(f"| Trace.from_text | {best['from_text']:.2f} s | {best['from_text'] / len(out) * 1e6:.0f} µs |")
    print(f"| Trace.from_ids | {best['from_ids']:.2f} s | {best['from_ids'] / len(out) * 1e6:.0f} µs |")
    print(f"from_ids / from_text: {best['from_ids'] / best['from_text']:.2f}x")


if __name__ == "__main__":
    main()
