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


# --------------------------------------------------------------------------- the command line
from stepflow_tl.cli.main import main  # noqa: E402

GOOD = {"question": "Sam has 2 pens and buys 3 more. How many pens does he have?",
        "output": "Sam starts with 2 pens.\n\nHe buys 3, so 2 + 3 = 5.\n</think>\n\nAnswer: \\boxed{5}",
        "correct": True}


def _one_line_error(capsys, argv, match):
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("stepflow-tl: error: ") == 1, err
    assert err.rstrip("\n").split("\n")[-1].startswith("stepflow-tl: error: "), err
    assert re.search(match, err), err
    return err


@pytest.fixture()
def no_model(monkeypatch):
    """Every check below must fire before a model is loaded: loading one fails the test."""
    import stepflow_tl.cli.common as common

    def refuse(args):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(common, "load_model", lambda *a, **k: refuse(None))


def _write(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("record, match", [
    ({"correct": "yes"}, r"record 1: 'correct' is \"yes\", not true or false; write a JSON boolean"),
    ({"correct": 1}, r"record 1: 'correct' is 1, not true or false"),
    ({"question": None}, r"record 1: record\['question'\] must be a str or a chat conversation .* got NoneType"),
    ({"question": ""}, r"record 1: 'question' is empty"),
    ({"question": 5}, r"record 1: record\['question'\] must be a str"),
    ({"output": ["a"]}, r"record 1: 'output' is \[\"a\"\], not text"),
])
@pytest.mark.parametrize("command", ["saliency", "validate"])
def test_trace_records_are_checked_before_the_model_loads(tmp_path, capsys, no_model, command, record, match):
    path = _write(tmp_path / "t.jsonl", GOOD, {**GOOD, **record})
    _one_line_error(capsys, [command, path, "--out", str(tmp_path / "o")], r"t\.jsonl, " + match)


@pytest.mark.parametrize("question", [None, ["a"], {"q": 1}, True, ""])
def test_eval_refuses_a_question_that_is_not_text(tmp_path, capsys, no_model, question):
    path = _write(tmp_path / "p.jsonl", {"id": "a", "question": "What is 1 + 1?", "answer": "2"},
                  {"id": "b", "question": question, "answer": "2"})
    _one_line_error(capsys, ["eval", path, "--out", str(tmp_path / "o")],
                    r"p\.jsonl, row 1: field 'question' is (empty|.*, not text)")


def test_an_empty_input_file_is_named(tmp_path, capsys, no_model):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    for command in ("saliency", "validate"):
        _one_line_error(capsys, [command, str(path), "--out", str(tmp_path / "o")],
                        r"empty\.jsonl holds no trace records")
    _one_line_error(capsys, ["eval", str(path), "--out", str(tmp_path / "o")], r"empty\.jsonl holds no problems")


@pytest.mark.parametrize("argv, match", [
    (["saliency", "T", "--max-tokens", "-5"], r"--max-tokens must be an integer >= 1, got -5"),
    (["saliency", "T", "--limit", "0"], r"--limit must be an integer >= 1, got 0"),
    (["saliency", "T", "--maps-in-report", "-1"], r"--maps-in-report must be an integer >= 0"),
    (["validate", "T", "--max-tokens", "0"], r"--max-tokens must be an integer >= 1, got 0"),
    (["validate", "T", "--skip-longer"], r"--skip-longer has no effect without --max-tokens N"),
    (["validate", "T", "--n-boot", "5"], r"--n-boot must be an integer >= 100, got 5"),
    (["validate", "T", "--max-key-steps", "-2"], r"--max-key-steps must be an integer >= -1"),
    (["validate", "T", "--conditions", "stepflow"], r"the conditions must include 'baseline'"),
    (["eval", "--saliency", "-5"], r"--saliency must be an integer >= -1, got -5"),
    (["eval", "--max-new-tokens", "0"], r"--max-new-tokens must be an integer >= 1"),
    (["eval", "--batch-size", "0"], r"--batch-size must be an integer >= 1"),
    (["eval", "--n-per-level", "0"], r"--n-per-level must be an integer >= 1"),
    (["eval", "--do-sample", "--temperature", "0"], r"--temperature must be a finite number in \(0.0, inf\)"),
    (["eval", "--do-sample", "--top-p", "1.5"], r"--top-p must be a finite number in \(0.0, 1.0\]"),
    (["generate", "q", "--max-new-tokens", "0"], r"--max-new-tokens must be an integer >= 1"),
    (["generate", "q", "--sample", "--temperature", "-1"], r"--temperature must be a finite number"),
    (["generate", "q", "--device", "cuda:99"], r"--device: device 'cuda:99'(: there| needs CUDA)"),
    (["generate", "q", "--device", "gpu"], r"--device: device 'gpu' is not a torch device; use cpu, cuda"),
    (["info", "--device", "banana"], r"--device: device 'banana' is not a torch device"),
])
def test_options_are_checked_before_the_model_loads(tmp_path, capsys, no_model, argv, match):
    traces = _write(tmp_path / "t.jsonl", GOOD)
    argv = [traces if a == "T" else a for a in argv]
    if argv[0] != "generate" and argv[0] != "info":
        argv += ["--out", str(tmp_path / "o")]
    _one_line_error(capsys, argv, match)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(capsys, no_model):
    _one_line_error(capsys, ["info", "--device", "cuda"],
                    r"--device: device 'cuda' needs CUDA, which is not available here .*; use cpu")


def test_cut_traces_say_what_was_cut(tmp_path, capsys, tiny_bridge):
    # --max-tokens 5 used to say "more than max_tokens=5 (the model's context)", and a
    # cut that keeps no thinking "the trace has no thinking step"
    with pytest.raises(TraceError, match=r"more than max_tokens=5; pass truncate=True"):
        Trace.from_record(tiny_bridge, GOOD, max_tokens=5)
    with pytest.raises(TraceError, match=r"cut to max_tokens=5 tokens, the trace keeps none of its thinking"):
        Trace.from_record(tiny_bridge, GOOD, max_tokens=5, truncate=True)
    traces = _write(tmp_path / "t.jsonl", GOOD)
    _one_line_error(capsys, ["validate", traces, "--model", "tiny", "--max-tokens", "5", "--out", str(tmp_path / "o")],
                    r"record 0: cut to max_tokens=5 tokens, the trace keeps none of its thinking .*raise max_tokens")
    _one_line_error(capsys, ["validate", traces, "--model", "tiny", "--max-tokens", "5", "--skip-longer",
                             "--out", str(tmp_path / "o")],
                    r"every trace of .*t\.jsonl is longer than --max-tokens 5, so --skip-longer left none")


def test_half_precision_saliency_on_the_cpu_warns_and_the_dtype_is_recorded():
    from stepflow_tl.saliency.compute import HalfPrecisionWarning
    from stepflow_tl.tl.models import load_model

    model = load_model("tiny", device="cpu", dtype="bfloat16")
    trace = Trace.from_parts(model, "What is 2 + 2?", "First step.\n\nSecond step.", "4")
    with pytest.warns(HalfPrecisionWarning, match=r"bfloat16 model on the CPU: half precision changes the maps"):
        result = step_saliency(model, trace, mode="bounded")
    assert result.meta["dtype"] == "bfloat16" and result.meta["device"] == "cpu" and result.meta["mode"] == "bounded"


@pytest.mark.parametrize("answer", [True, {"a": 1}, ["4"]])
def test_an_answer_that_is_not_an_answer_is_refused(tmp_path, answer):
    from stepflow_tl.study.problems import load_problems

    path = _write(tmp_path / "p.jsonl", {"id": "a", "question": "What is 2 + 2?", "answer": answer})
    with pytest.raises(StepflowError, match=r"p\.jsonl, row 0: field 'answer' is .*, not an answer"):
        load_problems(path)
