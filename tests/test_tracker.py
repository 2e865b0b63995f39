"""Online tracking must reproduce the offline segmentation token for token."""

from __future__ import annotations

import json
import warnings

import pytest
from conftest import R1_TRACES as TRACES
from conftest import non_canonical_output

from stepflow_tl.errors import TraceError
from stepflow_tl.traces.formats import decode, render_prompt
from stepflow_tl.traces.trace import Trace, TraceWarning
from stepflow_tl.traces.tracker import StepEvent, StepTracker, prompt_positions

Q = "What is 2+2?"


def offline(tok, prompt, output, fmt="auto", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trace.from_text(tok, prompt, output, fmt, **kw)


def track(tok, trace, prompt, split="blank_lines", split_summary=False):
    """Feed the trace's generated ids one at a time; return (tracker, events)."""
    ids, qpos = prompt_positions(tok, prompt)
    n = len(ids)
    assert trace.token_ids[:n].tolist() == ids, "prompt tokenises differently alone"
    tracker = StepTracker(tok, format=trace.format, split=split, split_summary=split_summary,
                          prompt_ids=ids, question_positions=qpos)
    events = []
    for t in trace.token_ids[n:].tolist():
        events += tracker.push(t)
    return tracker, events


def assert_same(tok, prompt, output, fmt="auto", split="blank_lines", split_summary=False):
    trace = offline(tok, prompt, output, fmt, split=split, split_summary=split_summary)
    tracker, events = track(tok, trace, prompt, split, split_summary)
    assert tracker.token_steps == trace.token_steps.tolist()
    assert tracker.text == output
    assert tracker.step_kinds == trace.step_kinds
    for kind in ("question", "thinking", "summary"):
        assert tracker.positions(kind) == trace.positions(kind)
    for s in trace.steps:
        assert tracker.step_positions(s.index) == [
            p for p in range(s.token_span[0], s.token_span[1]) if tracker.token_steps[p] == s.index]
    firsts = {e.step: e.position for e in events if e.kind == "new_step"}
    assert firsts == {s.index: s.token_span[0] for s in trace.steps if s.kind != "question"}
    return trace, tracker, events


HAND = {
    "r1_prompt_think": ("<think>\n", "First, add.\n\nSo 2+2 = 4.\n\n -\n\nDone\n</think>\n\nThe answer is 4.<|im_end|>"),
    "r1_model_think": ("", "<think>\nFirst, add.\n\nSo 2+2 = 4.\n\nDone\n\n</think>\n\nThe answer is 4."),
    "r1_no_close": ("<think>\n", "Step one.\n\nStep two is"),
    "unicode": ("<think>\n", "First 😀 世界 ∑∫ x² ≤ π.\n\n世界\n\n😀😀\n\nend.  \n\n  Then\n\nx \n\n y</think>\n\nΣ 4 ∎"),
    "indented": ("<think>\n", "1. **Units:** The 4.\n\n   The first.\n\n 😀 x\n\n\t世界.\n</think>\n\n  **4**"),
    "harmony": ("", "<|channel|>analysis<|message|>First, add. Then check!\n\nSo 2+2 = 4.<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>The answer is 4.<|return|>"),
    "harmony_open": ("<|channel|>analysis<|message|>", "Add.\n\nMore.<|end|><|start|>assistant<|channel|>final"
                     "<|message|>4"),
    "plain_final": ("", "First, add. Then check!\n\nSo the final answer is 2+2 = 4.\n\nMore"),
    "plain_answer": ("", "First, add.\n\nSo 2+2 = 4.\n\nAnswer: 4"),
    "plain_boxed": ("", "First, add.\n\nSo 2+2 = 4 and \\boxed{4}"),
}


@pytest.mark.parametrize("tok_name", ["tokenizer", "qwen2_style_tokenizer"])
@pytest.mark.parametrize("split", ["blank_lines", "lines", "sentences"])
@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_traces_match_offline(request, tok_name, name, split):
    tok = request.getfixturevalue(tok_name)
    suffix, output = HAND[name]
    prompt = render_prompt(tok, Q) + suffix
    assert_same(tok, prompt, output, split=split)
    assert_same(tok, prompt, output, split=split, split_summary=True)


def test_events_r1(tokenizer):
    prompt = render_prompt(tokenizer, Q) + "<think>\n"
    trace, tracker, events = assert_same(tokenizer, prompt, "Add.\n\nIt is 4.\n</think>\n\nFour.")
    kinds = [(e.kind, e.step, e.segment) for e in events]
    assert kinds == [("new_step", 1, "thinking"), ("new_step", 2, "thinking"),
                     ("segment_change", 2, "summary"), ("new_step", 3, "summary")]
    change = events[2]
    assert change.previous_segment == "thinking"
    # the segment changes at the token that completes "</think>" (">"), which is markup
    assert tracker.token_steps[change.position] == -1
    assert tracker.current_segment == "summary" and tracker.current_step == 3
    assert tracker.n_tokens == trace.n_tokens


def test_multi_token_tag_is_relabelled(tokenizer):
    """With SmolLM2 "</think>" is three tokens: "<" first looks like a new step, then
    the completed tag turns it into markup."""
    prompt = render_prompt(tokenizer, Q) + "<think>\n"
    ids, qpos = prompt_positions(tokenizer, prompt)
    tracker = StepTracker(tokenizer, prompt_ids=ids, question_positions=qpos)
    out = tokenizer.encode("Add.\n\n</think>", add_special_tokens=False)
    assert tracker.extend(out[:-3])[0].kind == "new_step"
    ev = tracker.push(out[-3])  # "<" after a blank line: provisionally a new step
    assert [e.kind for e in ev] == ["new_step"] and tracker.token_steps[-1] == 2
    assert tracker.changed_from == tracker.n_tokens - 1
    tracker.push(out[-2])
    ev = tracker.push(out[-1])
    assert tracker.changed_from == tracker.n_tokens - 3
    assert [e.kind for e in ev] == ["segment_change"]
    assert tracker.token_steps[-3:] == [-1, -1, -1] and tracker.current_step == 1


def test_callable_split_matches_offline(tokenizer):
    def by_line(text):
        spans, pos = [], 0
        for line in text.split("\n"):
            spans.append((pos, pos + len(line)))
            pos += len(line) + 1
        return spans

    prompt = render_prompt(tokenizer, Q) + "<think>\n"
    assert_same(tokenizer, prompt, "one\ntwo 😀\n\nthree\n</think>\n\nA\nB", split=by_line)
    assert_same(tokenizer, prompt, "one\ntwo\n\nthree\n</think>\n\nA\nB", split=by_line, split_summary=True)


def test_prompt_positions(tokenizer):
    prompt = render_prompt(tokenizer, Q) + "<think>\n"
    ids, qpos = prompt_positions(tokenizer, prompt)
    trace = offline(tokenizer, prompt, "a\n</think>\n\nb")
    assert qpos == trace.positions("question") and ids == trace.token_ids[:len(ids)].tolist()
    assert qpos == prompt_positions(tokenizer, prompt, question=Q)[1]


def test_decode_window_stays_small(tokenizer):
    """Per push only a few ids are decoded, whatever the length so far (O(new text))."""

    class Counting:
        def __init__(self, tok):
            self.tok, self.longest = tok, 0

        def encode(self, *a, **k):
            return self.tok.encode(*a, **k)

        def decode(self, ids, **k):
            self.longest = max(self.longest, len(ids))
            return self.tok.decode(ids, **k)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    counting = Counting(tokenizer)
    prompt = render_prompt(tokenizer, Q) + "<think>\n"
    ids, qpos = prompt_positions(tokenizer, prompt)
    tracker = StepTracker(counting, prompt_ids=ids, question_positions=qpos, prompt_text=prompt)
    counting.longest = 0
    body = "".join(f"Step {i}: 😀 世界 ok.\n\n" for i in range(200))
    tracker.extend(tokenizer.encode(body, add_special_tokens=False))
    assert counting.longest <= 8
    assert tracker.text == body and tracker.current_step == 200


def test_errors(tokenizer):
    with pytest.raises(TraceError, match="format must be"):
        StepTracker(tokenizer, format="xml")
    with pytest.raises(TraceError, match="question_positions must lie"):
        StepTracker(tokenizer, prompt_ids=[1, 2], question_positions=[5])
    with pytest.raises(TraceError, match="start_segment"):
        StepTracker(tokenizer, start_segment="question")
    tracker = StepTracker(tokenizer, prompt_ids=[1, 2], question_positions=[1])
    with pytest.raises(TraceError, match="no step 3"):
        tracker.step_positions(3)
    with pytest.raises(TraceError, match="kind must be"):
        tracker.positions("answer")
    assert isinstance(tracker.push(tokenizer.encode("Hi", add_special_tokens=False)[0])[0], StepEvent)


@pytest.mark.parametrize("tok_name", ["tokenizer", "qwen2_style_tokenizer"])
def test_all_real_traces_match_offline(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    records = [json.loads(line) for line in TRACES.read_text().splitlines()]
    assert len(records) == 71
    for rec in records:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trace = Trace.from_record(tok, rec)
        prompt = trace.text[: len(trace.text) - len(rec["output"])]
        tracker, events = track(tok, trace, prompt)
        assert tracker.token_steps == trace.token_steps.tolist(), rec["source"]
        firsts = {e.step: e.position for e in events if e.kind == "new_step"}
        assert firsts == {s.index: s.token_span[0] for s in trace.steps if s.kind != "question"}


def test_non_canonical_ids_match_from_ids(tokenizer):
    """Ids a model may generate but the tokenizer never produces (byte pieces, a stray
    byte, a word spelt in letters): the tracker agrees with ``Trace.from_ids``."""
    prompt = render_prompt(tokenizer, Q) + "<think>\n"
    ids, qpos = prompt_positions(tokenizer, prompt)
    out = non_canonical_output(tokenizer)
    trace = Trace.from_ids(tokenizer, ids, out)
    tracker = StepTracker(tokenizer, prompt_ids=ids, question_positions=qpos)
    events = tracker.extend(out)
    assert tracker.token_steps == trace.token_steps.tolist()
    assert tracker.text == trace.text[len(prompt):]
    firsts = {e.step: e.position for e in events if e.kind == "new_step"}
    assert firsts == {s.index: s.token_span[0] for s in trace.steps if s.kind != "question"}


@pytest.fixture(scope="module")
def merging_tokenizer():
    """A byte-level BPE trained without pre-tokenisation, so its tokens run across
    blank lines and whole steps ("Add them.\\n\\nThen check.\\n\\nSo it is 4.\\n\\nThe en")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["Add them.\n\nThen check.\n\nSo it is 4.\n\nThe end.\n\n"] * 50 + [
        "Question:\nWhat is 2+2?\n\n<think>\n", "</think>\n\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def test_merged_tokenisation_fallback_offline_and_online(merging_tokenizer):
    tok = merging_tokenizer
    thinking = "Add them.\n\nThen check.\n\nSo it is 4.\n\nThe end."
    assert [tok.decode([i]) for i in tok.encode(thinking, add_special_tokens=False)] == [
        "Add them.\n\nThen check.\n\nSo it is 4.\n\nThe en", "d", "."]
    with pytest.warns(TraceWarning, match="merged into the preceding step") as caught:
        trace = Trace.from_parts(tok, question="Why 7?", thinking=thinking, summary="Done")
    assert sum("has no token of its own" in str(w.message) for w in caught) == 2
    # "Then check." and "So it is 4." lie inside the first token: merged into step 1
    assert [s.text for s in trace.steps] == [
        "Why 7?", "Add them.\n\nThen check.\n\nSo it is 4.", "The end.", "Done"]
    a, b = trace.steps[2].token_span
    assert decode(tok, trace.token_ids[a:b].tolist()) == "d.\n"  # "The end." from its 2nd token
    # tokens straddling a blank line: each goes where its first character is
    trace = Trace.from_parts(tok, question="Why 7?", thinking="Add them.\n\nThen check.\n\nSo it is 4.",
                             summary="Done")
    assert [s.text for s in trace.steps][1:4] == ["Add them.", "Then check.", "So it is 4."]
    texts = [decode(tok, trace.token_ids[s.token_span[0]:s.token_span[1]].tolist()) for s in trace.steps]
    assert texts[1:4] == ["Add them.\n\nThen ", "check.\n\nSo", " it is 4.\n"]
    prompt = trace.text[: trace.text.index("<think>")]
    assert_same(tok, prompt, trace.text[len(prompt):], fmt="r1")
