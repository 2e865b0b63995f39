"""KV-cached generation: left padding, seeds, stops, zero-strength identity, StepFlow on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from stepflow_tl.errors import StepflowError
from stepflow_tl.interventions.bridge import MatchedLogitNoise, OddsEqualBridge, RandomBridge
from stepflow_tl.interventions.generate import generate, row_seed
from stepflow_tl.interventions.momentum import RandomMomentum, StepMomentum
from stepflow_tl.interventions.stepflow import StepFlow

PROMPTS = [
    "What is 2+3?",
    "Compute the sum of the first ten prime numbers and explain each step.",
    "Name a colour.",
]


def assert_no_hooks(model):
    for name, hp in model.hook_dict.items():
        assert not hp.fwd_hooks and not hp.bwd_hooks, f"hook left on {name}"


def reference_greedy(model, text, n):
    """Greedy tokens of one prompt by full (uncached) forwards: the ground truth."""
    tok = model.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == tok.eos_token_id:
                break
    return out


def test_greedy_equals_uncached_reference(tiny_model):
    res = generate(tiny_model, PROMPTS[1], max_new_tokens=8)[0]
    assert res.output_ids == reference_greedy(tiny_model, res.prompt, 8)
    assert res.stop_reason == "length" and len(res.output_ids) == 8
    assert res.prefill_s > 0 and res.decode_s > 0 and res.tokens_per_s > 0


@pytest.mark.parametrize("interventions", [(), (StepFlow(),)], ids=["plain", "stepflow"])
def test_a_cache_that_stops_growing_is_an_error(tiny_model, monkeypatch, interventions):
    """The transformers 5.24 failure: the model runs each decode step without the KV
    cache, so attention sees only the new token. That must raise, not return garbage."""
    forward = tiny_model.forward

    def forgetful(tokens, *args, **kwargs):
        if tokens.shape[1] == 1:
            for name in ("cache", "past_key_values", "past_kv_cache", "use_cache"):
                kwargs.pop(name, None)
            kwargs["attention_mask"] = kwargs["attention_mask"][:, -1:]
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", forgetful)
    # With interventions the StepState check inside the hooks may fire first.
    with pytest.raises(StepflowError, match="KV cache holds|model sees"):
        generate(tiny_model, PROMPTS[0], max_new_tokens=4, interventions=interventions)
    assert_no_hooks(tiny_model)


@pytest.mark.parametrize("interventions", [(), (StepFlow(oeb=OddsEqualBridge(layers="all"),
                                                          smi=StepMomentum(layers="all", alpha=0.5)),)],
                         ids=["plain", "stepflow"])
def test_left_padded_batch_equals_single_runs(tiny_model, interventions):
    batch = generate(tiny_model, PROMPTS, max_new_tokens=10, interventions=interventions)
    lengths = [len(tiny_model.tokenizer(b.prompt, add_special_tokens=False)["input_ids"]) for b in batch]
    assert len(set(lengths)) == 3  # the prompts really are padded differently
    for i, p in enumerate(PROMPTS):
        single = generate(tiny_model, p, max_new_tokens=10, interventions=interventions)[0]
        assert batch[i].output_ids == single.output_ids
        assert batch[i].text == single.text
        strip = lambda evs: [(e.intervention, e.layer, e.position, e.n_heads) for e in evs]
        assert strip(batch[i].events) == strip(single.events)
        for e1, e2 in zip(batch[i].events, single.events):
            assert e1.kl == pytest.approx(e2.kl, rel=1e-3, abs=1e-6, nan_ok=True)
    if interventions:
        assert any(b.events for b in batch)
        assert all(e.row == i for i, b in enumerate(batch) for e in b.events)
    assert_no_hooks(tiny_model)


def test_zero_strength_is_identical_to_plain(tiny_model):
    plain = generate(tiny_model, PROMPTS, max_new_tokens=12)
    zero = generate(tiny_model, PROMPTS, max_new_tokens=12,
                    interventions=[StepFlow(oeb=OddsEqualBridge(tau_max=0.0, layers="all"),
                                            smi=StepMomentum(alpha=0.0, layers="all"))])
    for p, z in zip(plain, zero):
        assert p.output_ids == z.output_ids
        assert [e for e in z.events if e.intervention == "oeb"] == []


def test_sampling_replays_and_rows_are_independent(tiny_model):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    same = [PROMPTS[0], PROMPTS[0]]
    first = generate(tiny_model, same, **kw)
    again = generate(tiny_model, same, **kw)
    assert [r.output_ids for r in first] == [r.output_ids for r in again]
    assert first[0].output_ids != first[1].output_ids  # same prompt, different row seeds
    assert first[0].seed == row_seed(7, 0) and first[1].seed == row_seed(7, 1)
    # a row's draws do not depend on the other rows of the batch
    alone = generate(tiny_model, [PROMPTS[0]], **kw)[0]
    assert alone.output_ids == first[0].output_ids
    other_seed = generate(tiny_model, [PROMPTS[0]], **{**kw, "seed": 8})[0]
    assert other_seed.output_ids != alone.output_ids


def test_stop_strings_and_trace(tiny_model):
    free = generate(tiny_model, PROMPTS[1], max_new_tokens=12)[0]
    # stop at a piece of the text the model produces anyway
    piece = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    assert piece.strip()
    stopped = generate(tiny_model, PROMPTS[1], max_new_tokens=12, stop=[piece])[0]
    assert stopped.stop_reason == "stop"
    assert stopped.text == free.text[: free.text.find(piece)]
    assert len(stopped.output_ids) < 12
    trace = free.trace
    assert trace.text == free.prompt + free.text
    assert free.prompt_ids == tiny_model.tokenizer(free.prompt, add_special_tokens=False)["input_ids"]
    assert trace.step_kinds[0] == "question"
    d = free.to_dict()
    assert d["output_ids"] == free.output_ids and d["trace"]["text"] == trace.text


def test_generated_trace_is_the_generated_ids(tiny_model):
    """A sampled random-model generation that re-tokenises differently: the trace keeps
    the ids the model ran, and the online labels equal the trace's."""
    from stepflow_tl.traces.formats import decode
    from stepflow_tl.traces.tracker import StepTracker, prompt_positions

    tok = tiny_model.tokenizer
    g = generate(tiny_model, PROMPTS[0], max_new_tokens=40, do_sample=True, temperature=1.5, seed=0)[0]
    ids = g.prompt_ids + g.output_ids
    assert tok(g.trace.text, add_special_tokens=False)["input_ids"] != ids  # re-tokenising differs
    assert g.trace.token_ids.tolist() == ids
    assert g.trace.text == g.prompt + decode(tok, g.output_ids)
    tracker = StepTracker(tok, format=g.trace.format, prompt_ids=g.prompt_ids,
                          question_positions=prompt_positions(tok, g.prompt, PROMPTS[0])[1])
    tracker.extend(g.output_ids)
    assert tracker.token_steps == g.trace.token_steps.tolist()


def test_chat_conversations_equal_question_strings(tiny_model):
    system = "Answer briefly."
    conv = [{"role": "system", "content": system}, {"role": "user", "content": PROMPTS[0]}]
    as_string = generate(tiny_model, [PROMPTS[0], PROMPTS[2]], max_new_tokens=6, system=system)
    as_chat = generate(tiny_model, [conv, [conv[0], {"role": "user", "content": PROMPTS[2]}]], max_new_tokens=6)
    with_system = generate(tiny_model, [[conv[1]], [{"role": "user", "content": PROMPTS[2]}]],
                           max_new_tokens=6, system=system)
    single = generate(tiny_model, conv, max_new_tokens=6)  # one conversation, not a batch of messages
    for s, c, w in zip(as_string, as_chat, with_system):
        assert s.prompt == c.prompt == w.prompt and s.output_ids == c.output_ids == w.output_ids
        assert s.trace.to_dict() == c.trace.to_dict()
    assert len(single) == 1 and single[0].output_ids == as_string[0].output_ids
    with pytest.raises(StepflowError, match="prompts must be a str or a chat conversation"):
        generate(tiny_model, 3, max_new_tokens=2)
    with pytest.raises(StepflowError, match=r"prompts\[1\] must be a str or a chat conversation"):
        generate(tiny_model, ["x", None], max_new_tokens=2)
    with pytest.raises(StepflowError, match=r"question\[0\] must be a message"):
        generate(tiny_model, [[{"role": "user", "content": 3}]], max_new_tokens=2)
    with pytest.raises(StepflowError, match="with chat=False a prompt must be the rendered prompt text"):
        generate(tiny_model, [conv], chat=False, max_new_tokens=2)
    with pytest.raises(StepflowError, match="stop must be a list of non-empty strings"):
        generate(tiny_model, "x", stop=[3], max_new_tokens=2)


def test_split_auto_follows_the_format(tiny_model):
    plain = generate(tiny_model, PROMPTS[0], max_new_tokens=4, format="plain")[0]
    r1 = generate(tiny_model, PROMPTS[0], max_new_tokens=4, format="r1")[0]
    assert (plain.split, r1.split) == ("lines", "blank_lines")
    assert plain.to_dict()["split"] == "lines"
    assert generate(tiny_model, PROMPTS[0], max_new_tokens=4, split="sentences")[0].split == "sentences"


def test_pre_rendered_prompt(tiny_model):
    text = "Question:\nWhat is 5 times 6?\n\nThinking:\n"
    r = generate(tiny_model, text, chat=False, max_new_tokens=5, format="plain")[0]
    assert r.prompt == text and len(r.output_ids) == 5


def test_bad_arguments(tiny_model):
    with pytest.raises(StepflowError):
        generate(tiny_model, [], max_new_tokens=3)
    with pytest.raises(StepflowError):
        generate(tiny_model, "x", max_new_tokens=0)
    with pytest.raises(StepflowError):
        generate(tiny_model, "x", max_new_tokens=3, format="xml")
    with pytest.raises(StepflowError, match=r"layers \[50\] are outside the model"):
        generate(tiny_model, "x", max_new_tokens=3, interventions=[OddsEqualBridge(layers=[50])])
    for kw, message in ((dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
                        (dict(seed=1.5), "seed must be an integer"),
                        (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number"),
                        (dict(do_sample=True, top_p=1.5), r"top_p must be a finite number in \(0.0, 1.0\]")):
        with pytest.raises(StepflowError, match=message):
            generate(tiny_model, "x", **{"max_new_tokens": 3, **kw})
    assert_no_hooks(tiny_model)


def test_interrupt_inside_a_hook_during_generation(tiny_model):
    calls = {"n": 0}

    class Interrupt(OddsEqualBridge):  # OEB edits every decoded token, so this raises mid-decode
        def edit(self, run, layer, *args):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return super().edit(run, layer, *args)

    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = tiny_model(tokens)
    with pytest.raises(KeyboardInterrupt):
        generate(tiny_model, PROMPTS[0], max_new_tokens=10, interventions=[StepMomentum(), Interrupt()])
    assert_no_hooks(tiny_model)
    with torch.no_grad():
        assert torch.equal(tiny_model(tokens), before)


def test_controls_run_in_generation(tiny_model):
    controls = [RandomBridge(layers="all", seed=1), MatchedLogitNoise(layers="all", seed=1),
                RandomMomentum(layers="all", seed=1)]
    out = generate(tiny_model, PROMPTS[:2], max_new_tokens=8, interventions=controls)
    names = {e.intervention for r in out for e in r.events}
    assert {"random_bridge", "matched_noise"} <= names
    again = generate(tiny_model, PROMPTS[:2], max_new_tokens=8, interventions=controls)
    assert [r.output_ids for r in out] == [r.output_ids for r in again]
    assert_no_hooks(tiny_model)


# ----------------------------------------------------------------------------- SmolLM2
SMOL_Q = ("A shop sells pens at 3 dollars each. Tom buys 4 pens and pays with a 20 dollar bill. "
          "How much change does he get? Think step by step, then write 'Answer:' and the number.")


@pytest.fixture(scope="module")
def smol_plain(smollm2):
    return generate(smollm2, SMOL_Q, max_new_tokens=32, split="sentences")[0]


def test_smollm2_zero_strength_identical(smollm2, smol_plain):
    zero = generate(smollm2, SMOL_Q, max_new_tokens=32, split="sentences",
                    interventions=[StepFlow(oeb=OddsEqualBridge(tau_max=0.0), smi=StepMomentum(alpha=0.0))])[0]
    assert zero.output_ids == smol_plain.output_ids
    assert zero.format == "plain"


def test_smollm2_stepflow_changes_output_and_logs_it(smollm2, smol_plain):
    sf = generate(smollm2, SMOL_Q, max_new_tokens=32, split="sentences", interventions=[StepFlow()])[0]
    assert sf.output_ids != smol_plain.output_ids
    df = sf.to_dataframe()
    oeb = df[df.intervention == "oeb"]
    smi = df[df.intervention == "smi"]
    assert set(oeb.layer) <= set(range(8)) and len(oeb) > 0
    assert (oeb.kl > 0).all() and (oeb.lambda_b > 0).all()
    assert set(smi.layer) <= set(range(22, 30)) and len(smi) > 0
    assert (smi.injected_norm > 0).all()
    # SMI fires at the first token of thinking steps, at every SMI layer
    starts = {sf.trace.steps[i].token_span[0] for i in sf.trace.thinking_steps[1:]}
    assert set(smi.position) <= starts
    assert (smi.groupby("position").layer.nunique() == 8).all()
    first = int(torch.tensor([a != b for a, b in zip(sf.output_ids, smol_plain.output_ids)]).int().argmax())
    assert first < len(sf.output_ids)


# ---------------------------------------------------------------------- batches that shrink and refill
MANY = PROMPTS + ["Why is the sky blue? Explain.", "Count to five."]


def _summary(gens):
    return [(g.output_ids, g.stop_reason, g.seed, [(e.intervention, e.layer, e.position, e.step, e.n_heads)
                                                   for e in g.events]) for g in gens]


@pytest.mark.parametrize("interventions", [(), (StepFlow(oeb=OddsEqualBridge(layers="all"),
                                                          smi=StepMomentum(layers="all", alpha=0.5)),)],
                         ids=["plain", "stepflow"])
def test_rows_that_leave_and_join_give_the_static_batch_results(tiny_model, interventions):
    """Finished rows leave, waiting prompts join: every row's tokens and events are those
    of today's static batch, for any batch size (rows end at different lengths here)."""
    kw = dict(max_new_tokens=12, stop=["a"], do_sample=True, temperature=1.5, seed=3, interventions=interventions)
    static = generate(tiny_model, MANY, static_batch=True, **kw)
    assert len({len(g.output_ids) for g in static}) >= 3
    for batch_size in (None, 1, 2, 3):
        moving = generate(tiny_model, MANY, batch_size=batch_size, **kw)
        assert _summary(moving) == _summary(static), batch_size
        assert [g.text for g in moving] == [g.text for g in static]
    if interventions:
        assert any(g.events for g in static)
    assert_no_hooks(tiny_model)


def test_finished_rows_are_not_computed(tiny_model, monkeypatch):
    """Decoding row-steps: a shrinking batch runs each row exactly until its last token;
    a static batch runs every row until the batch's longest one ends."""
    from stepflow_tl.tl.adapter import ModelAdapter

    rows = []
    decode = ModelAdapter.decode
    monkeypatch.setattr(ModelAdapter, "decode", lambda self, state, nxt: rows.append(nxt.shape[0]) or decode(self, state, nxt))
    kw = dict(max_new_tokens=12, stop=["a"], do_sample=True, temperature=1.5, seed=3)
    moving = generate(tiny_model, MANY, batch_size=2, **kw)
    moving_rows, rows[:] = sum(rows), []
    static = generate(tiny_model, MANY, batch_size=2, static_batch=True, **kw)
    lengths = [len(g.output_ids) for g in moving]
    assert moving_rows == sum(n - 1 for n in lengths)
    chunks = [lengths[i:i + 2] for i in range(0, len(lengths), 2)]
    assert sum(rows) == sum(len(c) * (max(c) - 1) for c in chunks) > moving_rows
    assert [g.output_ids for g in static] == [g.output_ids for g in moving]


def test_batch_size_is_checked(tiny_model):
    with pytest.raises(StepflowError, match="batch_size"):
        generate(tiny_model, PROMPTS, batch_size=0)


def test_rows_with_one_prompt_share_its_prefill(tiny_model, monkeypatch):
    """Without interventions, rows with the same prompt prefill it once (kept while more
    waiting rows need it, as resampling's N continuations of a prefix): every row's tokens
    are those it gets alone with its seed, for any batch size; with an intervention each
    row runs its own prefill."""
    from stepflow_tl.tl.adapter import ModelAdapter

    prefilled = []
    prefill = ModelAdapter.prefill
    monkeypatch.setattr(ModelAdapter, "prefill",
                        lambda self, tokens, mask, **kw: prefilled.append(tokens.shape[0]) or prefill(self, tokens, mask, **kw))
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[0]]
    seeds = [row_seed(3, i) for i in range(len(prompts))]
    kw = dict(max_new_tokens=10, stop=["a"], do_sample=True, temperature=1.5)
    alone = [generate(tiny_model, [p], row_seeds=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert len({len(g.output_ids) for g in alone}) >= 2
    for batch_size in (None, 1, 2, 4):
        prefilled[:] = []
        shared = generate(tiny_model, prompts, row_seeds=seeds, batch_size=batch_size, **kw)
        assert _summary(shared) == _summary(alone), batch_size
        assert sum(prefilled) == 2, batch_size
    prefilled[:] = []
    generate(tiny_model, prompts, row_seeds=seeds, batch_size=2, interventions=[StepFlow()], **kw)
    assert sum(prefilled) == len(prompts)
