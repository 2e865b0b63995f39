"""The rule engine (`traces.formats.StepParser`): the 71 real traces segment exactly as
before it, the one default format, and the authors' short-sentence option."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import segmentation_golden as golden
from conftest import R1_TRACES as TRACES
from test_tracker import HAND, Q, assert_same

from stepflow_tl.cli.main import build_parser
from stepflow_tl.traces.formats import SHORT_SENTENCE_CHARS, render_prompt, step_starts
from stepflow_tl.traces.trace import Trace, load_traces
from stepflow_tl.traces.tracker import StepTracker, prompt_positions

RECORDS = [json.loads(line) for line in TRACES.read_text().splitlines()]


@pytest.mark.parametrize("combo", golden.COMBOS, ids=["/".join(map(str, c)) for c in golden.COMBOS])
def test_real_traces_segment_as_before_the_rule_engine(tokenizer, combo):
    """Token steps, steps, kinds, spans, warnings and events of every trace, offline and
    online, against the digests recorded from the two segmenters the engine replaced."""
    fmt, split, summary = combo
    key = f"{fmt}/{split}/{'split_summary' if summary else 'whole_summary'}"
    expected = json.loads(golden.GOLDEN.read_text())
    got = golden.segmentation(tokenizer, RECORDS, [combo])
    for mode in ("offline", "online"):
        moved = [rec["source"] for rec, a, b in zip(RECORDS, got[f"{key}/{mode}"], expected[f"{key}/{mode}"])
                 if a != b]
        assert not moved, f"{key} {mode}: the segmentation changed for {moved}"


def test_one_default_format_everywhere():
    for fn in (Trace.from_text, Trace.from_ids, Trace.from_parts, Trace.from_record, load_traces,
               StepTracker.__init__):
        assert inspect.signature(fn).parameters["format"].default == "auto", fn.__qualname__


def test_auto_format_reads_what_each_constructor_has(tokenizer):
    # from_parts writes the parts: r1 tags for a template without a format of its own
    tr = Trace.from_parts(tokenizer, question=Q, thinking="Add.", summary="4")
    assert tr.format == "r1" and tr.text.endswith("<think>\nAdd.\n</think>\n\n4")
    # a tracker reads the prompt (and template) it generates from, as `generate` does
    for suffix, fmt in (("<think>\n", "r1"), ("", "plain"), ("<|channel|>analysis<|message|>", "harmony")):
        ids, qpos = prompt_positions(tokenizer, render_prompt(tokenizer, Q) + suffix)
        assert StepTracker(tokenizer, prompt_ids=ids, question_positions=qpos).format == fmt
    # the 71 real traces read as r1 by default, as when r1 was the default of load_traces
    assert {Trace.from_record(tokenizer, RECORDS[0]).format} == {"r1"}


def test_short_sentences_join_the_next_one():
    text = "Okay. So we need to add two numbers. Yes. Then more here.\n\nHm.\n\nA long last paragraph."
    assert step_starts(text, "sentences") == [0, 6, 37, 42, 59, 64]
    # "Okay." (5 chars) joins "So ..."; "Yes." joins "Then ..."; "Hm." joins the paragraph after it
    assert step_starts(text, "sentences_min15") == [0, 37, 59]
    assert step_starts("Short. End.", "sentences_min15") == [0]


def test_short_sentence_split_in_traces_and_online(tokenizer):
    thinking = "Okay. So we need to add two and two. Yes. It is four, clearly.\n\nDone."
    tr = Trace.from_parts(tokenizer, question=Q, thinking=thinking, summary="4", split="sentences_min15")
    # a segment's last sentence has nothing after it to join: it may stay short
    assert [tr.steps[i].text for i in tr.thinking_steps] == [
        "Okay. So we need to add two and two.", "Yes. It is four, clearly.", "Done."]
    prompt = render_prompt(tokenizer, Q) + "<think>\n"
    for suffix, output in HAND.values():
        assert_same(tokenizer, render_prompt(tokenizer, Q) + suffix, output, split="sentences_min15")
    assert_same(tokenizer, prompt, thinking + "\n</think>\n\nAnswer. It is 4. Sure.", split="sentences_min15",
                split_summary=True)


def test_short_sentence_split_on_real_traces(tokenizer):
    """Every step of a real trace but a segment's last has at least 15 characters, and the
    steps are unions of the plain sentence split's steps; the tracker agrees."""
    for rec in RECORDS[:12]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = Trace.from_record(tokenizer, rec, split="sentences")
            merged = Trace.from_record(tokenizer, rec, split="sentences_min15")
        thinking = [merged.steps[i] for i in merged.thinking_steps]
        assert all(len(s.text) >= SHORT_SENTENCE_CHARS for s in thinking[:-1]), rec["source"]
        assert {s.char_span[0] for s in thinking} <= {plain.steps[i].char_span[0] for i in plain.thinking_steps}
        assert len(thinking) < len(plain.thinking_steps)
        prompt = merged.text[: len(merged.text) - len(rec["output"])]
        ids, qpos = prompt_positions(tokenizer, prompt, rec["question"])
        tracker = StepTracker(tokenizer, prompt_ids=ids, question_positions=qpos, split="sentences_min15")
        tracker.extend(merged.token_ids[len(ids):].tolist())
        assert tracker.token_steps == merged.token_steps.tolist(), rec["source"]


def test_the_cli_offers_the_short_sentence_split():
    parser = build_parser()
    for argv in (["generate", "--model", "m", "--split", "sentences_min15", "q"],
                 ["eval", "p.jsonl", "--model", "m", "--out", "o", "--split", "sentences_min15"]):
        assert parser.parse_args(argv).split == "sentences_min15"
