"""Shared helpers of the benchmarks: long real traces, peak-memory probes, subprocess workers.

Every memory number comes from the kernel's high-water mark of the resident set
(``VmHWM`` in ``/proc/self/status``), reset just before the measured call by writing
``5`` to ``/proc/self/clear_refs``, so the model load's own peak is not counted. torch
allocates outside Python's allocator, so ``tracemalloc`` would see almost nothing.
Each measurement runs in a fresh subprocess: allocator caches of one run cannot
lower or raise the next one's peak.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
TRACES = Path(os.environ.get(
    "STEPFLOW_TRACES", Path(__file__).resolve().parents[2] / "shared" / "data" / "r1_traces.jsonl"
))
GiB = 1 << 30
RESULT_PREFIX = "RESULT "


# ---------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE).group(1))


def reset_peak_rss() -> None:
    """Restart the peak-RSS counter at the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """Peak resident set size in bytes since the process start or the last `reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def rss() -> int:
    """Current resident set size in bytes."""
    return _status_kib("VmRSS") * 1024


def set_threads() -> None:
    """Use ``$STEPFLOW_BENCH_THREADS`` torch threads (default 1) in every run.

    One thread by default: on a shared machine (other processes using the cores),
    several OpenMP threads waiting on each other at every op make timings slow and
    erratic; with one thread both sides of a ratio are slowed alike.
    """
    import torch

    torch.set_num_threads(n_threads())


def n_threads() -> int:
    return int(os.environ.get("STEPFLOW_BENCH_THREADS", "1"))


# ---------------------------------------------------------------------- traces
def trace_records() -> list:
    """The records of ``r1_traces.jsonl`` (``$STEPFLOW_TRACES``), read by the library's reader."""
    from stepflow_tl.traces.records import read_json_records

    return read_json_records(TRACES)


def _thinking_and_summary(output: str):
    thinking, _, summary = output.partition("</think>")
    return thinking.replace("<think>", "").strip(), summary.strip()


def long_trace(model_or_tok, n_tokens: int):
    """A real-text trace of exactly ``n_tokens`` tokens.

    The question is that of the first record of ``r1_traces.jsonl``; the thinking is the
    thinking of records concatenated (blank line between them, so every paragraph stays
    a step) until the text is long enough, then cut to ``n_tokens`` by
    ``Trace.from_text(..., truncate=True)``. The summary is the last record's, and is
    usually cut off, which ``loss="sequence"`` does not need.
    """
    from stepflow_tl import Trace, render_prompt

    records = trace_records()
    prompt = render_prompt(model_or_tok, records[0]["question"]) + "<think>\n"
    parts, n_chars = [], 0
    for record in records * 8:  # ~3 chars per token; loop over the records if ever short
        thinking, summary = _thinking_and_summary(record["output"])
        parts.append(thinking)
        n_chars += len(thinking)
        if n_chars > 6 * n_tokens:
            break
    output = "\n\n".join(parts) + "\n</think>\n\n" + (summary or "Done.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning is the point here
        trace = Trace.from_text(
            model_or_tok, prompt, output, "r1", question=records[0]["question"],
            max_tokens=n_tokens, truncate=True,
        )
    if trace.token_ids.shape[0] != n_tokens:
        raise RuntimeError(f"built a trace of {trace.token_ids.shape[0]} tokens, wanted {n_tokens}")
    return trace


# ---------------------------------------------------------------------- workers
def emit(result: dict) -> None:
    """Worker side: print the result as the last line of stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _child_kib(pid: int, field: str) -> Optional[int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def run_worker(args: list, timeout: float = 3600, mem_cap: Optional[int] = None) -> dict:
    """Run ``python <args>`` in a fresh process and return what it `emit`-ted.

    With ``mem_cap`` (bytes), the child's resident set is polled every 50 ms and the
    child is killed when it exceeds the cap, so an over-long run fails cleanly instead
    of taking the machine down. (``RLIMIT_AS`` would cap virtual memory, which torch
    reserves far beyond what it touches.) Returns ``{"ok": False, "error": ...}`` on
    failure, with the largest resident set seen.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=REPO,
    )
    seen_kib, killed = 0, None
    out_chunks, err_chunks = [], []
    import threading

    readers = [
        threading.Thread(target=lambda s=stream, c=chunks: c.append(s.read()), daemon=True)
        for stream, chunks in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))
    ]
    for reader in readers:
        reader.start()
    while proc.poll() is None:
        hwm = _child_kib(proc.pid, "VmHWM")
        if hwm is not None:
            seen_kib = max(seen_kib, hwm)
        if mem_cap is not None and seen_kib * 1024 > mem_cap:
            killed = f"killed: peak RSS above the cap of {mem_cap / GiB:.1f} GiB"
        elif time.perf_counter() - start > timeout:
            killed = f"killed: timeout after {timeout:.0f} s"
        if killed:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.05)
    for reader in readers:
        reader.join()
    wall = time.perf_counter() - start
    stdout, stderr = "".join(out_chunks), "".join(err_chunks)
    if killed is None:
        for line in reversed(stdout.splitlines()):
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                result.setdefault("ok", True)
                result["wall_s"] = wall
                result["peak_rss_seen"] = seen_kib * 1024
                return result
    tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
    return {
        "ok": False,
        "error": killed or f"exit code {proc.returncode}: {tail[:300]}",
        "peak_rss_seen": seen_kib * 1024,
        "wall_s": wall,
    }


def interleaved_best(variants, repeats: int, worker_args: Callable[[str], list],
                     describe: Callable[[dict], str]) -> Tuple[dict, dict]:
    """Run every variant ``repeats`` times, one fresh process each (`run_worker` of
    ``worker_args(variant)``), in alternating order so load drifts hit them alike, and
    print each run (``describe(result)``) to stderr. Returns the fastest run of each
    variant by ``tok_s`` and, per variant, every run's ``outputs``."""
    best, outputs = {}, {}
    for rep in range(repeats):
        for variant in variants if rep % 2 == 0 else variants[::-1]:
            res = run_worker(worker_args(variant))
            if not res["ok"]:
                print(f"  {variant}: {res['error']}", file=sys.stderr, flush=True)
                continue
            print(f"  {variant:9s} run {rep + 1}: {describe(res)}", file=sys.stderr, flush=True)
            if res["tok_s"] > best.get(variant, {}).get("tok_s", 0):
                best[variant] = res
            outputs.setdefault(variant, []).append(res["outputs"])
    return best, outputs


def gib(n_bytes) -> str:
    return "-" if n_bytes is None else f"{n_bytes / GiB:.2f}"


def table(header: list, rows: list) -> str:
    """A GitHub-flavoured Markdown table (printed, and pasted into docs/performance.md)."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
