"""Step maps under interventions: exact with none or at zero strength, different with
StepFlow, and the edited teacher-forced forward equals KV-cached generation."""

from __future__ import annotations

import pytest
import torch
from conftest import sum_trace

from stepflow_tl.interventions import (
    MatchedLogitNoise,
    OddsEqualBridge,
    RandomBridge,
    RandomMomentum,
    StepFlow,
    StepMomentum,
    StepState,
    generate,
)
from stepflow_tl.interventions.state import RowTracker
from stepflow_tl.saliency import step_attention, step_saliency
from stepflow_tl.tl.adapter import ModelAdapter
from stepflow_tl.traces.trace import Step, Trace, tokenizer_fingerprint


def every_12_chars(text):
    """A split that gives a random model's output many thinking steps."""
    return [(i, min(i + 12, len(text))) for i in range(0, len(text), 12)]


@pytest.fixture(scope="module")
def trace(tokenizer):
    return sum_trace(tokenizer)


def strong_flow():
    return StepFlow(oeb=OddsEqualBridge(layers="all", tau_max=0.5), smi=StepMomentum(layers="all", alpha=2.0))


def zero_flow():
    return StepFlow(oeb=OddsEqualBridge(layers="all", tau_max=0.0), smi=StepMomentum(layers="all", alpha=0.0))


@pytest.mark.parametrize("mode", ["dense", "bounded"])
def test_no_interventions_or_zero_strength_give_the_plain_maps_bit_for_bit(tiny_model, trace, mode):
    plain = step_saliency(tiny_model, trace, mode=mode)
    for ivs in ([], [zero_flow()], [RandomMomentum(layers="all", alpha=0.0)]):
        edited = step_saliency(tiny_model, trace, mode=mode, interventions=ivs)
        assert torch.equal(edited.maps, plain.maps)
        assert edited.meta["loss_value"] == plain.meta["loss_value"]
    attention = step_attention(tiny_model, trace)
    assert torch.equal(step_attention(tiny_model, trace, interventions=[zero_flow()]).maps, attention.maps)
    assert "interventions" not in plain.meta
    assert step_saliency(tiny_model, trace, interventions=[zero_flow()]).meta["interventions"]


def test_stepflow_changes_the_maps(tiny_model, trace):
    plain = step_saliency(tiny_model, trace)
    edited = step_saliency(tiny_model, trace, interventions=[strong_flow()])
    assert (edited.maps - plain.maps).abs().max() > 1e-4 * plain.maps.abs().max()
    attention = step_attention(tiny_model, trace)
    assert (step_attention(tiny_model, trace, interventions=[strong_flow()]).maps - attention.maps).abs().max() > 1e-4
    # dense and bounded agree under interventions too
    bounded = step_saliency(tiny_model, trace, interventions=[strong_flow()], mode="bounded")
    torch.testing.assert_close(bounded.maps, edited.maps, rtol=1e-5, atol=1e-12)


def _generation_logits(monkeypatch):
    """Record the logits of every prefill/decode call of `generate`."""
    seen = []
    prefill, decode = ModelAdapter.prefill, ModelAdapter.decode

    def rec_prefill(self, *a, **k):
        logits, state = prefill(self, *a, **k)
        seen.append(logits[:, -1].detach().clone())
        return logits, state

    def rec_decode(self, *a, **k):
        logits, state = decode(self, *a, **k)
        seen.append(logits[:, -1].detach().clone())
        return logits, state

    monkeypatch.setattr(ModelAdapter, "prefill", rec_prefill)
    monkeypatch.setattr(ModelAdapter, "decode", rec_decode)
    return seen


def exact_trace(model, gen, split):
    """The trace of exactly the tokens generation ran (``Generation.trace`` re-tokenises
    the text, which a random model's output does not survive), labelled by the same
    online tracker that gave generation its step structure."""
    tracker = RowTracker(model.tokenizer, gen.format, split, gen.prompt, "What is 3 + 4?")
    ran = gen.output_ids[:-1]  # the last token was sampled, never run
    for t in ran:
        tracker.push(t)
    steps_of = tracker.tracker.token_steps
    kinds = tracker.kinds
    steps = []
    for i, kind in enumerate(kinds):
        pos = [p for p, s in enumerate(steps_of) if s == i]
        steps.append(Step(i, kind, f"{kind} {i}", (0, 0), (pos[0], pos[-1] + 1)))
    return Trace(text=gen.prompt + gen.text, token_ids=torch.tensor(gen.prompt_ids + ran),
                 token_steps=torch.tensor(steps_of), steps=steps, format=gen.format, complete=False,
                 tokenizer_fingerprint=tokenizer_fingerprint(model))


def _teacher_forced_logits(model, gen, make, mode):
    captured = {}

    def loss(logits, trace):
        captured["logits"] = logits.detach().clone()
        return logits.float().logsumexp(-1).mean()

    trace = exact_trace(model, gen, every_12_chars)
    state = StepState.from_trace(trace, prefill=len(gen.prompt_ids), row_seed=gen.seed)
    step_saliency(model, trace, loss=loss, interventions=make(), state=state, mode=mode)
    return captured["logits"][0]


CONDITIONS = {
    "stepflow": strong_flow,
    "random_bridge+random_momentum": lambda: [RandomBridge(layers="all", tau_max=0.5, seed=3),
                                              RandomMomentum(layers="all", alpha=2.0, seed=4)],
    "matched_noise": lambda: [MatchedLogitNoise(layers="all", tau_max=0.5, seed=5)],
}


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_intervened_forward_equals_the_generation_that_made_the_trace(tiny_model, monkeypatch, name):
    make = CONDITIONS[name]
    seen = _generation_logits(monkeypatch)
    (gen,) = generate(tiny_model, ["What is 3 + 4?"], max_new_tokens=24, interventions=make() if name != "stepflow"
                      else [make()], split=every_12_chars, format="plain", seed=7, do_sample=True)
    monkeypatch.undo()
    kinds = {e.intervention for e in gen.events}
    assert kinds, "the interventions never fired during generation"
    if name != "matched_noise":
        assert any(e.injected_norm == e.injected_norm for e in gen.events), "no step start was decoded"
    steps = torch.stack(seen, 1)[0]  # logits predicting output token 0, 1, ...
    n_prompt = len(gen.prompt_ids)
    forced = _teacher_forced_logits(tiny_model, gen, (lambda: [make()]) if name == "stepflow" else make, "dense")
    got = forced[n_prompt - 1: n_prompt - 1 + steps.shape[0]]
    torch.testing.assert_close(got, steps, atol=2e-4, rtol=1e-4)
    plain = tiny_model(torch.tensor([gen.prompt_ids + gen.output_ids[:-1]])).detach()[0, n_prompt - 1: n_prompt - 1 + steps.shape[0]]
    assert (plain - steps).abs().max() > 1e-3, "the interventions changed nothing"


def test_tiled_mode_refuses_interventions_and_auto_falls_back(tiny_bridge, trace, monkeypatch):
    """Tiled layers fire no attention-score hooks, so OEB's edits would be skipped."""
    from stepflow_tl.errors import StepflowError
    from stepflow_tl.saliency import compute

    with pytest.raises(StepflowError, match="cannot apply interventions"):
        step_saliency(tiny_bridge, trace, mode="tiled", interventions=[strong_flow()])
    assert step_saliency(tiny_bridge, trace, mode="auto").meta["mode"] == "tiled"
    intervened = step_saliency(tiny_bridge, trace, mode="auto", interventions=[strong_flow()])
    assert intervened.meta["mode"] == "dense"  # the short trace's dense memory fits
    monkeypatch.setattr(compute, "available_memory", lambda device: None)
    intervened = step_saliency(tiny_bridge, trace, mode="auto", interventions=[strong_flow()])
    assert intervened.meta["mode"] == "bounded"
