"""Issue 3: step-level hook points that run_with_hooks and run_with_cache accept."""

from __future__ import annotations

import pytest
import torch
from reference import pool_loop

from stepflow_tl import StepflowError
from stepflow_tl.traces.hookpoints import attach_trace, step_pattern_name, step_resid_name
from stepflow_tl.traces.trace import Trace

THINKING = "Let x be the number of apples.\n\nThen 3 + 4 = 7.\n\nSo x = 7, and 7 - 2 = 5."


@pytest.fixture(scope="module")
def trace(tokenizer):
    return Trace.from_parts(tokenizer, question="Tom has 3 apples, buys 4, gives 2 away. How many?",
                            thinking=THINKING, summary="Answer: 5")


def _all_hooks(model) -> int:
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in model.hook_dict.values())


def _token_knockout_hook(trace, key_step):
    """The token-level equivalent of zeroing step column ``key_step``, written by hand."""
    queries = (trace.token_steps >= 0).nonzero()[:, 0]
    keys = (trace.token_steps == key_step).nonzero()[:, 0]

    def hook(scores, hook):
        scores = scores.clone()
        scores[:, :, queries[:, None], keys[None, :]] = float("-inf")
        return scores

    return hook


def _knockout_matches(model, trace, layer, key_step, tol):
    ids = trace.token_ids[None]

    def knock_out(pattern, hook):
        pattern[:, :, :, key_step] = 0

    with torch.no_grad():
        with attach_trace(model, trace):
            stepwise = model.run_with_hooks(ids, fwd_hooks=[(step_pattern_name(layer), knock_out)])
        tokenwise = model.run_with_hooks(
            ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_attn_scores", _token_knockout_hook(trace, key_step))]
        )
        plain = model(ids)
    assert (stepwise - tokenwise).abs().max() < tol
    assert (stepwise - plain).abs().max() > 100 * tol, "the knockout had no effect"


@pytest.mark.parametrize("key_step", [0, 2])
def test_step_knockout_equals_token_knockout(tiny_model, trace, key_step):
    _knockout_matches(tiny_model, trace, layer=1, key_step=key_step, tol=1e-5)


@pytest.mark.smollm2
def test_step_knockout_equals_token_knockout_on_smollm2(smollm2, trace):
    _knockout_matches(smollm2, trace, layer=5, key_step=0, tol=1e-5)


@pytest.mark.smollm2
def test_step_knockout_equals_token_knockout_on_smollm2_hooked(smollm2_hooked, trace):
    _knockout_matches(smollm2_hooked, trace, layer=5, key_step=0, tol=1e-5)


def test_run_with_cache_sees_step_hook_points(tiny_model, trace):
    with attach_trace(tiny_model, trace):
        _, cache = tiny_model.run_with_cache(trace.token_ids[None])
    n, d_model = trace.n_steps, tiny_model.cfg.d_model
    step_pattern = cache[step_pattern_name(2)]
    assert step_pattern.shape == (1, tiny_model.cfg.n_heads, n, n)
    expected = pool_loop(cache["blocks.2.attn.hook_pattern"][0], trace.token_steps, n, "mass")
    assert torch.allclose(step_pattern[0].double(), expected, atol=1e-6)
    step_resid = cache[step_resid_name(0)]
    assert step_resid.shape == (1, n, d_model)
    for s in range(n):
        tokens = (trace.token_steps == s).nonzero()[:, 0]
        assert torch.allclose(step_resid[0, s], cache["blocks.0.hook_resid_post"][0, tokens].mean(0), atol=1e-5)


def test_step_resid_edit_shifts_every_token_of_the_step(tiny_model, trace):
    delta = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    target = trace.thinking_steps[1]
    seen = []

    def shift(resid, hook):
        resid[:, target] += delta

    def grab(resid, hook):  # added after the plugin's hook, so it sees the edited stream
        seen.append(resid.detach().clone())

    ids = trace.token_ids[None]
    with torch.no_grad(), attach_trace(tiny_model, trace):
        tiny_model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", grab)])
        tiny_model.run_with_hooks(ids, fwd_hooks=[(step_resid_name(0), shift), ("blocks.0.hook_resid_post", grab)])
    diff = (seen[1] - seen[0])[0]
    changed = trace.token_steps == target
    assert torch.allclose(diff[changed], delta.expand(int(changed.sum()), -1), atol=1e-5)
    assert diff[~changed].abs().max() == 0


def test_no_trace_attached_changes_nothing(tiny_model, trace):
    ids = trace.token_ids[None]
    with torch.no_grad():
        before = tiny_model(ids)
        hooks_before = _all_hooks(tiny_model)
        with attach_trace(tiny_model, trace):
            inside = tiny_model(ids)
            assert step_pattern_name(0) in tiny_model.hook_dict
        after = tiny_model(ids)
    assert torch.equal(before, inside) and torch.equal(before, after)
    assert step_pattern_name(0) not in tiny_model.hook_dict
    assert _all_hooks(tiny_model) == hooks_before == 0


def test_hooks_removed_when_a_hook_raises(tiny_model, trace):
    def boom(pattern, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        with attach_trace(tiny_model, trace):
            tiny_model.run_with_hooks(trace.token_ids[None], fwd_hooks=[(step_pattern_name(0), boom)])
    assert _all_hooks(tiny_model) == 0
    assert step_pattern_name(0) not in tiny_model.hook_dict


def test_wrong_length_input_is_a_clear_error(tiny_model, trace):
    with attach_trace(tiny_model, trace), pytest.raises(StepflowError, match="attached trace has"):
        tiny_model.run_with_hooks(trace.token_ids[None, :-3], fwd_hooks=[(step_pattern_name(0), lambda p, hook: None)])


def test_mass_on_a_future_step_is_refused(tiny_model, trace):
    def impossible(pattern, hook):
        pattern[:, :, 0, -1] = 0.5  # the question cannot attend to the summary

    with attach_trace(tiny_model, trace), pytest.raises(StepflowError, match="has none"):
        tiny_model.run_with_hooks(trace.token_ids[None], fwd_hooks=[(step_pattern_name(0), impossible)])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.25])
def test_a_non_finite_or_negative_edit_is_named_as_such(tiny_model, trace, value):
    def broken(pattern, hook):
        pattern[:, :, -1, :] = value  # every block of the last step, the empty ones included

    with attach_trace(tiny_model, trace), pytest.raises(
            StepflowError, match=r"edited step pattern has \d+ NaN, infinite or negative entries") as caught:
        tiny_model.run_with_hooks(trace.token_ids[None], fwd_hooks=[(step_pattern_name(0), broken)])
    assert "has none" not in str(caught.value)
    assert _all_hooks(tiny_model) == 0
