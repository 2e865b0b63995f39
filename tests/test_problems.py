"""Problem loading (every accepted file shape), the built-in suite and prompts."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import R1_TRACES

from stepflow_tl.errors import StepflowError
from stepflow_tl.study.grading import grade
from stepflow_tl.study.problems import Problem, SuiteConfig, builtin_suite, load_problems, prompt_for


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MATH500 = [
    {"problem": "Compute $\\frac{7}{3} \\cdot 2$.", "solution": "...", "answer": "\\frac{14}{3}", "subject": "Algebra",
     "level": 2, "unique_id": "test/algebra/1.json"},
    {"problem": "What is $3^2$?", "solution": "...", "answer": "9", "subject": "Algebra", "level": "Level 1",
     "unique_id": "test/algebra/2.json"},
]
GPQA = [
    {"Record ID": f"rec{i}", "Question": f"Which particle is number {i}?", "Correct Answer": "electron",
     "Incorrect Answer 1": "proton", "Incorrect Answer 2": "neutron", "Incorrect Answer 3": "photon"}
    for i in range(40)
]


# ----------------------------------------------------------------------------- file shapes


def test_math500_jsonl(tmp_path):
    problems = load_problems(write_jsonl(tmp_path / "math500.jsonl", MATH500))
    assert [p.id for p in problems] == ["test/algebra/1.json", "test/algebra/2.json"]
    assert [p.kind for p in problems] == ["math", "math"]  # "9" stays math: MATH golds are LaTeX
    assert [p.difficulty for p in problems] == [2, 1]
    assert problems[0].answer == "\\frac{14}{3}" and problems[0].meta["subject"] == "Algebra"
    assert grade("\\boxed{\\dfrac{14}{3}}", problems[0]).correct


def test_aime_csv_keeps_leading_zero_golds_as_integers(tmp_path):
    path = tmp_path / "aime.csv"
    path.write_text('id,problem,answer\n2024-I-1,"Find x, if 2x = 66.",033\n2024-I-2,Find y.,204\n')
    problems = load_problems(path)
    expected = [("2024-I-1", "integer", "33"), ("2024-I-2", "integer", "204")]
    assert [(p.id, p.kind, p.answer) for p in problems] == expected
    assert problems[0].question == "Find x, if 2x = 66."
    assert grade("So x = 33.\nAnswer: 33", problems[0]).correct
    forced = load_problems(path, kind="math")
    assert {p.kind for p in forced} == {"math"} and grade("\\boxed{033}", forced[0]).correct


def test_gsm8k_takes_gold_after_hashes(tmp_path):
    rows = [{"question": "Natalia sold clips...", "answer": "She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072"}]
    (problem,) = load_problems(write_jsonl(tmp_path / "gsm8k.jsonl", rows))
    assert (problem.kind, problem.answer, problem.id) == ("integer", "1072", "gsm8k-0")
    assert problem.meta["solution"].endswith("#### 1,072")


def test_gpqa_shuffle_is_seeded_per_problem(tmp_path):
    path = tmp_path / "gpqa.json"
    path.write_text(json.dumps(GPQA))
    problems = load_problems(path)
    again = load_problems(path)
    assert [p.choices for p in problems] == [p.choices for p in again]
    for p in problems:
        assert p.kind == "choice" and sorted(p.choices) == ["electron", "neutron", "photon", "proton"]
        assert p.choices["ABCD".index(p.answer)] == "electron"
        assert "Correct Answer" not in p.meta and "Incorrect Answer 1" not in p.meta
    # 40 problems: the correct option lands on every letter, not always on A.
    assert set(Counter(p.answer for p in problems)) == set("ABCD")
    reseeded = load_problems(path, choice_seed=1)
    assert [p.answer for p in reseeded] != [p.answer for p in problems]
    assert grade(f"The answer is ({problems[0].answer}).", problems[0]).correct


def test_json_data_wrapper_and_generic_choices(tmp_path):
    rows = [
        {"id": "a", "question": "2+2?", "choices": ["3", "4", "5"], "answer": 1},
        {"id": "b", "question": "Sky?", "choices": ["red", "blue"], "answer": "blue"},
        {"id": "c", "question": "Pick C", "choices": ["x", "y", "z"], "answer": "(c)"},
        {"id": "d", "question": "1/2 as a fraction?", "answer": "\\frac{1}{2}"},
        {"id": "e", "question": "3*4?", "answer": 12},
        {"id": "f", "question": "solve", "answer": "2", "kind": "math"},
    ]
    path = tmp_path / "generic.json"
    path.write_text(json.dumps({"data": rows}))
    got = {p.id: (p.kind, p.answer) for p in load_problems(path)}
    assert got == {
        "a": ("choice", "B"), "b": ("choice", "B"), "c": ("choice", "C"),
        "d": ("math", "\\frac{1}{2}"), "e": ("integer", "12"), "f": ("math", "2"),
    }


def test_csv_choices_as_json_cell(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text('question,choices,answer\nWhich?,"[""cat"", ""dog""]",A\n')
    (problem,) = load_problems(path)
    assert problem.choices == ("cat", "dog") and problem.answer == "A"
    assert "A) cat\nB) dog" in prompt_for(problem)


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "math500.parquet"
    pd.DataFrame(MATH500).astype({"level": str}).to_parquet(path)
    problems = load_problems(path)
    assert [p.answer for p in problems] == ["\\frac{14}{3}", "9"]
    assert [p.difficulty for p in problems] == [2, 1]
    mc = tmp_path / "mc.parquet"
    pd.DataFrame([{"question": "q", "choices": ["a", "b"], "answer": 1}]).to_parquet(mc)
    (problem,) = load_problems(mc)
    assert problem.choices == ("a", "b") and problem.answer == "B"


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    with pytest.raises(StepflowError, match="pip install pyarrow"):
        load_problems(path)


@pytest.mark.skipif(not R1_TRACES.is_file(), reason="needs shared/data/r1_traces.jsonl beside the repository")
def test_r1_traces_file():
    with pytest.raises(StepflowError, match=r"row 70: field 'gold' is empty.*missing_answer='skip'"):
        load_problems(R1_TRACES)
    problems = load_problems(R1_TRACES, missing_answer="skip")
    assert len(problems) == 70 and {p.kind for p in problems} == {"math"}
    assert problems[5].answer == "-\\frac{1} { 4027}"
    assert {"output", "correct", "source", "model"} <= set(problems[0].meta)
    assert [p.id for p in load_problems(R1_TRACES, limit=3)] == ["r1_traces-0", "r1_traces-1", "r1_traces-2"]


def test_missing_field_names_file_row_and_accepted_names(tmp_path):
    rows = [{"question": "ok", "answer": "1"}, {"question": "no gold", "solution": "x"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(StepflowError) as info:
        load_problems(path)
    message = str(info.value)
    assert "bad.jsonl, row 1" in message and "no answer field" in message
    assert "'answer'" in message and "'Correct Answer'" in message and "'solution'" in message
    no_question = write_jsonl(tmp_path / "noq.jsonl", [{"text": "x", "answer": "1"}])
    with pytest.raises(StepflowError, match=r"row 0: no question field.*'problem', 'question', 'Question'"):
        load_problems(no_question)


def test_other_bad_input(tmp_path):
    with pytest.raises(StepflowError, match="does not exist"):
        load_problems(tmp_path / "none.jsonl")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(StepflowError, match="expected .jsonl, .json, .csv or .parquet"):
        load_problems(tmp_path / "p.txt")
    (tmp_path / "broken.jsonl").write_text('{"question": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(StepflowError, match="line 2: not valid JSON"):
        load_problems(tmp_path / "broken.jsonl")
    gpqa = dict(GPQA[0])
    del gpqa["Incorrect Answer 3"]
    with pytest.raises(StepflowError, match="Incorrect Answer 3"):
        load_problems(write_jsonl(tmp_path / "gpqa.jsonl", [gpqa]))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "question": "a", "answer": "1"}] * 2)
    with pytest.raises(StepflowError, match="ids must be unique"):
        load_problems(dup)
    with pytest.raises(StepflowError, match="integer gold"):
        load_problems(write_jsonl(tmp_path / "frac.jsonl", [{"question": "a", "answer": "1/2"}]), kind="integer")
    with pytest.raises(StepflowError, match="does not fit a row with choices"):
        mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "a", "choices": ["x", "y"], "answer": "A"}])
        load_problems(mc, kind="math")
    with pytest.raises(StepflowError, match="not one of the letters"):
        Problem("x", "q", "E", "choice", ("a", "b"))


# ----------------------------------------------------------------------------- built-in suite


def _replay(problem: Problem) -> int:
    value = problem.meta["values"][0]
    for op, n in problem.meta["ops"]:
        value = {"add": value + n, "sub": value - n, "mul": value * n, "div": value // n}[op]
    return value


def test_builtin_suite_levels_and_answers():
    problems = builtin_suite(n_per_level=25, levels=(1, 2, 3, 4), seed=0)
    assert len(problems) == 100
    assert len({p.question for p in problems}) == 100
    for p in problems:
        assert p.kind == "integer" and p.difficulty == len(p.meta["ops"]) == p.meta["level"]
        assert int(p.answer) == _replay(p) == p.meta["values"][-1]
        assert all(1 <= v <= 40 for v in p.meta["values"])
        # Every operand and the starting count appear in the text; the answer is not given away
        # unless it happens to equal one of them.
        assert f"has {p.meta['values'][0]} " in p.question
        assert p.question.count("Then ") == p.difficulty - 1
        assert p.question.endswith("have now?")


def test_builtin_suite_seeds():
    a = builtin_suite(n_per_level=5, levels=(1, 3), seed=0)
    assert a == builtin_suite(n_per_level=5, levels=(1, 3), seed=0)
    assert [p.question for p in a] == [p.question for p in builtin_suite(n_per_level=5, levels=(1, 3), seed=0)]
    b = builtin_suite(n_per_level=5, levels=(1, 3), seed=1)
    assert not {p.question for p in a} & {p.question for p in b}
    # A level's problems do not depend on which other levels are requested.
    alone = builtin_suite(n_per_level=5, levels=(3,), seed=0)
    assert [p.question for p in alone] == [p.question for p in a if p.difficulty == 3]


def test_builtin_suite_knobs():
    config = SuiteConfig(operations=("add", "sub", "mul", "div"), start_range=(2, 6), max_value=30)
    problems = builtin_suite(n_per_level=40, levels=(3,), seed=2, config=config)
    used = Counter(op for p in problems for op, _ in p.meta["ops"])
    assert set(used) == {"add", "sub", "mul", "div"}
    for p in problems:
        assert int(p.answer) == _replay(p) and all(1 <= v <= 30 for v in p.meta["values"])
    only_add = SuiteConfig(operations=("add",), operand_range=(1, 2), names=(("Zoe", "she", "her", "her"),),
                           items=("shells",), templates={"add": ("{who} picks up {n} more.",)})
    (p,) = builtin_suite(n_per_level=1, levels=(2,), seed=0, config=only_add)
    assert p.question.startswith("Zoe has") and "She picks up" in p.question and "Then she picks up" in p.question
    with pytest.raises(StepflowError, match="no template"):
        SuiteConfig(operations=("mul",), templates={"add": ("x",)})
    with pytest.raises(StepflowError, match="subset of add/sub/mul/div"):
        SuiteConfig(operations=("pow",))
    with pytest.raises(StepflowError, match="levels must be positive"):
        builtin_suite(levels=(0,))
    with pytest.raises(StepflowError, match="distinct"):
        builtin_suite(n_per_level=50, levels=(1,), config=SuiteConfig(
            start_range=(2, 2), operand_range=(1, 1), operations=("add",), names=(("Al", "he", "him", "his"),),
            items=("pens",), templates={"add": ("{who} buys {n} more.",)}))


# ----------------------------------------------------------------------------- prompts


def test_prompt_for_each_kind_and_style():
    (p,) = builtin_suite(n_per_level=1, levels=(1,), seed=0)
    chat = prompt_for(p)
    assert chat.startswith(p.question) and chat.endswith('"Answer: <number>".') and "step by step" in chat
    assert prompt_for(p, style="r1").endswith("Please reason step by step, and put your final answer within \\boxed{}.")
    math = Problem("m", "Compute $1/2 + 1/2$.", "1", "math")
    assert "\\boxed{}" in prompt_for(math)
    mc = Problem("c", "Which?", "B", "choice", ("cat", "dog", "eel"))
    assert "A) cat\nB) dog\nC) eel" in prompt_for(mc) and '"Answer: <letter>"' in prompt_for(mc)
    assert "(A, B, C) within \\boxed{}" in prompt_for(mc, style="r1")
    with pytest.raises(StepflowError, match="style must be one of"):
        prompt_for(p, style="harmony")
