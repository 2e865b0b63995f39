"""Issue 25 (the authors' conventions as options): the sentence split with the 15-character
rule and the summary split from the CLI, per-benchmark token budgets."""

from __future__ import annotations

import json

import pytest

from stepflow_tl import StepflowError
from stepflow_tl.cli.main import main
from stepflow_tl.saliency.maps import StepSaliency
from stepflow_tl.study.problems import BENCHMARK_BUDGETS, Problem, load_problems
from stepflow_tl.study.run import evaluate

OUTPUT = ("Add them. Ok. Three plus four is seven.\n\nCheck it.\n</think>\n\n"
          "The sum is seven.\n\nAnswer: \\boxed{7}")


def test_split_and_summary_split_from_the_saliency_cli(tmp_path):
    traces = tmp_path / "t.jsonl"
    traces.write_text(json.dumps({"question": "What is 3 + 4?", "output": OUTPUT}) + "\n")
    kinds = {}
    for name, flags in {"default": [], "sentences": ["--split", "sentences"],
                        "min15": ["--split", "sentences_min15", "--split-summary"]}.items():
        out = tmp_path / name
        assert main(["saliency", str(traces), "--model", "tiny", "--out", str(out), *flags]) == 0
        kinds[name] = StepSaliency.load(out / "trace0000").step_kinds
    assert (kinds["default"].count("thinking"), kinds["default"].count("summary")) == (2, 1)
    assert kinds["sentences"].count("thinking") == 4  # Add them. | Ok. | Three plus ... | Check it.
    # under 15 characters a sentence joins the next ("Add them. Ok. Three plus four is seven."),
    # and the summary is cut at its blank line
    assert (kinds["min15"].count("thinking"), kinds["min15"].count("summary")) == (2, 2)

def test_benchmark_budgets(tmp_path, tiny_bridge):
    gpqa = tmp_path / "gpqa.jsonl"
    gpqa.write_text(json.dumps({"Question": "Which?", "Correct Answer": "a", "Incorrect Answer 1": "b",
                                "Incorrect Answer 2": "c", "Incorrect Answer 3": "d"}) + "\n")
    aime = tmp_path / "aime_2024.jsonl"
    aime.write_text(json.dumps({"id": "2024-I-1", "problem": "Find x.", "answer": "42"}) + "\n")
    (g,) = load_problems(gpqa, benchmark="auto")
    (a,) = load_problems(aime, benchmark="auto")
    assert (g.meta["benchmark"], g.meta["max_new_tokens"]) == ("gpqa", 12000)
    assert (a.meta["benchmark"], a.meta["max_new_tokens"]) == ("aime", 30000)
    assert BENCHMARK_BUDGETS["livecodebench"] == 10000
    assert "max_new_tokens" not in load_problems(aime)[0].meta
    with pytest.raises(StepflowError, match="benchmark must be one of"):
        load_problems(aime, benchmark="math500")
    problems = [Problem(id=f"p{i}", question="What is 1 + 1?", answer="2", kind="integer",
                        meta={"max_new_tokens": n}) for i, n in enumerate((2, 5))]
    result = evaluate(tiny_bridge, problems, conditions=["baseline"], max_new_tokens="benchmark", progress=False)
    tokens = dict(zip(result.items["problem_id"], result.items["n_tokens"]))
    assert tokens["p0"] <= 2 and tokens["p1"] <= 5
    with pytest.raises(StepflowError, match="needs a budget on every problem"):
        evaluate(tiny_bridge, [Problem(id="x", question="Q?", answer="1", kind="integer")],
                 max_new_tokens="benchmark", progress=False)


def test_compare_by_accuracy_splits_at_70_and_30_percent():
    import torch

    from stepflow_tl.saliency.diagnostics import compare, compare_by_accuracy

    g = torch.Generator().manual_seed(1)
    results = [StepSaliency(maps=torch.rand(4, 5, 5, generator=g, dtype=torch.float64).tril(), layers=[0, 1, 2, 3],
                            n_model_layers=4, step_kinds=["question", "thinking", "thinking", "thinking", "summary"],
                            step_labels=[f"S{i}" for i in range(5)]) for _ in range(7)]
    accuracy = [0.9, 0.7, 0.8, 0.5, 0.3, 0.0, 0.1]
    table = compare_by_accuracy(results, accuracy)
    expected = compare(results[:3], results[4:], labels=("high_accuracy", "low_accuracy"))
    layers = table[table["level"] == "layer"]
    assert table.equals(expected) and (layers["n_high_accuracy"] == 3).all() and (layers["n_low_accuracy"] == 3).all()
    with pytest.raises(StepflowError, match="one per trace"):
        compare_by_accuracy(results, accuracy[:2])


def _tiny_gpt_oss(tokenizer, layer_types):
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from stepflow_tl.tl.models import load_model

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=64, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=20, layer_types=layer_types, attn_implementation="eager", architectures=["GptOssForCausalLM"],
    )
    return load_model("tiny", backend="bridge", hf_model=GptOssForCausalLM(config).eval(), tokenizer=tokenizer,
                      device="cpu")


def test_gpt_oss_preset_puts_oeb_on_full_attention_layers(tokenizer, tiny_bridge):
    from stepflow_tl import StepFlow, generate

    kinds = ["sliding_attention", "full_attention"] * 4  # 8 layers: OEB's bottom quarter is 0-1
    model = _tiny_gpt_oss(tokenizer, kinds)
    preset = StepFlow.gpt_oss(model, tau_max=0.1)
    assert preset.oeb.layers == [1] and preset.oeb.tau_max == 0.1
    (gen,) = generate(model, "What is 2 + 2?", max_new_tokens=3, interventions=[preset])
    assert "layers=[1]" in gen.interventions[0] and {e.layer for e in gen.events if e.intervention == "oeb"} <= {1}
    with pytest.raises(StepflowError, match="config's layer_types"):
        StepFlow.gpt_oss(tiny_bridge)
    with pytest.raises(StepflowError, match="no full-attention layer"):
        StepFlow.gpt_oss(_tiny_gpt_oss(tokenizer, ["sliding_attention"] * 3 + ["full_attention"]))


def test_reasoning_effort_goes_in_the_prompt(tokenizer):
    import copy

    from stepflow_tl.traces.formats import render_prompt

    harmony = copy.copy(tokenizer)
    harmony.chat_template = ("{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>"
                             "{% endfor %}<|start|>system<|message|>Reasoning: {{ reasoning_effort }}<|end|>"
                             "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
    assert "Reasoning: low" in render_prompt(harmony, "Q?", reasoning_effort="low")
    with pytest.raises(StepflowError, match="reasoning_effort must be one of"):
        render_prompt(harmony, "Q?", reasoning_effort="max")
    with pytest.raises(StepflowError, match="does not"):
        render_prompt(tokenizer, "Q?", reasoning_effort="low")


def test_cli_preset_refusals(capsys):
    assert main(["generate", "Q?", "--model", "tiny", "--preset", "gpt-oss", "--max-new-tokens", "2"]) == 2
    assert "config's layer_types" in capsys.readouterr().err
    assert main(["generate", "Q?", "--model", "tiny", "--preset", "gpt-oss", "--stepflow"]) == 2
    assert "--stepflow has no effect with --preset" in capsys.readouterr().err
    assert main(["generate", "Q?", "--model", "tiny", "--reasoning-effort", "low", "--max-new-tokens", "2"]) == 2
    assert "reasoning_effort needs a chat template" in capsys.readouterr().err
