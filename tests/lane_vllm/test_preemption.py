"""Preemption: with a KV cache too small for every request, vLLM preempts requests and
later recomputes them; the step state follows (the recomputed tokens must equal the ones
the tracker has) and every token is still the TL teacher-forced argmax under StepFlow.
The small engine runs in its own process (one engine per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is installed only in the vLLM lane (make test-vllm)")

from stepflow_tl.interventions import StepFlow  # noqa: E402
from stepflow_tl.study.problems import builtin_suite  # noqa: E402
from stepflow_tl.traces.trace import Trace  # noqa: E402

from .test_exact import NEAR_TIE, teacher_forced  # noqa: E402

SCRIPT = textwrap.dedent("""
    import json, sys
    from stepflow_tl.engines.vllm import VLLMEngine
    from stepflow_tl.interventions import StepFlow
    questions = json.loads(sys.argv[1])
    # 6 blocks for 8 requests that each outgrow one block: vLLM must preempt
    engine = VLLMEngine("smollm2", max_num_seqs=8, max_model_len=512, num_gpu_blocks_override=6)
    gens = engine.generate(questions, max_new_tokens=96, seed=5, interventions=[StepFlow()])
    print("RESULT " + json.dumps({"stats": engine.last_call_stats, "gens": [
        {"prompt_ids": g.prompt_ids, "output_ids": g.output_ids, "seed": g.seed,
         "events": [[e.intervention, e.layer, e.position, e.step] for e in g.events]} for g in gens]}))
""")


def test_preempted_requests_recompute_with_the_same_step_state(smollm2, engine):
    questions = [p.question for p in builtin_suite(n_per_level=2, levels=(1, 2, 3, 4))][:8]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(questions)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["stats"]["recomputed_tokens"] > 0, f"vLLM preempted nothing: {result['stats']}"
    probe = engine.generate(questions[:1], max_new_tokens=1)[0]  # the format and split "auto" resolves to
    for question, got in zip(questions, result["gens"]):
        trace = Trace.from_ids(engine.tokenizer, got["prompt_ids"], got["output_ids"], format=probe.format,
                               question=question, split=probe.split, allow_no_thinking=True)
        gen = SimpleNamespace(trace=trace, prompt_ids=got["prompt_ids"], output_ids=got["output_ids"], seed=got["seed"])
        logits, events = teacher_forced(smollm2, gen, [StepFlow()])
        chosen = logits.gather(-1, torch.tensor(got["output_ids"])[:, None])[:, 0]
        assert (logits.max(-1).values - chosen <= NEAR_TIE).all()
        assert sorted(map(tuple, got["events"])) == sorted((e.intervention, e.layer, e.position, e.step) for e in events)
