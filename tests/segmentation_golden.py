"""The segmentation of the 71 real traces, every format x split, offline and online, as digests.

``tests/data/segmentation_golden.json`` holds what this gave before the rule engine
(`stepflow_tl.traces.formats`) replaced the two segmenters; `tests/test_rules.py`
recomputes it and compares, so a rule change that moves one token of one trace shows
up as the (trace, format, split) it moved. Regenerate only for an intended rule change:

    python tests/segmentation_golden.py > tests/data/segmentation_golden.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "r1_traces.jsonl"
GOLDEN = Path(__file__).resolve().parent / "data" / "segmentation_golden.json"
# (format, split, split_summary): the default call (``"auto"`` for both), then every
# format x built-in split, and r1 with the summary split too.
COMBOS: List[Tuple[str, str, bool]] = [("default", "default", False)] + [
    (fmt, split, summary)
    for fmt in ("r1", "plain", "harmony")
    for split in ("blank_lines", "lines", "sentences")
    for summary in ((False, True) if fmt == "r1" else (False,))
]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def offline(tok, rec, fmt, split, split_summary):
    """``(digest, trace or None)`` of `Trace.from_record`: its token steps, steps, format,
    completeness and warnings, or its error."""
    from stepflow_tl.errors import StepflowError
    from stepflow_tl.traces.trace import Trace

    kw = {} if fmt == "default" else {"format": fmt}
    if split != "default":
        kw.update(split=split, split_summary=split_summary)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trace = Trace.from_record(tok, rec, **kw)
        except StepflowError as e:
            return _digest({"error": str(e)}), None
    value = {
        "token_steps": trace.token_steps.tolist(),
        "steps": [[s.kind, list(s.char_span), list(s.token_span)] for s in trace.steps],
        "format": trace.format, "complete": trace.complete,
        "warnings": [str(w.message) for w in caught],
    }
    return _digest(value), trace


def online(tok, rec, trace, fmt, split, split_summary):
    """Digest of a `StepTracker` fed the offline trace's generated ids one at a time."""
    from stepflow_tl.traces.tracker import StepTracker, prompt_positions

    prompt = trace.text[: len(trace.text) - len(rec["output"])]
    ids, qpos = prompt_positions(tok, prompt, rec["question"])
    kw = {"format": trace.format if fmt == "default" else fmt}
    if split != "default":
        kw.update(split=split, split_summary=split_summary)
    tracker = StepTracker(tok, prompt_ids=ids, question_positions=qpos, prompt_text=prompt, **kw)
    events = [[e.kind, e.position, e.step, e.segment] for t in trace.token_ids[len(ids):].tolist()
              for e in tracker.push(t)]
    return _digest({"token_steps": tracker.token_steps, "kinds": tracker.step_kinds, "events": events,
                    "text": tracker.text})


def segmentation(tok, records, combos=COMBOS) -> Dict[str, List[str]]:
    """``{"format/split/summary/offline|online": [digest per trace]}``. Online runs on the
    ids of the r1 trace (the format under test applied to them) when the format under
    test fails offline (harmony on R1 text has no thinking)."""
    out: Dict[str, List[str]] = {}
    for fmt, split, summary in combos:
        key = f"{fmt}/{split}/{'split_summary' if summary else 'whole_summary'}"
        offs, ons = [], []
        for rec in records:
            digest, trace = offline(tok, rec, fmt, split, summary)
            offs.append(digest)
            if trace is None:
                trace = offline(tok, rec, "r1", "blank_lines", False)[1]
            ons.append(online(tok, rec, trace, fmt, split, summary))
        out[key + "/offline"] = offs
        out[key + "/online"] = ons
    return out


def main() -> None:
    from stepflow_tl.tl.models import load_embedded_tokenizer

    records = [json.loads(line) for line in TRACES.read_text().splitlines()]
    json.dump(segmentation(load_embedded_tokenizer(), records), sys.stdout, indent=0)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
