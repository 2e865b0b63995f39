"""Bad input is refused before work starts, with one message naming the input and the fix
(issue 22's probe cases); valid input is never refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from stepflow_tl.errors import StepflowError, TraceError
from stepflow_tl.interventions import generate
from stepflow_tl.saliency import step_saliency
from stepflow_tl.traces import Trace, load_traces
from stepflow_tl.traces.pooling import pool_to_steps
from stepflow_tl.traces.records import read_json_records


@pytest.fixture(scope="module")
def trace(tiny_bridge):
    return Trace.from_parts(tiny_bridge, "What is 2 + 2?", "First step.\n\nSecond step.", "4")


# --------------------------------------------------------------------------- JSON Lines
def test_json_lines_split_on_newline_only(tmp_path, tiny_bridge):
    """U+2028/U+2029 (and the other characters str.splitlines cuts at) are valid raw
    inside a JSON string; such a record used to be refused as "not valid JSON"."""
    odd = "a\u2028b\u2029c\x1cd\x85e\x0bf\x0cg"
    path = tmp_path / "t.jsonl"
    record = {"question": f"What is 2 + 2? {odd}", "output": f"Two and two.\n\nMake four {odd}.\n</think>\n\n4"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\r\n\n" + json.dumps(record, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    rows = read_json_records(path)
    assert [r["question"] for r in rows] == [record["question"]] * 2
    (first, _) = load_traces(path, tiny_bridge)
    assert odd in first.text


# --------------------------------------------------------------------------- API misuse
def test_api_misuse_raises_stepflow_errors_naming_the_argument(tiny_bridge, trace):
    vocab = len(tiny_bridge.tokenizer)
    with pytest.raises(TraceError, match=rf"prompt_ids\[2\] = {vocab + 5} is not a token id of this tokenizer"):
        Trace.from_ids(tiny_bridge, [1, 2, vocab + 5], [3, 4])
    with pytest.raises(TraceError, match=r"output_ids\[0\] = -1 is not a token id"):
        Trace.from_ids(tiny_bridge, [1, 2], [-1])
    edited = dataclasses.replace(trace)
    edited.token_ids = trace.token_ids.clone()
    edited.token_ids[3] = vocab + 10  # edited after construction: caught where the model would index it
    with pytest.raises(TraceError, match=rf"trace\.token_ids\[3\] = {vocab + 10} is not a token id"):
        step_saliency(tiny_bridge, edited)
    with pytest.raises(TraceError, match=r"token_steps must have one step index per token"):
        dataclasses.replace(trace, token_steps=trace.token_steps[:-2])
    steps = trace.token_steps.clone()
    steps[-1] = 99
    with pytest.raises(TraceError, match=r"token_steps holds step 99, outside 0\.\.3"):
        dataclasses.replace(trace, token_steps=steps)
    with pytest.raises(TraceError, match=r"token_ids must be a 1-d integer tensor"):
        dataclasses.replace(trace, token_ids=trace.token_ids.float())
    n = trace.n_tokens
    with pytest.raises(StepflowError, match=r"token_steps holds step 3, outside 0\.\.0 \(n_steps=1"):
        pool_to_steps(torch.rand(n, n), trace.token_steps, n_steps=1)
    with pytest.raises(StepflowError, match=r"pool must be one of"):
        step_saliency(tiny_bridge, trace, pool="max")
    with pytest.raises(StepflowError, match=r"mode must be one of"):
        step_saliency(tiny_bridge, trace, mode="fast")
    with pytest.raises(StepflowError, match=r"key steps \[50\] have no later step"):
        from stepflow_tl.study.validate import knockout_matrix
        knockout_matrix(tiny_bridge, trace, key_steps=[50])


def test_generate_checks_the_context_before_generating(tiny_bridge):
    n_ctx = tiny_bridge.cfg.n_ctx
    with pytest.raises(StepflowError, match=rf"max_new_tokens=100000: .* more than the model's context of {n_ctx}; "
                                            r"lower max_new_tokens to at most \d+"):
        generate(tiny_bridge, ["What is 2 + 2?"], max_new_tokens=100000)
    with pytest.raises(StepflowError, match=r"prompt 1 has"):
        generate(tiny_bridge, ["hi", "hello"], max_new_tokens=[2, n_ctx])
