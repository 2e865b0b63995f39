"""The vLLM engine behind the interfaces: the CLI's ``--engine vllm`` (generate, eval),
`evaluate` on a `VLLMEngine`, and the refusals, all with the session's one engine."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="vLLM is installed only in the vLLM lane (make test-vllm)")

from stepflow_tl.cli import main  # noqa: E402
from stepflow_tl.errors import StepflowError  # noqa: E402
from stepflow_tl.interventions import Intervention, StepFlow  # noqa: E402
from stepflow_tl.study import builtin_suite, evaluate  # noqa: E402


@pytest.fixture
def shared_engine(engine, monkeypatch):
    """The CLI makes its engine through ``VLLMEngine(...)``; it gets the session's."""
    import stepflow_tl.engines.vllm as module

    monkeypatch.setattr(module, "VLLMEngine", lambda *args, **kwargs: engine)
    return engine


def test_cli_generate_json_one_object_per_prompt(shared_engine, capsys):
    assert main(["generate", "What is 2 + 3?", "Name a prime.", "--engine", "vllm", "--stepflow",
                 "--max-new-tokens", "12", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2
    for obj in lines:
        assert obj["prompt_ids"] and 1 <= len(obj["output_ids"]) <= 12 and isinstance(obj["text"], str)
        assert isinstance(obj["events"], list)


def test_cli_eval_writes_the_same_kind_of_study(shared_engine, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["eval", "builtin", "--engine", "vllm", "--levels", "1,2", "--n-per-level", "2",
                 "--max-new-tokens", "24", "--out", str(out), "--no-progress"]) == 0
    for name in ("report.html", "summary.csv", "items.csv", "results.jsonl"):
        assert (out / name).is_file(), name
    lines = (out / "results.jsonl").read_text().splitlines()
    header, items = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    config = header.get("config", header)
    assert config["engine"] == "vllm" and "vllm" in config["software"]
    assert len(items) == 4 * 3 and all(it["prompt_ids"] and it["output_ids"] for it in items)


def test_evaluate_on_the_engine_pairs_items_by_seed(engine):
    problems = builtin_suite(n_per_level=2, levels=(1,))
    result = evaluate(engine, problems, conditions=("baseline", "stepflow"), max_new_tokens=16, progress=False)
    assert set(result.items["condition"]) == {"baseline", "stepflow"}
    assert result.items["output_ids"].map(len).min() >= 1
    with pytest.raises(StepflowError, match="saliency maps need a TransformerLens model"):
        evaluate(engine, problems, saliency=True, progress=False)


def test_refusals_are_one_line_errors(engine, tmp_path, monkeypatch):
    from stepflow_tl.engines import vllm as module

    for kwargs, match in [({"enable_prefix_caching": True}, "prefix caching"),
                          ({"tensor_parallel_size": 2}, "tensor parallelism"),
                          ({"speculative_config": {"method": "ngram"}}, "speculative decoding"),
                          ({"enforce_eager": False}, "eager")]:
        with pytest.raises(StepflowError, match=match):
            module.VLLMEngine("smollm2", **kwargs)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(StepflowError, match="supports LlamaForCausalLM"):
        module.VLLMEngine(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(StepflowError, match="vLLM could not load"):
        module.VLLMEngine(str(tmp_path))
    with pytest.raises(StepflowError, match="not a model folder"):
        module.VLLMEngine(str(tmp_path / "missing"))
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    with pytest.raises(StepflowError, match="outside the range"):
        module.check_vllm()
    monkeypatch.undo()

    class Other(Intervention):
        name = "other"

    with pytest.raises(StepflowError, match="cannot apply Other"):
        engine.generate(["Hi"], max_new_tokens=2, interventions=[StepFlow(), Other()])
    with pytest.raises(StepflowError, match="max_model_len"):
        engine.generate(["Hi"], max_new_tokens=5000)
