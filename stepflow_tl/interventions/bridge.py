"""Odds-Equal Bridge (paper Eqs. 5-8) and its controls at matched strength
(`RandomBridge`, `MatchedLogitNoise`), on ``hook_attn_scores``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from jaxtyping import Bool, Float, Int

from ..checks import check_bool, check_int, check_real
from ..errors import StepflowError
from ..tl.adapter import adapter, attn_hook
from .base import (
    Intervention,
    InterventionRun,
    LayerSpec,
    PerStateCache,
    check_layer_spec,
    hash_normal,
    hash_uniform,
    resolve_layers,
)
from .state import BRIDGE_OF, StepState


# --------------------------------------------------------------------------- OEB core
@dataclass
class OddsEqualEdit:
    """Result of `odds_equal_edit`; all ``[...]`` = the query shape without keys."""

    scores: torch.Tensor  # [..., k] edited scores, input dtype
    fired: torch.Tensor  # [...] bool
    lambda_b: torch.Tensor  # [...] fp32, 0 where not fired
    lambda_s: torch.Tensor
    kl: torch.Tensor  # [...] KL(new || old) of the full distribution
    tau_b: torch.Tensor
    tau_s: torch.Tensor


def group_masses(scores: torch.Tensor, s_mask: torch.Tensor, b_mask: torch.Tensor, sink_mask: torch.Tensor):
    """fp32 softmax and the renormalised non-sink masses of S, B and O.

    Returns ``(p [..., k], Z, pS, pB, pO)`` where ``Z`` is the non-sink mass and the
    group masses are divided by ``Z``.
    """
    p = torch.softmax(scores.float(), dim=-1)
    nonsink = ~sink_mask
    z = (p * nonsink).sum(-1)
    safe_z = z.clamp_min(torch.finfo(torch.float32).tiny)
    p_s = (p * s_mask).sum(-1) / safe_z
    p_b = (p * b_mask).sum(-1) / safe_z
    o_mask = nonsink & ~s_mask & ~b_mask
    p_o = (p * o_mask).sum(-1) / safe_z
    return p, z, p_s, p_b, p_o


def odds_equal_edit(
    scores: torch.Tensor,
    s_mask: torch.Tensor,
    b_mask: torch.Tensor,
    sink_mask: torch.Tensor,
    tau_max: float,
    active: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> OddsEqualEdit:
    """Paper Eqs. 5-8 on pre-softmax scores ``[..., k]``.

    ``s_mask``/``b_mask``/``sink_mask`` are bool ``[..., k]`` (broadcastable); S and B
    must exclude sinks and masked keys. ``active`` ``[...]`` limits which queries may fire.

    Sink rule. With p the softmax over all keys, K the sinks and Z = 1 - p(K), the
    masses are taken over the non-sink keys renormalised: p'(g) = p(g) / Z. Adding
    lambda_B = log(tau_B / p'(B)) to B and lambda_S = log(tau_S / p'(S)) to S makes the
    unnormalised new masses p(K), p(O), Z tau_B, Z tau_S, whose sum is
    p(K) + p(O) + Z (1 - p'(O)) = p(K) + Z = 1: the softmax normaliser is unchanged, so
    the sinks and O keep their probabilities exactly, the non-sink total stays Z, and
    in the renormalised distribution B and S hit tau_B and tau_S exactly. Without
    sinks Z = 1 and this is the paper's rule. Since the edit multiplies each group by
    a constant it is the KL projection of p onto the set with those group masses, and
    KL(new || old) = Z (tau_B lambda_B + tau_S lambda_S).

    The edit is computed in fp32 and cast back once, so in bf16/fp16 the only error is
    the final rounding of the edited logits.
    """
    _, z, p_s, p_b, p_o = group_masses(scores, s_mask, b_mask, sink_mask)
    n_s = s_mask.sum(-1).float()
    n_b = b_mask.sum(-1).float()
    shape = p_s.shape
    n_s, n_b = n_s.expand(shape), n_b.expand(shape)
    tau_b = torch.sqrt(n_b / (n_b + n_s).clamp_min(1.0)).clamp_max(tau_max)
    tau_b = torch.minimum(tau_b, 1.0 - p_o - eps)
    tau_s = 1.0 - p_o - tau_b
    fired = (n_b > 0) & (n_s > 0) & (p_b > 0) & (p_s > 0) & (tau_b > 0) & (p_b < tau_b)
    if active is not None:
        fired = fired & active
    tiny = torch.finfo(torch.float32).tiny
    lambda_b = torch.where(fired, torch.log(tau_b.clamp_min(tiny) / p_b.clamp_min(tiny)), torch.zeros_like(p_b))
    lambda_s = torch.where(fired, torch.log(tau_s.clamp_min(tiny) / p_s.clamp_min(tiny)), torch.zeros_like(p_s))
    delta = lambda_b[..., None] * b_mask + lambda_s[..., None] * s_mask
    new = (scores.float() + delta).to(scores.dtype)
    # Keys outside B and S (O, sinks, masked) keep their exact logits, also in bf16.
    new = torch.where((b_mask | s_mask) & fired[..., None], new, scores)
    kl = torch.where(fired, z * (tau_b * lambda_b + tau_s * lambda_s), torch.zeros_like(p_b))
    return OddsEqualEdit(new, fired, lambda_b, lambda_s, kl, tau_b, tau_s)


def _kl_new_old(scores32: torch.Tensor, new32: torch.Tensor) -> torch.Tensor:
    """KL(softmax(new) || softmax(old)) over the last axis, fp32."""
    logq = torch.log_softmax(new32, dim=-1)
    logp = torch.log_softmax(scores32, dim=-1)
    q = logq.exp()
    terms = torch.where(q > 0, q * (logq - logp), torch.zeros_like(q))
    return terms.sum(-1)


def matched_noise_scale(
    scores32: torch.Tensor, noise: torch.Tensor, target_kl: torch.Tensor, n_steps: int = 40,
    lo: float = 1e-4, hi: float = 1e3,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per query the scale c with KL(softmax(s + c n) || softmax(s)) = target.

    Bisection on log c over ``[lo, hi]`` with a fixed number of vectorised steps (no
    host sync). KL is 0 at c = 0 and continuous, so bisection lands on a crossing when
    the target is reachable; where KL(hi) < target (possible: as c grows the noise
    saturates to a one-hot), c = hi and the achieved KL is lower.

    Returns:
        ``(c [...], achieved KL [...])``, 0 where the target is 0.
    """
    shape = target_kl.shape
    log_lo = torch.full(shape, math.log(lo), device=scores32.device)
    log_hi = torch.full(shape, math.log(hi), device=scores32.device)
    for _ in range(n_steps):
        mid = 0.5 * (log_lo + log_hi)
        kl = _kl_new_old(scores32, scores32 + mid.exp()[..., None] * noise)
        above = kl > target_kl
        log_hi = torch.where(above, mid, log_hi)
        log_lo = torch.where(above, log_lo, mid)
    c = torch.where(target_kl > 0, (0.5 * (log_lo + log_hi)).exp(), torch.zeros_like(target_kl))
    achieved = _kl_new_old(scores32, scores32 + c[..., None] * noise)
    return c, achieved


# --------------------------------------------------------------------------- attention interventions
class AttentionIntervention(Intervention):
    """Shared group logic of OEB and its controls on ``hook_attn_scores``."""

    def __init__(self, layers: LayerSpec = "bottom_quarter", tau_max: float = 0.15,
                 sink_positions: Sequence[int] = (), during_prefill: bool = False, seed: int = 0):
        who = type(self).__name__
        self.layers = check_layer_spec(layers, f"{who}: layers")
        self.tau_max = check_real(f"{who}: tau_max", tau_max, low=0.0, high=1.0, high_open=True)
        if isinstance(sink_positions, (str, bytes)) or not hasattr(sink_positions, "__iter__"):
            raise StepflowError(f"{who}: sink_positions must be a sequence of positions >= 0, got {sink_positions!r}")
        self.sink_positions = tuple(check_int(f"{who}: sink_positions[{i}]", p, low=0)
                                    for i, p in enumerate(sink_positions))
        self.during_prefill = check_bool(f"{who}: during_prefill", during_prefill)
        self.seed = check_int(f"{who}: seed", seed)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.layers!r}, tau_max={self.tau_max}, "
                f"sink_positions={self.sink_positions}, during_prefill={self.during_prefill})")

    def install(self, model, state: StepState) -> InterventionRun:
        a = adapter(model)
        layers = resolve_layers(self.layers, model)
        a.check_attention_editable()
        run = InterventionRun(self.name, state)
        groups = PerStateCache()  # built once per forward, shared by the layers
        for layer in layers:
            run.hooks.append((attn_hook(layer, "attn_scores"), self._hook(run, layer, groups)))
        return run

    def edit_scores(self, run: InterventionRun, layer: int, scores: Float[torch.Tensor, "batch head query key"],
                    groups: PerStateCache) -> Float[torch.Tensor, "batch head query key"]:
        """The edited pre-softmax scores of one layer for the rows of ``run.state``
        (the last ``query`` positions of the state are the queries, every position a
        key); what the TL hook on ``hook_attn_scores`` returns and what the vLLM engine
        applies to the attention it computes. ``groups`` caches the masks per state."""
        if run.state.phase == "prefill" and not self.during_prefill:
            return scores
        q_len, k_len = scores.shape[-2], scores.shape[-1]
        s_mask, b_mask, sink, usable, active, q_pos = groups.get(
            run.state, (q_len, k_len), lambda: self.groups(run, q_len, k_len)
        )
        return self.edit(run, layer, scores, s_mask, b_mask, sink, usable, active, q_pos)

    def groups(self, run: InterventionRun, q_len: int, k_len: int):
        """Masks ``[batch, 1, q, k]`` of S, B, sinks and valid keys, ``active [batch, 1, q]``."""
        st = run.state
        bridge_of = torch.tensor(BRIDGE_OF, dtype=torch.int8, device=st.device)
        sinks = torch.tensor(self.sink_positions or (-1,), dtype=torch.int64, device=st.device)
        if st.n_pos != k_len:
            raise StepflowError(
                f"the StepState covers {st.n_pos} positions but the model sees {k_len} keys; "
                "build the state for exactly the tokens you run"
            )
        dev = st.device
        k_pos = torch.arange(k_len, device=dev)
        q_pos = k_pos[k_len - q_len:]
        codes = st.segment_code  # [b, k]
        cur = st.current_segment[:, k_len - q_len:]  # [b, q]
        bridge = bridge_of[cur.long()]  # [b, q]
        causal = k_pos[None, :] <= q_pos[:, None]  # [q, k]
        real = k_pos[None, :] >= st.pad[:, None]  # [b, k]
        sink = torch.isin(k_pos[None, :] - st.pad[:, None], sinks) & real  # [b, k]
        usable = (real & ~sink)[:, None, :] & causal[None]  # [b, q, k]
        s_mask = (codes[:, None, :] == cur[:, :, None]) & (cur > 0)[:, :, None] & usable
        b_mask = (codes[:, None, :] == bridge[:, :, None]) & (bridge > 0)[:, :, None] & usable
        active = torch.ones_like(cur, dtype=torch.bool)
        if not self.during_prefill:
            active = ~st.prefill[:, k_len - q_len:]
        return s_mask[:, None], b_mask[:, None], sink[:, None, None, :], usable[:, None], active[:, None], q_pos

    def _hook(self, run, layer, groups: PerStateCache):
        def hook(scores, hook):
            return self.edit_scores(run, layer, scores, groups)

        return hook

    def edit(self, run, layer, scores, s_mask, b_mask, sink, usable, active, q_pos):
        raise NotImplementedError


class OddsEqualBridge(AttentionIntervention):
    """Odds-Equal Bridge (paper Eqs. 5-8), see `odds_equal_edit`.

    Args:
        layers: layer spec (default the bottom quarter, as in the paper).
        tau_max: cap of the bridge target tau_B (paper: 0.15).
        sink_positions: positions counted from each row's first real token (e.g. ``(0,)``
            for BOS) excluded from the masses and left untouched.
        during_prefill: also edit the prompt's queries in `generate` (default: only
            decoded tokens, as in the paper).
    """

    name = "oeb"

    def edit(self, run: InterventionRun, layer: int, scores: Float[torch.Tensor, "batch head query key"], s_mask: Bool[torch.Tensor, "batch 1 query key"], b_mask: Bool[torch.Tensor, "batch 1 query key"], sink: Bool[torch.Tensor, "batch 1 1 key"], usable: Bool[torch.Tensor, "batch 1 query key"], active: Bool[torch.Tensor, "batch 1 query"], q_pos: Int[torch.Tensor, "query"]):
        res = odds_equal_edit(scores, s_mask, b_mask, sink, self.tau_max, active=active)
        run.record("attn", layer, scores.shape[-1] - scores.shape[-2],
                   fired=res.fired, lambda_b=res.lambda_b, lambda_s=res.lambda_s, kl=res.kl)
        return res.scores


class RandomBridge(AttentionIntervention):
    """Control: OEB's mechanics and targets with B replaced, per query, by a random
    set of |B| keys drawn uniformly from the non-S, non-sink keys (seeded per row)."""

    name = "random_bridge"

    def edit(self, run: InterventionRun, layer: int, scores: Float[torch.Tensor, "batch head query key"], s_mask: Bool[torch.Tensor, "batch 1 query key"], b_mask: Bool[torch.Tensor, "batch 1 query key"], sink: Bool[torch.Tensor, "batch 1 1 key"], usable: Bool[torch.Tensor, "batch 1 query key"], active: Bool[torch.Tensor, "batch 1 query"], q_pos: Int[torch.Tensor, "query"]):
        st = run.state
        k_len = scores.shape[-1]
        k_pos = torch.arange(k_len, device=scores.device)
        u = hash_uniform(torch.tensor(self.seed, device=scores.device), st.row_seed[:, None, None],
                         (q_pos - st.pad[:, None])[:, :, None], (k_pos[None, :] - st.pad[:, None])[:, None, :])
        candidates = usable[:, 0] & ~s_mask[:, 0]  # [b, q, k]
        u = torch.where(candidates, u, torch.full_like(u, 2.0))
        rank = u.argsort(dim=-1).argsort(dim=-1)
        n_b = b_mask[:, 0].sum(-1, keepdim=True)
        random_b = (rank < n_b) & candidates
        res = odds_equal_edit(scores, s_mask, random_b[:, None], sink, self.tau_max, active=active)
        run.record("attn", layer, scores.shape[-1] - scores.shape[-2],
                   fired=res.fired, lambda_b=res.lambda_b, lambda_s=res.lambda_s, kl=res.kl)
        return res.scores


class MatchedLogitNoise(AttentionIntervention):
    """Control: Gaussian noise on the usable keys' logits of the same layers, scaled
    per (row, head, query) so that KL(new || old) equals the KL OEB would apply there
    (`matched_noise_scale`); queries where OEB would not fire are untouched."""

    name = "matched_noise"

    def __init__(self, *args: Any, n_steps: int = 40, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.n_steps = check_int("MatchedLogitNoise: n_steps", n_steps, low=1)

    def edit(self, run: InterventionRun, layer: int, scores: Float[torch.Tensor, "batch head query key"], s_mask: Bool[torch.Tensor, "batch 1 query key"], b_mask: Bool[torch.Tensor, "batch 1 query key"], sink: Bool[torch.Tensor, "batch 1 1 key"], usable: Bool[torch.Tensor, "batch 1 query key"], active: Bool[torch.Tensor, "batch 1 query"], q_pos: Int[torch.Tensor, "query"]):
        st = run.state
        oeb = odds_equal_edit(scores, s_mask, b_mask, sink, self.tau_max, active=active)
        b, h, q, k = scores.shape
        dev = scores.device
        noise = hash_normal(
            torch.tensor(self.seed, device=dev), st.row_seed[:, None, None, None],
            torch.tensor(layer, device=dev), torch.arange(h, device=dev)[None, :, None, None],
            (q_pos - st.pad[:, None])[:, None, :, None], (torch.arange(k, device=dev)[None, :] - st.pad[:, None])[:, None, None, :],
        )
        noise = noise * usable
        scores32 = scores.float()
        c, achieved = matched_noise_scale(scores32, noise, oeb.kl, n_steps=self.n_steps)
        new = torch.where(usable & oeb.fired[..., None], (scores32 + c[..., None] * noise).to(scores.dtype), scores)
        zero = torch.zeros_like(c)
        run.record("attn", layer, scores.shape[-1] - scores.shape[-2],
                   fired=oeb.fired, lambda_b=zero, lambda_s=zero, kl=torch.where(oeb.fired, achieved, zero),
                   target_kl=oeb.kl, scale=c)
        return new
