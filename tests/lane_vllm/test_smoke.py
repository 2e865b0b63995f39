"""Plain vLLM on the embedded SmolLM2: every greedy token is the argmax of our TL forward."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is installed only in the vLLM lane (make test-vllm)")

PROMPTS = ["What is 12 * 3 - 5?", "Name three primes.", "Why is the sky blue?", "Add 17 and 25."]


def test_plain_vllm_greedy_is_the_tl_argmax(engine, smollm2):
    gens = engine.generate(PROMPTS, max_new_tokens=24)
    checked = 0
    for gen in gens:
        assert gen.output_ids and not gen.events
        ids = torch.tensor([gen.prompt_ids + gen.output_ids])
        with torch.no_grad():
            logits = smollm2(ids)[0, len(gen.prompt_ids) - 1: -1].float()
        top = logits.max(-1).values
        chosen = logits.gather(-1, torch.tensor(gen.output_ids)[:, None])[:, 0]
        assert (top - chosen <= 2e-3).all(), (gen.prompt, (top - chosen).max())
        checked += len(gen.output_ids)
    assert checked >= 4 * 5
