"""Offline segmentation: formats, the token -> step rule, fallbacks, real traces."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import R1_TRACES as TRACES
from conftest import non_canonical_output

from stepflow_tl.errors import TraceError
from stepflow_tl.tl.models import load_embedded_tokenizer
from stepflow_tl.traces.formats import decode, decode_with_offsets, detect_format, find_question, render_prompt, step_starts
from stepflow_tl.traces.trace import Trace, TraceWarning, load_traces

Q = "What is 2+2?"


def step_token_texts(tok, trace):
    """Decoded text of each step's tokens, one string per step."""
    out = []
    for s in trace.steps:
        ids = [int(i) for i, st in zip(trace.token_ids, trace.token_steps) if int(st) == s.index]
        out.append(decode(tok, ids))
    return out


def assert_consistent(trace):
    """Invariants every trace must satisfy."""
    steps = trace.token_steps.tolist()
    assert len(steps) == trace.n_tokens
    assert [s.index for s in trace.steps] == list(range(trace.n_steps))
    for s in trace.steps:
        assert trace.text[s.char_span[0]:s.char_span[1]] == s.text
        assert s.text == s.text.strip() and s.text
        a, b = s.token_span
        assert steps[a] == s.index and steps[b - 1] == s.index
        assert all(x in (s.index, -1) for x in steps[a:b])
    # steps appear in text order and kinds in segment order
    order = {"question": 0, "thinking": 1, "summary": 2}
    kinds = [order[k] for k in trace.step_kinds]
    assert kinds == sorted(kinds)
    assert set(steps) <= set(range(-1, trace.n_steps))


def test_r1_from_parts_exact_steps(tokenizer):
    tr = Trace.from_parts(tokenizer, question=Q, thinking="First, add.\n\nSo 2+2 = 4.\n\nDone",
                          summary="The answer is 4.")
    assert tr.format == "r1" and tr.complete
    assert tr.step_kinds == ["question", "thinking", "thinking", "thinking", "summary"]
    assert [s.text for s in tr.steps] == [Q, "First, add.", "So 2+2 = 4.", "Done", "The answer is 4."]
    # trailing separators belong to the preceding step; tags and template belong to none
    assert step_token_texts(tokenizer, tr) == [
        Q, "First, add.\n\n", "So 2+2 = 4.\n\n", "Done\n", "The answer is 4."]
    t1 = tr.steps[1].token_span[0]
    assert decode(tokenizer, tr.token_ids[t1 - 4:t1].tolist()) == "<think>\n"
    assert tr.token_steps[t1 - 4:t1].tolist() == [-1, -1, -1, -1]
    assert [s.token_span[1] - s.token_span[0] for s in tr.steps] == [7, 6, 11, 2, 6]
    assert tr.steps[2].token_span == (tr.steps[1].token_span[1], tr.steps[1].token_span[1] + 11)
    assert tr.thinking_steps == [1, 2, 3] and tr.question_steps == [0] and tr.summary_steps == [4]
    assert tr.step_labels[1] == "T1: First, add."
    assert tr.token_steps.dtype == torch.long and tr.token_ids.dtype == torch.long
    assert_consistent(tr)


def test_r1_without_opening_think_and_question_lookup(tokenizer):
    prompt = render_prompt(tokenizer, Q) + "<think>\n"
    out = "Okay, 2+2.\n\nIt is 4.\n</think>\n\n**4**"
    tr = Trace.from_text(tokenizer, prompt, out)  # question found through the chat template
    assert tr.format == "r1"
    assert [s.text for s in tr.steps] == [Q, "Okay, 2+2.", "It is 4.", "**4**"]
    assert step_token_texts(tokenizer, tr)[1:] == ["Okay, 2+2.\n\n", "It is 4.\n", "**4**"]
    assert find_question(tokenizer, prompt) == find_question(tokenizer, prompt, Q)


def test_model_written_think_tag_is_markup(tokenizer):
    prompt = render_prompt(tokenizer, Q)
    a = Trace.from_text(tokenizer, prompt, "<think>\nOkay.\n</think>\n\n4")
    b = Trace.from_text(tokenizer, prompt + "<think>\n", "Okay.\n</think>\n\n4")
    assert [s.text for s in a.steps] == [s.text for s in b.steps] == [Q, "Okay.", "4"]
    assert a.token_steps.tolist() == b.token_steps.tolist()


def test_cut_off_thinking_warns(tokenizer):
    prompt = render_prompt(tokenizer, Q) + "<think>\n"
    with pytest.warns(TraceWarning, match="cut off"):
        tr = Trace.from_text(tokenizer, prompt, "Step one.\n\nStep two is")
    assert not tr.complete and tr.summary_steps == []
    assert [s.text for s in tr.steps[1:]] == ["Step one.", "Step two is"]


def test_harmony(tokenizer):
    tr = Trace.from_parts(tokenizer, question=Q, thinking="Add them.\n\nIt is 4.", summary="4", format="harmony")
    assert tr.format == "harmony" and tr.complete
    assert [s.text for s in tr.steps] == [Q, "Add them.", "It is 4.", "4"]
    # SmolLM2 has a token ".<": it starts in the step, so it belongs to it although its
    # second character is markup (the first-character rule)
    assert step_token_texts(tokenizer, tr) == [Q, "Add them.\n\n", "It is 4.<", "4"]
    # auto-detection, and a prompt that already opened the analysis message
    prompt = render_prompt(tokenizer, Q) + "<|channel|>analysis<|message|>"
    tr2 = Trace.from_text(tokenizer, prompt, "Add.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert tr2.format == "harmony" and [s.text for s in tr2.steps] == [Q, "Add.", "4"]
    assert step_token_texts(tokenizer, tr2)[1:] == ["Add.<", "4"]


def test_plain_markers(tokenizer):
    prompt = render_prompt(tokenizer, Q)
    tr = Trace.from_text(tokenizer, prompt, "Add two and two.\n\nThat gives 4.\nFinal Answer: 4")
    assert tr.format == "plain" and tr.complete
    # the summary starts at the start of the marker's line
    assert [s.text for s in tr.steps] == [Q, "Add two and two.", "That gives 4.", "Final Answer: 4"]
    tr = Trace.from_text(tokenizer, prompt, "Add.\n\nSo it is \\boxed{4}.")
    assert [s.text for s in tr.steps][1:] == ["Add.", "So it is \\boxed{4}."]
    assert tr.step_kinds == ["question", "thinking", "summary"]
    tr = Trace.from_parts(tokenizer, question=Q, thinking="Add.", summary="4", format="plain")
    assert tr.text.endswith("Add.\n\nAnswer: 4") and [s.text for s in tr.steps][1:] == ["Add.", "Answer: 4"]
    with pytest.warns(TraceWarning, match="no summary marker"):
        tr = Trace.from_text(tokenizer, prompt, "Just thinking.", format="plain")
    assert not tr.complete


def test_detect_format():
    assert detect_format("p", "a</think>b") == "r1"
    assert detect_format("p<think>\n", "abc") == "r1"
    assert detect_format("p", "<|channel|>analysis<|message|>x") == "harmony"
    assert detect_format("p", "x\n\nAnswer: 3") == "plain"
    assert detect_format("p", "no markers at all") == "r1"


def test_a_token_belongs_to_the_step_of_its_first_visible_character(tokenizer):
    # SmolLM2 tokenises "x \n\n y" as "x", " \n\n", " y": " y" starts at a space that
    # trails step "x", but its first visible character is "y", so it is step "y"'s
    # first token; the whitespace-only " \n\n" stays with the step before it.
    assert [decode(tokenizer, [i]) for i in tokenizer.encode("x \n\n y", add_special_tokens=False)] == [
        "x", " \n\n", " y"]
    prompt = render_prompt(tokenizer, Q) + "<think>\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)
        tr = Trace.from_text(tokenizer, prompt, "x \n\n y</think>\n\n4")
    assert [s.text for s in tr.steps] == [Q, "x", "y", "4"]
    assert step_token_texts(tokenizer, tr)[1:3] == ["x \n\n", " y"]
    tr = Trace.from_text(tokenizer, prompt, "end.  \n\n  Then\n\nok</think>\n\n4")
    assert step_token_texts(tokenizer, tr)[1:4] == ["end.  \n\n ", " Then\n\n", "ok"]
    assert [s.text for s in tr.steps][1:4] == ["end.", "Then", "ok"]
    # The real case of issue 13 (R1-Distill-Qwen-14B, an indented paragraph inside a list):
    # " The" goes to the step it starts, not to the one whose trailing whitespace it begins in.
    thinking = ("1. **Units place (ones place):** The 4 can appear in the units place. "
                "How many such numbers are there?\n\n   The first occurrence is at 4.")
    tr = Trace.from_parts(tokenizer, question=Q, thinking=thinking, summary="49")
    assert step_token_texts(tokenizer, tr)[1].endswith("are there?\n\n  ")
    assert step_token_texts(tokenizer, tr)[2] == " The first occurrence is at 4.\n"
    # whitespace before a segment's first step belongs to no step
    t1 = tr.steps[1].token_span[0]
    assert decode(tokenizer, tr.token_ids[t1 - 1:t1].tolist()) == "\n" and tr.token_steps[t1 - 1] == -1
    assert_consistent(tr)


def test_one_token_steps_and_unicode(tokenizer):
    thinking = "A\n\nB\n\n😀 世界 ∑∫ x² ≤ π\n\n世界\n\nÆ"
    tr = Trace.from_parts(tokenizer, question="Σ = ?", thinking=thinking, summary="∎")
    assert [s.text for s in tr.steps] == ["Σ = ?", "A", "B", "😀 世界 ∑∫ x² ≤ π", "世界", "Æ", "∎"]
    texts = step_token_texts(tokenizer, tr)
    assert texts == ["Σ = ?", "A\n\n", "B\n\n", "😀 世界 ∑∫ x² ≤ π\n\n", "世界\n\n", "Æ\n", "∎"]
    a, b = tr.steps[1].token_span  # step "A": one content token, then its separator
    assert decode(tokenizer, tr.token_ids[a:a + 1].tolist()) == "A"
    assert decode(tokenizer, tr.token_ids[a + 1:b].tolist()) == "\n\n"
    assert_consistent(tr)


def test_sentence_split_and_callable(tokenizer):
    thinking = 'First, add. Then check! Is it 4? "Yes." Done\n\nNew para'
    tr = Trace.from_parts(tokenizer, question=Q, thinking=thinking, summary="4", split="sentences")
    assert [s.text for s in tr.thinking_steps and [tr.steps[i] for i in tr.thinking_steps]] == [
        "First, add.", "Then check!", "Is it 4?", '"Yes."', "Done", "New para"]
    assert step_starts("a.b c. d", "sentences") == [0, 7]

    def by_line(text):
        spans, pos = [], 0
        for line in text.split("\n"):
            spans.append((pos, pos + len(line)))
            pos += len(line) + 1
        return spans

    tr = Trace.from_parts(tokenizer, question=Q, thinking="one\ntwo\n\nthree", summary="4", split=by_line)
    assert [tr.steps[i].text for i in tr.thinking_steps] == ["one", "two", "three"]
    with pytest.raises(TraceError, match="out of order"):
        Trace.from_parts(tokenizer, question=Q, thinking="a b", summary="4", split=lambda t: [(2, 3), (0, 1)])
    with pytest.raises(TraceError, match="split must be"):
        Trace.from_parts(tokenizer, question=Q, thinking="a", summary="4", split="words")


def test_lines_split_and_auto(tokenizer):
    thinking = "1. Tom has 3 pens.\n2. He buys 4 more:\n   3 + 4 = 7.\n\n3. So 7."
    tr = Trace.from_parts(tokenizer, question=Q, thinking=thinking, summary="7", split="lines")
    assert [tr.steps[i].text for i in tr.thinking_steps] == [
        "1. Tom has 3 pens.", "2. He buys 4 more:", "3 + 4 = 7.", "3. So 7."]
    assert step_starts("a\n b \n\nc", "lines") == [0, 3, 7]
    # auto: the plain format (no thinking tags) is split into lines, r1 into paragraphs
    plain = Trace.from_parts(tokenizer, question=Q, thinking=thinking, summary="7", format="plain", split="auto")
    assert len(plain.thinking_steps) == 4
    r1 = Trace.from_parts(tokenizer, question=Q, thinking=thinking, summary="7", split="auto")
    assert [r1.steps[i].text for i in r1.thinking_steps] == ["1. Tom has 3 pens.\n2. He buys 4 more:\n   3 + 4 = 7.",
                                                             "3. So 7."]


def test_chat_conversations_and_wrong_types(tokenizer):
    system = "You are a careful tutor."
    conv = [{"role": "system", "content": system}, {"role": "user", "content": Q}]
    a = Trace.from_parts(tokenizer, question=conv, thinking="Add.\n\nIt is 4.", summary="4")
    b = Trace.from_parts(tokenizer, question=Q, thinking="Add.\n\nIt is 4.", summary="4", system=system)
    assert a.to_dict() == b.to_dict() and system in a.text and a.steps[0].text == Q
    c = Trace.from_parts(tokenizer, question=[{"role": "user", "content": Q}], thinking="Add.", summary="4")
    assert c.to_dict() == Trace.from_parts(tokenizer, question=Q, thinking="Add.", summary="4").to_dict()
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": Q}]
    multi = Trace.from_parts(tokenizer, question=turns, thinking="Add.", summary="4")
    assert multi.steps[0].text == Q and "Hello." in multi.text
    rec = Trace.from_record(tokenizer, {"question": conv, "output": "Add.\n</think>\n\n4"})
    assert rec.steps[0].text == Q and system in rec.text
    for bad, match in [
        (dict(question=3), "question must be a str or a chat conversation"),
        (dict(question=[{"role": "user", "content": 3}]), r"question\[0\] must be a message"),
        (dict(question=conv[:1]), "must end with a user message"),
        (dict(question=conv, system="x"), "do not also pass system="),
        (dict(question=Q, thinking=None), "thinking must be a str, got NoneType"),
        (dict(question=Q, summary=4), "summary must be a str or None, got int"),
    ]:
        with pytest.raises(TraceError, match=match):
            Trace.from_parts(tokenizer, **{"thinking": "Add.", "summary": "4", **bad})
    prompt = render_prompt(tokenizer, Q)
    with pytest.raises(TraceError, match="output_text must be a str, got NoneType"):
        Trace.from_text(tokenizer, prompt, None)
    with pytest.raises(TraceError, match=r"'output' is null, not text; fill it in or drop the record"):
        Trace.from_record(tokenizer, {"question": Q, "output": None})
    with pytest.raises(TraceError, match=r"record\['question'\] must be a str or a chat conversation"):
        Trace.from_record(tokenizer, {"question": 7, "output": "x"})


def test_split_summary(tokenizer):
    tr = Trace.from_parts(tokenizer, question=Q, thinking="a", summary="S1.\n\nS2.", split_summary=True)
    assert [tr.steps[i].text for i in tr.summary_steps] == ["S1.", "S2."]
    tr = Trace.from_parts(tokenizer, question=Q, thinking="a", summary="S1.\n\nS2.")
    assert [tr.steps[i].text for i in tr.summary_steps] == ["S1.\n\nS2."]


def test_errors_and_options(tokenizer):
    prompt = render_prompt(tokenizer, Q)
    with pytest.raises(TraceError, match="no thinking step"):
        Trace.from_text(tokenizer, prompt, "</think>\n\n4")
    tr = Trace.from_text(tokenizer, prompt, "</think>\n\n4", allow_no_thinking=True)
    assert tr.thinking_steps == [] and tr.summary_steps == [1]
    with pytest.raises(TraceError, match="parse back"):
        Trace.from_parts(tokenizer, question=Q, thinking="a</think>b", summary="4")
    with pytest.raises(TraceError, match="not found in the prompt"):
        Trace.from_text(tokenizer, prompt, "a</think>b", question="Not there")
    with pytest.raises(TraceError, match="format must be"):
        Trace.from_text(tokenizer, prompt, "a", format="xml")
    full = Trace.from_text(tokenizer, prompt, "a b c d e f.\n\ng h</think>\n\n4")
    with pytest.raises(TraceError, match=rf"{full.n_tokens} tokens, more than max_tokens=40"):
        Trace.from_text(tokenizer, prompt, "a b c d e f.\n\ng h</think>\n\n4", max_tokens=40)
    with pytest.warns(TraceWarning, match="truncated"):
        cut = Trace.from_text(tokenizer, prompt, "a b c d e f.\n\ng h</think>\n\n4", max_tokens=40, truncate=True)
    assert cut.n_tokens == 40 and not cut.complete
    assert cut.token_steps.tolist() == full.token_steps[:40].tolist()
    assert cut.summary_steps == [] and full.text.startswith(cut.text)
    assert_consistent(cut)


def test_from_ids_keeps_the_given_ids(tokenizer):
    tok = tokenizer
    prompt = render_prompt(tok, Q) + "<think>\n"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = non_canonical_output(tok)
    text, offsets = decode_with_offsets(tok, p_ids + out)
    n = len(p_ids)
    assert text == prompt + "Add.\n\n😀\ufffdIt is 4.\n</think>\n\n4"
    emoji = text.index("😀")
    assert [o[0] for o in offsets[n + 3:n + 10]] == [emoji] * 4 + [emoji + 1, emoji + 2, emoji + 3]
    tr = Trace.from_ids(tok, torch.tensor(p_ids), out)
    assert tr.token_ids.tolist() == p_ids + out and tr.text == text
    assert tok(text, add_special_tokens=False)["input_ids"] != p_ids + out
    assert [s.text for s in tr.steps] == [Q, "Add.", "😀\ufffdIt is 4.", "4"]
    assert step_token_texts(tok, tr)[2] == "😀\ufffdIt is 4.\n"
    assert_consistent(tr)
    with pytest.raises(TraceError, match="output_ids must be a list of ints"):
        Trace.from_ids(tok, p_ids, "Add.")
    with pytest.raises(TraceError, match="prompt_ids must be a 1-d integer tensor"):
        Trace.from_ids(tok, torch.tensor([p_ids]), out)
    with pytest.raises(TraceError, match="prompt_ids is empty"):
        Trace.from_ids(tok, [], out)


def test_no_chat_template_fallback():
    tok = load_embedded_tokenizer()
    tok.chat_template = None
    tr = Trace.from_parts(tok, question=Q, thinking="Add.", summary="4")
    assert tr.text.startswith("Question:\n" + Q + "\n\n<think>\n")
    assert [s.text for s in tr.steps] == [Q, "Add.", "4"]


def test_fingerprint_and_roundtrip(tokenizer, tiny_bridge):
    tr = Trace.from_parts(tokenizer, question=Q, thinking="Add.", summary="4")
    tr.check_tokenizer(tokenizer)
    tr.check_tokenizer(tiny_bridge)  # same tokenizer inside a model
    other = Trace.from_dict(json.loads(json.dumps(tr.to_dict())))
    assert other.token_ids.tolist() == tr.token_ids.tolist()
    assert other.steps == tr.steps and other.text == tr.text
    other.tokenizer_fingerprint = "0" * 16
    with pytest.raises(TraceError, match="another tokenizer"):
        other.check_tokenizer(tokenizer)
    with pytest.raises(TraceError, match="not a serialised Trace"):
        Trace.from_dict({"text": "x"})


def test_model_context_limit(tiny_bridge):
    n_ctx = tiny_bridge.cfg.n_ctx
    with pytest.raises(TraceError, match=f"max_tokens={n_ctx}"):
        Trace.from_parts(tiny_bridge, question=Q, thinking="word " * (n_ctx + 10), summary="4")


@pytest.fixture(scope="module")
def real_traces(tokenizer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traces = load_traces(TRACES, tokenizer)
    return traces, [str(w.message) for w in caught if issubclass(w.category, TraceWarning)]


def test_all_real_traces_load(real_traces):
    traces, warned = real_traces
    assert len(traces) == 71
    incomplete = [t for t in traces if not t.complete]
    assert len(incomplete) == 1 and incomplete[0].summary_steps == []
    assert "math500_0009" in json.dumps(incomplete[0].meta)
    assert warned == [w for w in warned if "cut off" in w] and len(warned) == 1
    for t in traces:
        assert t.format == "r1" and len(t.question_steps) == 1 and len(t.thinking_steps) >= 1
        assert t.complete == bool(t.summary_steps)
        assert {"correct", "gold", "model", "source"} <= set(t.meta)
    assert sum(t.meta["correct"] for t in traces) == 57
    assert sum(t.n_steps for t in traces) == 5719


@pytest.mark.parametrize("tok_name", ["tokenizer", "qwen2_style_tokenizer"])
def test_real_traces_steps_own_exactly_their_tokens(request, tok_name):
    """On all 71 real traces: each step's tokens decode to the step's text, steps tile
    their segment's tokens in order, and the thinking steps hold every visible character
    of the thinking."""
    tok = request.getfixturevalue(tok_name)
    records = [json.loads(line) for line in TRACES.read_text().splitlines()]
    for rec in records:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = Trace.from_record(tok, rec)
        assert_consistent(t)
        steps, ids = t.token_steps.tolist(), t.token_ids.tolist()
        for s in t.steps:
            a, b = s.token_span
            assert steps[a:b] == [s.index] * (b - a), (rec["source"], s.index)
            assert decode(tok, ids[a:b]).strip() == s.text, (rec["source"], s.index)
        for kind in ("question", "thinking", "summary"):
            spans = [s.token_span for s in t.steps if s.kind == kind]
            assert all(x[1] == y[0] for x, y in zip(spans, spans[1:])), (rec["source"], kind)
        thinking = rec["output"].split("</think>")[0].replace("<think>", "")
        covered = set()
        for i in t.thinking_steps:
            covered.update(range(*t.steps[i].char_span))
        start = len(t.text) - len(rec["output"])
        visible = [j for j in range(start, len(t.text)) if not t.text[j].isspace()]
        in_thinking = [j for j in visible if j in covered]
        assert "".join(t.text[j] for j in in_thinking) == "".join(thinking.split()), rec["source"]
        summary = rec["output"].split("</think>", 1)[1] if t.complete else ""
        got = "".join(t.steps[i].text for i in t.summary_steps)
        assert "".join(got.split()) == "".join(summary.split()), rec["source"]
        # the same ids given as ids: decoding them gives the same text, offsets and steps
        n_prompt = int((t.token_offsets[:, 0] < start).sum())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = Trace.from_ids(tok, ids[:n_prompt], ids[n_prompt:], "r1", question=rec["question"])
        assert again.text == t.text and again.steps == t.steps, rec["source"]
        assert again.token_steps.tolist() == steps, rec["source"]


def test_load_traces_json_and_errors(tmp_path, tokenizer):
    p = tmp_path / "t.json"
    p.write_text(json.dumps([{"question": Q, "output": "Add.\n</think>\n\n4", "correct": True}]))
    (t,) = load_traces(p, tokenizer)
    assert t.meta == {"correct": True, "record_index": 0}
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(TraceError, match="record 0: a trace record needs"):
        load_traces(bad, tokenizer)
    with pytest.raises(TraceError, match="not found"):
        load_traces(tmp_path / "missing.jsonl", tokenizer)
    broken = tmp_path / "c.jsonl"
    broken.write_text(json.dumps({"question": Q, "output": "4"}) + "\n\n{\"question\": \n")
    with pytest.raises(TraceError, match="c.jsonl, line 3: not valid JSON"):
        load_traces(broken, tokenizer)
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"data": [{"question": Q, "output": "Add.\n</think>\n\n4"}] * 2}))
    assert len(load_traces(one, tokenizer)) == 2
