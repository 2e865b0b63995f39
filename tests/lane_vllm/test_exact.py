"""Exactness of the vLLM engine: every greedy token it generates with an intervention is
the argmax of the TransformerLens teacher-forced forward with the same intervention over
``prompt_ids + output_ids`` (up to near-ties, 2e-3 in fp32), and its event log is the TL
forward's, for every intervention and control, on 16 prompts x 64 tokens of the built-in
suite. vLLM runs them 8 at a time, so rows join, leave and share forwards with prefills.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is installed only in the vLLM lane (make test-vllm)")

from stepflow_tl.interventions import (
    MatchedLogitNoise, OddsEqualBridge, RandomBridge, RandomMomentum, StepFlow, StepMomentum, StepState,
)
from stepflow_tl.interventions.base import apply_interventions
from stepflow_tl.study.problems import builtin_suite

N_PROMPTS, N_TOKENS, NEAR_TIE = 16, 64, 2e-3
CONDITIONS = {
    "stepflow": lambda: [StepFlow()],
    "oeb": lambda: [OddsEqualBridge()],
    "smi": lambda: [StepMomentum()],
    "random_bridge": lambda: [RandomBridge()],
    "matched_noise": lambda: [MatchedLogitNoise()],
    "random_momentum": lambda: [RandomMomentum()],
    "random_stepflow": lambda: [RandomBridge(), RandomMomentum()],
}


@pytest.fixture(scope="module")
def questions():
    return [p.question for p in builtin_suite(n_per_level=4, levels=(1, 2, 3, 4))][:N_PROMPTS]


@pytest.fixture(scope="module")
def plain(engine, questions):
    return engine.generate(questions, max_new_tokens=N_TOKENS, seed=3)


def _key(e):
    return (e.intervention, e.layer, e.position, e.step)


def teacher_forced(model, gen, interventions):
    """Logits predicting each output token and the events of the TL forward."""
    state = StepState.from_trace(gen.trace, prefill=len(gen.prompt_ids), row_seed=gen.seed)
    ids = torch.tensor([gen.prompt_ids + gen.output_ids])
    with torch.no_grad(), apply_interventions(interventions, model, state) as runs:
        logits = model(ids)[0].float()
        events = [e for run in runs for e in run.events()]
    stop_at = len(gen.prompt_ids) + len(gen.output_ids) - 1
    n = len(gen.prompt_ids)
    return logits[n - 1: n - 1 + len(gen.output_ids)], [e for e in events if e.position < stop_at]


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_vllm_tokens_are_the_teacher_forced_argmax(engine, smollm2, questions, plain, name):
    gens = engine.generate(questions, max_new_tokens=N_TOKENS, seed=3, interventions=CONDITIONS[name]())
    assert len(gens) == N_PROMPTS
    tokens = changed = 0
    for gen, base in zip(gens, plain):
        logits, events = teacher_forced(smollm2, gen, CONDITIONS[name]())
        chosen = logits.gather(-1, torch.tensor(gen.output_ids)[:, None])[:, 0]
        gap = logits.max(-1).values - chosen
        assert (gap <= NEAR_TIE).all(), f"{name}: prompt {questions.index(gen.prompt) if gen.prompt in questions else '?'}" \
                                       f" token {int(gap.argmax())} is {float(gap.max()):.4f} below the argmax"
        assert sorted(map(_key, gen.events)) == sorted(map(_key, events)), f"{name}: event logs differ"
        tokens += len(gen.output_ids)
        changed += gen.output_ids != base.output_ids
    assert tokens >= N_PROMPTS * 16
    assert any(gen.events for gen in gens), f"{name} never fired"
    if name == "stepflow":
        assert changed >= 1, "StepFlow changed no output: the check would be vacuous"
    print(f"{name}: {tokens} tokens, all argmax; {changed}/{N_PROMPTS} outputs differ from plain")
