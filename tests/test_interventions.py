"""StepFlow interventions: OEB exactness, SMI exactness, controls at matched strength,
hook hygiene, layer specs, and use outside `generate`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stepflow_tl.errors import StepflowError
from stepflow_tl.interventions.base import InterventionRun, apply_interventions, resolve_layers
from stepflow_tl.interventions.bridge import (
    MatchedLogitNoise,
    OddsEqualBridge,
    RandomBridge,
    group_masses,
    odds_equal_edit,
)
from stepflow_tl.interventions.momentum import RandomMomentum, StepMomentum
from stepflow_tl.interventions.state import RowSteps, StepState, extend_row
from stepflow_tl.interventions.stepflow import StepFlow
from stepflow_tl.tl.adapter import adapter, attn_hook, block_hook
from stepflow_tl.traces.trace import Trace

# ----------------------------------------------------------------------------- helpers
Q, T, S = "question", "thinking", "summary"


def make_state(token_steps, step_kinds, *, prefill=0, row_seed=0):
    """A one-row StepState built by hand from per-token step indices and step kinds."""
    row = extend_row(RowSteps(), list(token_steps), step_kinds)
    return StepState.from_rows([row], row_seeds=[row_seed], prefill_lengths=[prefill])


# A 20-token layout: markup, question (step 0), markup, three thinking steps (1-3),
# markup, summary (step 4).
LAYOUT = [-1, 0, 0, 0, -1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, -1, 4, 4, 4, 4]
KINDS = [Q, T, T, T, S]
TOKENS = torch.tensor([[1, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                        19712, 8182, 2, 198, 4093]])


def capture(names):
    """Hooks that keep a copy of each activation, keyed by the name asked for."""
    store = {}

    def make(name):
        def hook(x, hook):
            store.setdefault(name, []).append(x.detach().clone())

        return hook

    return store, [(n, make(n)) for n in names]


def assert_no_hooks(model):
    for name, hp in model.hook_dict.items():
        assert not hp.fwd_hooks and not hp.bwd_hooks, f"hook left on {name}"


# ----------------------------------------------------------------------------- OEB core
def random_case(gen, n_keys=10, scale=3.0):
    scores = torch.randn(64, n_keys, generator=gen) * scale
    groups = torch.randint(0, 3, (64, n_keys), generator=gen)  # 0 O, 1 B, 2 S
    return scores, groups == 2, groups == 1


@pytest.mark.parametrize("with_sink", [False, True])
def test_oeb_hits_targets_and_leaves_o_untouched(with_sink):
    gen = torch.Generator().manual_seed(0)
    scores, s_mask, b_mask = random_case(gen)
    sink = torch.zeros_like(s_mask)
    if with_sink:
        sink[:, 0] = True
        s_mask, b_mask = s_mask & ~sink, b_mask & ~sink
        scores[:, 0] += 4.0  # a heavy sink, as in real models
    res = odds_equal_edit(scores, s_mask, b_mask, sink, tau_max=0.15)
    assert res.fired.sum() > 10
    _, z0, ps0, pb0, po0 = group_masses(scores, s_mask, b_mask, sink)
    p1, z1, ps1, pb1, po1 = group_masses(res.scores, s_mask, b_mask, sink)
    f = res.fired
    torch.testing.assert_close(pb1[f], res.tau_b[f], atol=1e-5, rtol=0)
    torch.testing.assert_close(ps1[f], res.tau_s[f], atol=1e-5, rtol=0)
    torch.testing.assert_close(po1, po0, atol=1e-5, rtol=0)
    # the non-sink total and the sinks' own probability are preserved
    torch.testing.assert_close(z1, z0, atol=1e-6, rtol=0)
    if with_sink:
        p0 = torch.softmax(scores, -1)
        torch.testing.assert_close(p1[:, 0], p0[:, 0], atol=1e-6, rtol=0)
    o_or_sink = ~(s_mask | b_mask)
    assert torch.equal(res.scores[o_or_sink], scores[o_or_sink])
    assert torch.equal(res.scores[~f], scores[~f])
    # where it did not fire, B already had at least tau_B
    assert (pb0[~f] >= res.tau_b[~f] - 1e-6).all()
    # its KL formula equals the KL of the distributions
    kl = (p1 * (torch.log_softmax(res.scores, -1) - torch.log_softmax(scores, -1))).sum(-1)
    torch.testing.assert_close(res.kl, kl, atol=1e-5, rtol=1e-4)


def test_oeb_fires_exactly_when_bridge_is_below_target():
    gen = torch.Generator().manual_seed(1)
    scores, s_mask, b_mask = random_case(gen)
    sink = torch.zeros_like(s_mask)
    res = odds_equal_edit(scores, s_mask, b_mask, sink, tau_max=0.15)
    _, _, ps, pb, po = group_masses(scores, s_mask, b_mask, sink)
    nb, ns = b_mask.sum(-1).float(), s_mask.sum(-1).float()
    tau_b = torch.minimum(torch.sqrt(nb / (nb + ns)).clamp_max(0.15), 1 - po - 1e-6)
    expected = (nb > 0) & (ns > 0) & (pb > 0) & (pb < tau_b)
    assert torch.equal(res.fired, expected)
    assert 0 < expected.sum() < len(expected)


def test_oeb_no_ops():
    scores = torch.tensor([[0.5, -1.0, 2.0, 0.1, -0.3, 1.2]])
    none = torch.zeros(1, 6, dtype=torch.bool)
    s = torch.tensor([[False, False, True, True, False, False]])
    b = torch.tensor([[True, True, False, False, False, False]])
    # empty B, empty S
    for s_mask, b_mask in [(s, none), (none, b)]:
        res = odds_equal_edit(scores, s_mask, b_mask, none, 0.15)
        assert not res.fired.any() and torch.equal(res.scores, scores)
    # p(B) = 0: B keys masked out
    masked = scores.clone()
    masked[b] = float("-inf")
    res = odds_equal_edit(masked, s, b, none, 0.15)
    assert not res.fired.any() and torch.equal(res.scores, masked)
    # tau_max = 0 never fires
    res = odds_equal_edit(scores, s, b, none, 0.0)
    assert not res.fired.any() and torch.equal(res.scores, scores)


def test_oeb_keeps_masked_keys_masked():
    scores = torch.tensor([[0.5, -1.0, 2.0, float("-inf"), torch.finfo(torch.float32).min]])
    s = torch.tensor([[False, False, True, False, False]])
    b = torch.tensor([[False, True, False, False, False]])
    res = odds_equal_edit(scores, s, b, torch.zeros_like(s), 0.15)
    assert res.fired.all()
    assert res.scores[0, 3] == float("-inf") and res.scores[0, 4] == torch.finfo(torch.float32).min


def test_oeb_is_the_kl_projection():
    """The closed form equals the minimiser of KL(q || p) under the three mass constraints."""
    from scipy.optimize import minimize

    gen = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(6):
        scores = torch.randn(1, 6, generator=gen, dtype=torch.float64).float() * 2
        scores[:, :2] -= 2.0  # a weak bridge, so that OEB fires
        s = torch.tensor([[False, False, True, True, True, False]])
        b = torch.tensor([[True, True, False, False, False, False]])
        sink = torch.tensor([[False, False, False, False, False, True]])
        res = odds_equal_edit(scores, s, b, sink, 0.15)
        if not res.fired.all():
            continue
        p = torch.softmax(scores.double(), -1)[0].numpy()
        q_ours = torch.softmax(res.scores.double(), -1)[0].numpy()
        z = 1 - p[5]
        targets = {"b": z * float(res.tau_b), "s": z * float(res.tau_s)}
        cons = [
            {"type": "eq", "fun": lambda q: q[0] + q[1] - targets["b"]},
            {"type": "eq", "fun": lambda q: q[2] + q[3] + q[4] - targets["s"]},
            {"type": "eq", "fun": lambda q: q[5] - p[5]},
        ]
        kl = lambda q: float(np.sum(q * (np.log(np.maximum(q, 1e-300)) - np.log(p))))
        opt = minimize(kl, np.full(6, 1 / 6), constraints=cons, bounds=[(1e-12, 1)] * 6, method="SLSQP",
                       options={"ftol": 1e-14, "maxiter": 500})
        assert opt.success
        np.testing.assert_allclose(opt.x, q_ours, atol=2e-5)
        assert kl(q_ours) <= kl(opt.x) + 1e-9
        checked += 1
    assert checked >= 2


def test_oeb_bf16_within_rounding():
    """In bf16 the edit is done in fp32 and cast once; the masses then miss the targets
    by at most the effect of one bf16 rounding of each edited logit: a logit x moves
    by <= |x| * 2^-8, so each probability ratio moves by <= exp(2 * max|x| * 2^-8) - 1."""
    gen = torch.Generator().manual_seed(4)
    scores, s_mask, b_mask = random_case(gen)
    scores = scores.bfloat16()
    sink = torch.zeros_like(s_mask)
    res = odds_equal_edit(scores, s_mask, b_mask, sink, tau_max=0.15)
    assert res.scores.dtype == torch.bfloat16
    f = res.fired
    assert f.sum() > 10
    _, _, ps1, pb1, po1 = group_masses(res.scores, s_mask, b_mask, sink)
    bound = (torch.exp(2 * res.scores.float().abs().amax(-1) * 2.0 ** -8) - 1)[f]
    assert ((pb1[f] - res.tau_b[f]).abs() <= bound * 1.01 + 1e-6).all()
    assert ((ps1[f] - res.tau_s[f]).abs() <= bound * 1.01 + 1e-6).all()
    o = ~(s_mask | b_mask)
    assert torch.equal(res.scores[o], scores[o])


# ----------------------------------------------------------------------------- OEB on a model
def test_oeb_hook_matches_closed_form_on_model(tiny_model):
    """At the first OEB layer the model's pattern is exactly softmax(odds_equal_edit(...))
    with S/B/O built from the state, and fired heads hit the targets."""
    state = make_state(LAYOUT, KINDS)
    names = [attn_hook(0, "attn_scores"), attn_hook(0, "pattern")]
    clean, hooks = capture(names)
    with torch.no_grad():
        tiny_model.run_with_hooks(TOKENS, fwd_hooks=hooks)
        edited, hooks2 = capture([attn_hook(0, "pattern")])
        with OddsEqualBridge(layers=[0], sink_positions=(0,)).applied(tiny_model, state) as run:
            tiny_model.run_with_hooks(TOKENS, fwd_hooks=hooks2)
    scores = clean[names[0]][0][0]  # [head, q, k]
    seg = torch.tensor([0, 1, 1, 1, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 3, 3, 3, 3])
    cur = state.current_segment[0].long()
    bridge = torch.tensor([0, 0, 1, 2])[cur]
    k = torch.arange(20)
    causal = k[None, :] <= k[:, None]
    nonsink = k != 0
    s_mask = (seg[None, :] == cur[:, None]) & (cur > 0)[:, None] & causal & nonsink
    b_mask = (seg[None, :] == bridge[:, None]) & (bridge > 0)[:, None] & causal & nonsink
    sink = (k == 0)[None, :].expand(20, 20)
    res = odds_equal_edit(scores, s_mask, b_mask, sink, 0.15)
    pattern = edited[attn_hook(0, "pattern")][0][0]
    torch.testing.assert_close(pattern, torch.softmax(res.scores, -1), atol=1e-6, rtol=0)
    assert res.fired.sum() > 5
    _, _, ps, pb, _ = group_masses(torch.log(pattern.clamp_min(1e-30)), s_mask, b_mask, sink)
    torch.testing.assert_close(pb[res.fired], res.tau_b[res.fired], atol=1e-5, rtol=0)
    torch.testing.assert_close(ps[res.fired], res.tau_s[res.fired], atol=1e-5, rtol=0)
    events = run.events()
    assert {e.layer for e in events} == {0}
    assert sum(e.n_heads for e in events) == int(res.fired.sum())
    # question-segment queries have no bridge: nothing fires there
    assert all(int(cur[e.position]) in (2, 3) for e in events)


def test_oeb_decode_equals_full_forward(tiny_model):
    """KV-cached decoding with per-token state columns gives the same logits as one
    full forward with the whole state (every query edited in both)."""
    a = adapter(tiny_model)
    state = make_state(LAYOUT, KINDS)
    oeb = StepFlow(oeb=OddsEqualBridge(layers="all"), smi=StepMomentum(layers="all", alpha=0.5))
    with torch.no_grad():
        with oeb.applied(tiny_model, state):
            full = tiny_model(TOKENS)
        n0 = 8
        part = StepState(*(getattr(state, f)[:, :n0] if f not in ("pad", "row_seed") else getattr(state, f)
                           for f in ("segment_code", "step_id", "current_segment", "new_step", "prefill",
                                     "pad", "row_seed")))
        with apply_interventions([oeb], tiny_model, part) as runs:
            logits, dstate = a.prefill(TOKENS[:, :n0], torch.ones(1, n0, dtype=torch.long))
            steps = [logits[:, -1]]
            for t in range(n0, 20):
                st = StepState(*(getattr(state, f)[:, : t + 1] if f not in ("pad", "row_seed") else getattr(state, f)
                                 for f in ("segment_code", "step_id", "current_segment", "new_step", "prefill",
                                           "pad", "row_seed")))
                for r in runs:
                    r.state = st
                logits, dstate = a.decode(dstate, TOKENS[:, t:t + 1])
                steps.append(logits[:, -1])
    cached = torch.stack(steps, 1)[0]
    torch.testing.assert_close(cached, full[0, n0 - 1:], atol=2e-4, rtol=1e-4)
    clean = tiny_model(TOKENS).detach()
    assert (full - clean).abs().max() > 1e-3


def test_hooks_follow_a_replaced_state_of_the_same_length(tiny_model):
    """OEB groups and SMI weights are built once per forward and shared by the layers; a
    new state object of the same length is never served the old one's."""
    other = make_state([-1, 0, 0, -1, 1, 1, 2, 2, 2, 3, 3, 3, -1, 4, 4, 4, 4, 4, 4, 4], KINDS)
    flow = StepFlow(oeb=OddsEqualBridge(layers="all"), smi=StepMomentum(layers="all", alpha=0.5))
    with torch.no_grad():
        with flow.applied(tiny_model, other):
            expected = tiny_model(TOKENS)
        with apply_interventions([flow], tiny_model, make_state(LAYOUT, KINDS)) as runs:
            first = tiny_model(TOKENS)
            for run in runs:
                run.state = other
            second = tiny_model(TOKENS)
    torch.testing.assert_close(second, expected, atol=0, rtol=0)
    assert (first - second).abs().max() > 1e-4


# ----------------------------------------------------------------------------- SMI
def _expected_momentum(v, layout, kinds, pos, beta=0.0, window=None):
    """m [kv, d] at a new-step position from value vectors v [pos, kv, d], by hand."""
    s = layout[pos]
    thinking = [i for i, k in enumerate(kinds) if k == T]
    first = thinking[0]
    m = None
    for j in range(first, s):
        toks = [t for t in range(pos) if layout[t] == j]
        if window is not None:
            toks = toks[-window:]
        mean = v[toks].mean(0)
        m = mean if m is None else (1 - beta) * mean + beta * m
    return m


@pytest.mark.parametrize("beta,window", [(0.0, None), (0.5, None), (0.0, 2)])
def test_smi_adds_exactly_alpha_wo_m_at_step_starts(tiny_model, beta, window):
    a = adapter(tiny_model)
    top = a.n_layers - 1
    state = make_state(LAYOUT, KINDS)
    alpha = 0.7
    names = [attn_hook(top, "v"), block_hook(top, "attn_out")]
    clean, hooks = capture(names)
    with torch.no_grad():
        tiny_model.run_with_hooks(TOKENS, fwd_hooks=hooks)
        smi_out, hooks2 = capture([block_hook(top, "attn_out")])
        with StepMomentum(layers=[top], alpha=alpha, beta=beta, window=window).applied(tiny_model, state) as run:
            tiny_model.run_with_hooks(TOKENS, fwd_hooks=hooks2)
    v = clean[names[0]][0][0]  # [pos, kv, d]
    delta = (smi_out[block_hook(top, "attn_out")][0] - clean[names[1]][0])[0]  # [pos, d_model]
    starts = [8, 12]  # first tokens of thinking steps 2 and 3
    assert state.new_step[0].nonzero().flatten().tolist() == starts
    group = a.n_heads // a.n_kv_heads
    W_O = a.W_O(top).detach()
    for p in range(20):
        if p in starts:
            m = _expected_momentum(v, LAYOUT, KINDS, p, beta, window)  # [kv, d]
            m_heads = m[torch.arange(a.n_heads) // group]  # [head, d]
            expected = alpha * torch.einsum("hd,hdm->m", m_heads, W_O)
            torch.testing.assert_close(delta[p], expected, atol=1e-5, rtol=1e-4)
            assert expected.norm() > 1e-3
        else:
            assert delta[p].abs().max() == 0
    events = run.events()
    assert sorted(e.position for e in events) == starts
    assert all(e.layer == top and e.n_heads == a.n_heads for e in events)
    for e in events:
        m = _expected_momentum(v, LAYOUT, KINDS, e.position, beta, window)
        norms = (alpha * m[torch.arange(a.n_heads) // group]).norm(dim=-1)
        assert math.isclose(e.injected_norm, float(norms.mean()), rel_tol=1e-4)


def test_smi_decode_equals_full_forward(tiny_model):
    a = adapter(tiny_model)
    state = make_state(LAYOUT, KINDS)
    smi = StepMomentum(layers="all", alpha=1.0, beta=0.3, window=3)
    fields = ("segment_code", "step_id", "current_segment", "new_step", "prefill")

    def cut(n):
        return StepState(*(getattr(state, f)[:, :n] for f in fields), state.pad, state.row_seed)

    with torch.no_grad():
        with smi.applied(tiny_model, state):
            full = tiny_model(TOKENS)
        with smi.applied(tiny_model, cut(6)) as run:
            logits, dstate = a.prefill(TOKENS[:, :6], torch.ones(1, 6, dtype=torch.long))
            steps = [logits[:, -1]]
            for t in range(6, 20):
                run.state = cut(t + 1)
                logits, dstate = a.decode(dstate, TOKENS[:, t:t + 1])
                steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1)[0], full[0, 5:], atol=2e-4, rtol=1e-4)


def test_step_start_hint_skips_exactly(tiny_model):
    """`StepState.appended` records on the host whether the new position starts a step;
    SMI skips decoding steps without one and gives the logits and events of computing them."""
    a = adapter(tiny_model)
    state = make_state(LAYOUT, KINDS)
    fields = ("segment_code", "step_id", "current_segment", "new_step", "prefill")

    def cut(n):  # built without the hint (None): every step computed
        return StepState(*(getattr(state, f)[:, :n] for f in fields), state.pad, state.row_seed)

    results = {}
    for hinted in (False, True):
        smi = StepMomentum(layers="all", alpha=1.0)
        with torch.no_grad(), smi.applied(tiny_model, cut(6)) as run:
            logits, dstate = a.prefill(TOKENS[:, :6], torch.ones(1, 6, dtype=torch.long))
            steps = [logits[:, -1]]
            for t in range(6, 20):
                if hinted:
                    run.state = run.state.appended(*(getattr(state, f)[:, t] for f in fields[:4]))
                    assert run.state.last_starts_step is bool(state.new_step[0, t])
                else:
                    run.state = cut(t + 1)
                    assert run.state.last_starts_step is None
                logits, dstate = a.decode(dstate, TOKENS[:, t:t + 1])
                steps.append(logits[:, -1])
        results[hinted] = (torch.stack(steps, 1), [(e.layer, e.position, e.n_heads) for e in run.events()])
    torch.testing.assert_close(results[True][0], results[False][0], atol=0, rtol=0)
    assert results[True][1] == results[False][1] and results[True][1]


# ----------------------------------------------------------------------------- controls
def test_matched_logit_noise_matches_oeb_kl(tiny_model):
    state = make_state(LAYOUT, KINDS)
    with torch.no_grad():
        with OddsEqualBridge(layers="all").applied(tiny_model, state) as oeb_run:
            tiny_model(TOKENS)
        with MatchedLogitNoise(layers="all", seed=5).applied(tiny_model, state) as noise_run:
            noisy = tiny_model(TOKENS)
    checked = 0
    oeb_records = oeb_run.per_query("kl")
    for (layer, fired, kl), (layer2, fired2, target) in zip(noise_run.per_query("kl"), noise_run.per_query("target_kl")):
        f = fired.bool()
        assert f.any()
        assert ((kl[f] / target[f] - 1).abs() < 0.01).all()
        checked += int(f.sum())
    # at the first layer the inputs are identical, so the target is OEB's own KL
    layer0_oeb = oeb_records[0]
    layer0_noise = noise_run.per_query("target_kl")[0]
    assert layer0_oeb[0] == layer0_noise[0] == 0
    assert torch.equal(layer0_oeb[1], layer0_noise[1])
    torch.testing.assert_close(layer0_noise[2], layer0_oeb[2])
    assert checked > 10
    assert (noisy - tiny_model(TOKENS).detach()).abs().max() > 1e-4


def test_random_bridge_same_size_outside_s_and_hits_targets(tiny_model):
    state = make_state(LAYOUT, KINDS)
    seen = {}

    class Spy(RandomBridge):
        def edit(self, run, layer, scores, groups):
            out = super().edit(run, layer, scores, groups)
            seen["args"] = (scores, groups.s_mask, groups.b_mask, groups.sink, groups.usable)
            seen["out"] = out
            return out

    with torch.no_grad(), Spy(layers=[0], seed=3).applied(tiny_model, state) as run:
        tiny_model(TOKENS)
    scores, s_mask, b_mask, sink, usable = seen["args"]
    out = seen["out"]
    changed = (out != scores)  # [b, h, q, k]
    # the edited keys outside S are the random bridge: same count as B, never in S
    rand_b = changed & ~s_mask
    fired = torch.stack([f for _, f, _ in run.per_query("kl")])[0]  # [b, h, q]
    n_b = b_mask.sum(-1).expand_as(fired)
    assert fired.any()
    assert torch.equal(rand_b.sum(-1)[fired], n_b[fired])
    assert not (rand_b & ~usable).any()
    # the random set is not the real bridge (for at least some queries)
    assert (rand_b[fired] != b_mask.expand_as(rand_b)[fired]).any()
    # its masses hit the OEB targets computed for the random set
    res = odds_equal_edit(scores, s_mask, rand_b, sink, 0.15)
    _, _, _, pb, _ = group_masses(out, s_mask, rand_b, sink)
    torch.testing.assert_close(pb[fired], res.tau_b[fired], atol=1e-5, rtol=0)


def test_random_bridge_depends_on_row_seed_not_batch(tiny_model):
    s1 = make_state(LAYOUT, KINDS, row_seed=11)
    s2 = make_state(LAYOUT, KINDS, row_seed=12)
    outs = []
    for st in (s1, s1, s2):
        with torch.no_grad(), RandomBridge(layers="all", seed=0).applied(tiny_model, st):
            outs.append(tiny_model(TOKENS))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_random_momentum_matches_smi_norm(tiny_model):
    a = adapter(tiny_model)
    top = a.n_layers - 1
    state = make_state(LAYOUT, KINDS)
    deltas = {}
    with torch.no_grad():
        base = capture([attn_hook(top, "z")])
        tiny_model.run_with_hooks(TOKENS, fwd_hooks=base[1])
        for cls in (StepMomentum, RandomMomentum):
            store, hk = capture([attn_hook(top, "z")])
            # a hook added after the intervention's sees the edited z
            with cls(layers=[top], alpha=0.5, seed=2).applied(tiny_model, state) as run:
                tiny_model.run_with_hooks(TOKENS, fwd_hooks=hk)
            deltas[cls.name] = (store[attn_hook(top, "z")][0] - base[0][attn_hook(top, "z")][0])[0]
            deltas[cls.name + "_events"] = run.events()
    smi, rnd = deltas["smi"], deltas["random_momentum"]  # [pos, head, d]
    torch.testing.assert_close(rnd.norm(dim=-1), smi.norm(dim=-1), atol=1e-5, rtol=1e-4)
    starts = smi.norm(dim=(-1, -2)) > 0
    assert starts.nonzero().flatten().tolist() == [8, 12]
    cos = torch.nn.functional.cosine_similarity(rnd[starts], smi[starts], dim=-1)
    assert cos.abs().max() < 0.9
    for e1, e2 in zip(deltas["smi_events"], deltas["random_momentum_events"]):
        assert (e1.layer, e1.position) == (e2.layer, e2.position)
        assert math.isclose(e1.injected_norm, e2.injected_norm, rel_tol=1e-4)


# ----------------------------------------------------------------------------- hygiene
class _Boom(OddsEqualBridge):
    def __init__(self, exc, **kw):
        super().__init__(**kw)
        self.exc = exc

    def edit(self, *args):
        raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_hooks_removed_on_every_exit_path(tiny_model, exc):
    state = make_state(LAYOUT, KINDS)
    with torch.no_grad():
        before = tiny_model(TOKENS)
        with StepFlow().applied(tiny_model, state):
            tiny_model(TOKENS)
        assert_no_hooks(tiny_model)
        with pytest.raises(type(exc)):
            with apply_interventions([StepFlow(), _Boom(exc, layers="all")], tiny_model, state):
                tiny_model(TOKENS)
        assert_no_hooks(tiny_model)
        with pytest.raises(ValueError):
            with StepFlow().applied(tiny_model, state):
                raise ValueError("user code failed")
        assert_no_hooks(tiny_model)
        after = tiny_model(TOKENS)
    assert torch.equal(before, after)


def test_user_hooks_survive(tiny_model):
    state = make_state(LAYOUT, KINDS)
    calls = []
    hp = tiny_model.hook_dict[attn_hook(0, "z")]
    hp.add_hook(lambda z, hook: calls.append(1))
    try:
        with torch.no_grad(), StepFlow().applied(tiny_model, state):
            n = len(calls)
            tiny_model(TOKENS)
            assert len(calls) == n + 1
        with torch.no_grad():
            tiny_model(TOKENS)
        assert len(calls) == n + 2
    finally:
        hp.remove_hooks("fwd")
    assert_no_hooks(tiny_model)


def test_state_length_mismatch_is_a_clear_error(tiny_model):
    state = make_state(LAYOUT[:10], KINDS)
    with pytest.raises(StepflowError, match="StepState covers 10 positions"):
        with torch.no_grad(), OddsEqualBridge(layers=[0]).applied(tiny_model, state):
            tiny_model(TOKENS)
    assert_no_hooks(tiny_model)


# ----------------------------------------------------------------------------- layer specs
def test_layer_specs(tiny_model):
    n = adapter(tiny_model).n_layers
    assert resolve_layers("bottom_quarter", tiny_model) == [0]
    assert resolve_layers("top_quarter", tiny_model) == [n - 1]
    assert resolve_layers("all", tiny_model) == list(range(n))
    assert resolve_layers([2, 0], tiny_model) == [0, 2]
    assert resolve_layers(range(1, 3), tiny_model) == [1, 2]
    assert resolve_layers(1, tiny_model) == [1]
    with pytest.raises(ValueError, match="outside"):
        resolve_layers([n], tiny_model)
    with pytest.raises(ValueError, match="unknown layer band"):
        resolve_layers("middle", tiny_model)
    state = make_state(LAYOUT, KINDS)
    with pytest.raises(ValueError):
        with OddsEqualBridge(layers=[0, 99]).applied(tiny_model, state):
            pass
    assert_no_hooks(tiny_model)


def test_smollm2_quarters(smollm2):
    assert resolve_layers("bottom_quarter", smollm2) == list(range(8))
    assert resolve_layers("top_quarter", smollm2) == list(range(22, 30))


def test_bad_parameters():
    with pytest.raises(ValueError):
        OddsEqualBridge(tau_max=1.5)
    with pytest.raises(ValueError):
        StepMomentum(beta=1.0)
    with pytest.raises(ValueError):
        StepMomentum(window=0)
    with pytest.raises(ValueError):
        StepMomentum(inject="all")


# ----------------------------------------------------------------------------- outside generate
def test_docs_example_run_with_hooks(tiny_model, tokenizer):
    """The example of docs/interventions.md: an intervention on a teacher-forced trace."""
    question = "What is 12 * 7?"
    thinking = "12 * 7 = 12 * 5 + 12 * 2.\n\n12 * 5 = 60 and 12 * 2 = 24.\n\n60 + 24 = 84."
    trace = Trace.from_parts(tokenizer, question=question, thinking=thinking, summary="The answer is 84.",
                             format="r1")
    # --- as in the docs
    model = tiny_model
    state = StepState.from_trace(trace)
    with torch.no_grad():
        with StepFlow().applied(model, state) as run:
            logits = model(trace.token_ids[None])
        events = run.events()   # OEB's and SMI's, each named after its part
    # ---
    assert logits.shape[:2] == (1, trace.n_tokens)
    assert {e.intervention for e in events} == {"oeb", "smi"}
    n_thinking = len(trace.thinking_steps)
    smi_positions = sorted({e.position for e in events if e.intervention == "smi"})
    assert len(smi_positions) == n_thinking - 1
    assert smi_positions == [trace.steps[i].token_span[0] for i in trace.thinking_steps[1:]]
    assert_no_hooks(model)
    # the run_with_hooks form, with the hooks of one intervention
    run = OddsEqualBridge().install(model, state)
    with torch.no_grad():
        logits2 = model.run_with_hooks(trace.token_ids[None], fwd_hooks=run.hooks)
    assert len(run.events()) > 0
    assert_no_hooks(model)
    with torch.no_grad():
        assert not torch.equal(logits2, model(trace.token_ids[None]))


def test_state_from_traces_left_pads(tokenizer):
    t1 = Trace.from_parts(tokenizer, question="Q one?", thinking="a.\n\nb.", summary="c", format="r1")
    t2 = Trace.from_parts(tokenizer, question="A longer question here?", thinking="x.\n\ny.\n\nz.",
                          summary="w", format="r1")
    st = StepState.from_traces([t1, t2])
    width = max(t1.n_tokens, t2.n_tokens)
    assert st.segment_code.shape == (2, width)
    assert st.pad.tolist() == [width - t1.n_tokens, width - t2.n_tokens]
    one = StepState.from_trace(t1)
    p = int(st.pad[0])
    assert torch.equal(st.segment_code[0, p:], one.segment_code[0])
    assert torch.equal(st.step_id[0, p:], one.step_id[0])
    assert (st.segment_code[0, :p] == 0).all() and (st.step_id[0, :p] == -1).all()
    assert int(one.new_step.sum()) == len(t1.thinking_steps) - 1


def test_stepflow_takes_the_papers_two_hyperparameters():
    flow = StepFlow(tau_max=0.1, alpha=0.04)
    assert flow.oeb.tau_max == 0.1 and flow.smi.alpha == 0.04
    assert flow.oeb.layers == "bottom_quarter" and flow.smi.layers == "top_quarter"
    assert repr(StepFlow()) == repr(StepFlow(oeb=OddsEqualBridge(), smi=StepMomentum()))
    with pytest.raises(StepflowError, match="tau_max"):
        StepFlow(oeb=OddsEqualBridge(), tau_max=0.1)
    with pytest.raises(StepflowError, match="alpha"):
        StepFlow(smi=StepMomentum(), alpha=0.1)


def test_stepflow_honours_the_intervention_contract(tiny_model, tokenizer):
    """install returns one InterventionRun (its parts' hooks, one state), applied yields it."""
    trace = Trace.from_parts(tokenizer, question="What is 12 * 7?", format="r1", summary="The answer is 84.",
                             thinking="12 * 7 = 12 * 5 + 12 * 2.\n\n12 * 5 = 60 and 12 * 2 = 24.\n\n60 + 24 = 84.")
    state = StepState.from_trace(trace)
    flow = StepFlow(oeb=OddsEqualBridge(layers="all"), smi=StepMomentum(layers="all"))
    run = flow.install(tiny_model, state)
    parts = [p.install(tiny_model, state) for p in flow.parts()]
    assert isinstance(run, InterventionRun)
    assert [name for name, _ in run.hooks] == [name for p in parts for name, _ in p.hooks]
    other = StepState.from_trace(trace)
    run.state = other
    assert all(p.state is other for p in run.parts)
    with torch.no_grad(), flow.applied(tiny_model, state) as applied:
        tiny_model(trace.token_ids[None])
    assert isinstance(applied, InterventionRun)
    assert {e.intervention for e in applied.events()} == {"oeb", "smi"}
    assert_no_hooks(tiny_model)


# --------------------------------------------------------------------------- parameter checks
@pytest.mark.parametrize("make, message", [
    (lambda: StepMomentum(alpha=float("nan")), r"StepMomentum: alpha must be a finite number.*got nan"),
    (lambda: StepMomentum(alpha=float("inf")), r"alpha must be a finite number"),
    (lambda: StepMomentum(alpha="0.06"), r"alpha must be a finite number"),
    (lambda: RandomMomentum(alpha=None), r"RandomMomentum: alpha"),
    (lambda: StepMomentum(beta=1.0), r"beta must be a finite number in \[0.0, 1.0\)"),
    (lambda: StepMomentum(beta=float("nan")), r"beta"),
    (lambda: StepMomentum(window=2.5), r"window \(tokens, or None\) must be an integer, got 2.5"),
    (lambda: StepMomentum(window=0), r"window .* >= 1"),
    (lambda: StepMomentum(layers=[1.5]), r"StepMomentum: layers\[0\] must be an integer, got 1.5"),
    (lambda: StepMomentum(layers=[True]), r"layers\[0\] must be an integer"),
    (lambda: StepMomentum(layers=[-1]), r"layers\[0\] must be an integer >= 0"),
    (lambda: StepMomentum(layers=[]), r"selects no layer"),
    (lambda: StepMomentum(layers="top"), r"unknown layer band 'top'"),
    (lambda: StepMomentum(layers=2.0), r"must be a band name"),
    (lambda: StepMomentum(during_prefill="no"), r"during_prefill must be True or False"),
    (lambda: StepMomentum(seed=0.5), r"seed must be an integer"),
    (lambda: OddsEqualBridge(tau_max=1.5), r"OddsEqualBridge: tau_max must be a finite number in \[0.0, 1.0\), got 1.5"),
    (lambda: OddsEqualBridge(tau_max=float("nan")), r"tau_max"),
    (lambda: OddsEqualBridge(tau_max=-0.1), r"tau_max"),
    (lambda: OddsEqualBridge(layers=range(0)), r"non-empty range"),
    (lambda: OddsEqualBridge(sink_positions=[0.5]), r"sink_positions\[0\] must be an integer"),
    (lambda: OddsEqualBridge(sink_positions=3), r"sink_positions must be a sequence"),
    (lambda: RandomBridge(tau_max=float("inf")), r"RandomBridge: tau_max"),
    (lambda: MatchedLogitNoise(n_steps=0), r"n_steps must be an integer >= 1"),
    (lambda: StepFlow(oeb="bottom_quarter"), r"StepFlow: oeb must be an Intervention"),
])
def test_every_parameter_is_checked_at_construction(make, message):
    with pytest.raises(StepflowError, match=message):
        make()


def test_valid_edge_values_and_negative_alpha_are_accepted(tiny_bridge):
    assert StepMomentum(alpha=-0.06).alpha == -0.06  # an ablation: push away from the previous step
    assert StepMomentum(alpha=0).alpha == 0.0 and StepMomentum(window=np.int64(4)).window == 4
    assert OddsEqualBridge(tau_max=0.0, layers=(np.int64(1), 0)).layers == [1, 0]
    assert resolve_layers(range(1, 3), tiny_bridge) == [1, 2]
    with pytest.raises(StepflowError, match=r"layers \[30\] are outside the model, which has 3 layers \(0..2\)"):
        resolve_layers([30], tiny_bridge)


def test_layer_spec_bands_name_the_diagnostics_bands(tiny_model, smollm2):
    import stepflow_tl.interventions.base as base
    from stepflow_tl.saliency.diagnostics import BANDS, band_layers

    assert not hasattr(base, "BANDS")  # one BANDS: the diagnostics' shallow / middle / deep
    assert set(base.LAYER_BANDS.values()) - {None} <= set(BANDS)
    for model in (tiny_model, smollm2):
        bands = band_layers(adapter(model).n_layers)
        for spec, band in base.LAYER_BANDS.items():
            assert resolve_layers(spec, model) == (bands[band] if band else list(range(adapter(model).n_layers)))


def test_renamed_classes_keep_their_old_names_for_one_release():
    from stepflow_tl.saliency.losses import LossInUnembedding, loss_in_unembedding
    from stepflow_tl.tl.attention import TiledAttentionScope, tiled_attention

    assert loss_in_unembedding is LossInUnembedding and tiled_attention is TiledAttentionScope
