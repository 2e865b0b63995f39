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


_TINY = torch.finfo(torch.float32).tiny


@dataclass
class BridgeGroups:
    """OEB's key groups for a set of queries, built once and applied to the scores of
    every head and layer that sees those queries (`odds_equal_edit`'s work that does not
    depend on the scores).

    ``[...]`` are the masks' query dimensions (``[batch, 1, query]`` in a model: every
    head shares them), broadcastable against the scores' ``[batch, head, query]``.
    """

    member: torch.Tensor  # [..., k, 3] fp32 one-hot: B, S, O (the other non-sink keys); sinks all 0
    column: torch.Tensor  # [..., k] int64: 0 B, 1 S, 2 any other key (O, sinks, masked keys)
    tau_b: torch.Tensor  # [...] sqrt(n_B / (n_B + n_S)) capped at tau_max (paper Eq. 6)
    may_fire: torch.Tensor  # [...] bool: B and S are non-empty and the query is active

    @classmethod
    def build(cls, s_mask: torch.Tensor, b_mask: torch.Tensor, sink_mask: torch.Tensor, tau_max: float,
              active: Optional[torch.Tensor] = None) -> "BridgeGroups":
        """From bool masks ``[..., k]`` (broadcastable; S and B exclude sinks and masked
        keys) and ``active [...]``, the queries that may fire."""
        b_mask, s_mask, sink_mask = torch.broadcast_tensors(b_mask, s_mask, sink_mask)
        other = ~(sink_mask | s_mask | b_mask)
        member = torch.stack([b_mask, s_mask, other], dim=-1).float()
        column = torch.where(b_mask, 0, torch.where(s_mask, 1, 2))
        n_b, n_s = b_mask.sum(-1).float(), s_mask.sum(-1).float()
        tau_b = torch.sqrt(n_b / (n_b + n_s).clamp_min(1.0)).clamp_max(tau_max)
        may_fire = (n_b > 0) & (n_s > 0)
        if active is not None:
            may_fire = may_fire & active
        return cls(member, column, tau_b, may_fire)

    def masses(self, scores: torch.Tensor):
        """fp32 softmax of ``scores [..., k]`` and the non-sink mass ``Z [...]``, with the
        group masses renormalised by it, ``[..., 3]`` (B, S, O)."""
        p = torch.softmax(scores.float(), dim=-1)
        # one contraction gives the three group sums (heads broadcast, never copied)
        mass = torch.einsum("...k,...kc->...c", p, self.member)
        z = mass.sum(-1)
        return p, z, mass / z.clamp_min(_TINY)[..., None]

    def edit(self, scores: torch.Tensor, eps: float = 1e-6) -> "OddsEqualEdit":
        """`odds_equal_edit` of ``scores [..., k]`` with these groups."""
        _, z, shares = self.masses(scores)
        p_b, p_s, p_o = shares.unbind(-1)
        rest = 1.0 - p_o
        tau_b = torch.minimum(self.tau_b, rest - eps)
        tau_s = rest - tau_b
        # (p_b > 0 and p_b < tau_b imply tau_b > 0)
        fired = self.may_fire & (torch.minimum(p_b, p_s) > 0) & (p_b < tau_b)
        # O's target is its own share, so its lambda is log(1) = 0 exactly
        target = torch.stack([tau_b, tau_s, p_o], dim=-1)
        lam = torch.where(fired[..., None], torch.log(target.clamp_min(_TINY) / shares.clamp_min(_TINY)), 0.0)
        # Each key gets its group's lambda: exactly 0 on O, sinks, masked keys and queries
        # that did not fire, whose logits are therefore kept bit for bit.
        delta = lam.gather(-1, self.column.expand(*scores.shape[:-1], -1))
        new = (scores.float() + delta).to(scores.dtype)
        kl = z * (target * lam).sum(-1)
        lambda_b, lambda_s, _ = lam.unbind(-1)
        return OddsEqualEdit(new, fired, lambda_b, lambda_s, kl, tau_b, tau_s)


def group_masses(scores: torch.Tensor, s_mask: torch.Tensor, b_mask: torch.Tensor, sink_mask: torch.Tensor):
    """fp32 softmax and the renormalised non-sink masses of S, B and O.

    Returns ``(p [..., k], Z, pS, pB, pO)`` where ``Z`` is the non-sink mass and the
    group masses are divided by ``Z``.
    """
    p, z, shares = BridgeGroups.build(s_mask, b_mask, sink_mask, 1.0).masses(scores)
    p_b, p_s, p_o = shares.unbind(-1)
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
    return BridgeGroups.build(s_mask, b_mask, sink_mask, tau_max, active).edit(scores, eps)


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
@dataclass
class QueryGroups:
    """What an attention intervention derives from a `StepState` for its queries, once per
    forward (the layers share it)."""

    s_mask: Bool[torch.Tensor, "batch 1 query key"]  # the query's current segment (S)
    b_mask: Bool[torch.Tensor, "batch 1 query key"]  # its bridge segment (B)
    sink: Bool[torch.Tensor, "batch 1 1 key"]
    usable: Bool[torch.Tensor, "batch 1 query key"]  # real, causal, non-sink keys
    active: Bool[torch.Tensor, "batch 1 query"]  # queries that may be edited
    q_pos: Int[torch.Tensor, "query"]
    bridge: Optional[BridgeGroups] = None  # the groups the edit uses (`bridge_groups`)


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
        return self.edit(run, layer, scores, groups.get(run.state, (q_len, k_len),
                                                        lambda: self.groups(run, q_len, k_len)))

    def groups(self, run: InterventionRun, q_len: int, k_len: int) -> QueryGroups:
        """The key groups of the state's last ``q_len`` queries over ``k_len`` keys."""
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
        groups = QueryGroups(s_mask[:, None], b_mask[:, None], sink[:, None, None, :], usable[:, None],
                             active[:, None], q_pos)
        groups.bridge = self.bridge_groups(run, groups)
        return groups

    def bridge_groups(self, run: InterventionRun, groups: QueryGroups) -> BridgeGroups:
        """The groups the edit moves mass between (OEB's S and B)."""
        return BridgeGroups.build(groups.s_mask, groups.b_mask, groups.sink, self.tau_max, groups.active)

    def _hook(self, run, layer, groups: PerStateCache):
        def hook(scores, hook):
            return self.edit_scores(run, layer, scores, groups)

        return hook

    def edit(self, run: InterventionRun, layer: int, scores: Float[torch.Tensor, "batch head query key"],
             groups: QueryGroups) -> Float[torch.Tensor, "batch head query key"]:
        """The edited scores of one layer: the odds-equal edit between the groups of
        `bridge_groups`, recorded."""
        res = groups.bridge.edit(scores)
        run.record("attn", layer, scores.shape[-1] - scores.shape[-2],
                   fired=res.fired, lambda_b=res.lambda_b, lambda_s=res.lambda_s, kl=res.kl)
        return res.scores


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


class RandomBridge(AttentionIntervention):
    """Control: OEB's mechanics and targets with B replaced, per query, by a random
    set of |B| keys drawn uniformly from the non-S, non-sink keys (seeded per row)."""

    name = "random_bridge"

    def bridge_groups(self, run: InterventionRun, groups: QueryGroups) -> BridgeGroups:
        st = run.state
        dev = st.device
        k_pos = torch.arange(st.n_pos, device=dev)
        u = hash_uniform(torch.tensor(self.seed, device=dev), st.row_seed[:, None, None],
                         (groups.q_pos - st.pad[:, None])[:, :, None], (k_pos[None, :] - st.pad[:, None])[:, None, :])
        candidates = groups.usable[:, 0] & ~groups.s_mask[:, 0]  # [b, q, k]
        u = torch.where(candidates, u, torch.full_like(u, 2.0))
        rank = u.argsort(dim=-1).argsort(dim=-1)
        n_b = groups.b_mask[:, 0].sum(-1, keepdim=True)
        random_b = (rank < n_b) & candidates
        return BridgeGroups.build(groups.s_mask, random_b[:, None], groups.sink, self.tau_max, groups.active)


class MatchedLogitNoise(AttentionIntervention):
    """Control: Gaussian noise on the usable keys' logits of the same layers, scaled
    per (row, head, query) so that KL(new || old) equals the KL OEB would apply there
    (`matched_noise_scale`); queries where OEB would not fire are untouched."""

    name = "matched_noise"

    def __init__(self, *args: Any, n_steps: int = 40, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.n_steps = check_int("MatchedLogitNoise: n_steps", n_steps, low=1)

    def edit(self, run: InterventionRun, layer: int, scores: Float[torch.Tensor, "batch head query key"],
             groups: QueryGroups) -> Float[torch.Tensor, "batch head query key"]:
        st = run.state
        oeb = groups.bridge.edit(scores)
        usable = groups.usable
        b, h, q, k = scores.shape
        dev = scores.device
        noise = hash_normal(
            torch.tensor(self.seed, device=dev), st.row_seed[:, None, None, None],
            torch.tensor(layer, device=dev), torch.arange(h, device=dev)[None, :, None, None],
            (groups.q_pos - st.pad[:, None])[:, None, :, None], (torch.arange(k, device=dev)[None, :] - st.pad[:, None])[:, None, None, :],
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
