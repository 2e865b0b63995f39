"""Step Momentum Injection (SMI) and its control `RandomMomentum`, on ``hook_v`` /
``hook_z``."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from jaxtyping import Float, Int

from ..checks import check_bool, check_int, check_real
from ..errors import StepflowError
from ..tl.adapter import TLModel, adapter, attn_hook
from .base import (
    Intervention, InterventionRun, LayerSpec, PerStateCache, check_layer_spec, hash_normal, resolve_layers,
)
from .state import THINKING, StepState


# --------------------------------------------------------------------------- momentum
class StepMomentum(Intervention):
    """Step Momentum Injection: ``z[t, h] += alpha * m_h`` at the first token t of a new
    thinking step (one that follows a thinking step), at every listed layer.

    ``m`` is built from the value vectors (``hook_v``, per KV head; query head h reads
    KV head ``h // (n_heads // n_kv_heads)``) of earlier thinking steps: with
    ``mean_j`` the mean over step j's tokens (its last ``window`` tokens if set) and f
    the first thinking step, ``m_{f+1} = mean_f`` and
    ``m_s = (1 - beta) mean_{s-1} + beta m_{s-1}``; ``beta = 0`` is the previous step only.

    The values of every position are kept per row on the device (one column appended
    per decoded token), so m is exact in KV-cached decoding where ``hook_v`` only sees
    the new token.

    Args:
        layers: layer spec (paper: top quarter).
        alpha: injection strength (paper: 0.06).
        beta: leaky-integrator decay over steps.
        window: only the last ``window`` tokens of each step (authors' code: 4).
        inject: ``"first"``: the first token of the new step only (the paper's rule).
        during_prefill: also inject at step starts inside the prompt of `generate`.
    """

    name = "smi"

    def __init__(self, layers: LayerSpec = "top_quarter", alpha: float = 0.06, beta: float = 0.0,
                 window: Optional[int] = None, inject: str = "first", during_prefill: bool = False,
                 seed: int = 0):
        who = type(self).__name__
        if inject != "first":
            raise StepflowError(f"{who}: inject must be 'first' (the first token of the new step), got {inject!r}")
        self.layers = check_layer_spec(layers, f"{who}: layers")
        # Any finite alpha: 0 injects nothing, a negative one pushes away from the
        # previous step (an ablation; the paper uses 0.06).
        self.alpha = check_real(f"{who}: alpha", alpha)
        self.beta = check_real(f"{who}: beta", beta, low=0.0, high=1.0, high_open=True)
        self.window = None if window is None else check_int(f"{who}: window (tokens, or None)", window, low=1)
        self.inject = inject
        self.during_prefill = check_bool(f"{who}: during_prefill", during_prefill)
        self.seed = check_int(f"{who}: seed", seed)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.layers!r}, alpha={self.alpha}, beta={self.beta}, "
                f"window={self.window})")

    def install(self, model: TLModel, state: StepState) -> InterventionRun:
        a = adapter(model)
        layers = resolve_layers(self.layers, model)
        run = InterventionRun(self.name, state)
        group = a.n_heads // a.n_kv_heads
        head_to_kv = torch.arange(a.n_heads, device=state.device) // group
        weights = PerStateCache()  # built once per forward, shared by the layers
        for layer in layers:
            values = run.row_buffer()
            run.hooks.append((attn_hook(layer, "v"), self._v_hook(run, values)))
            run.hooks.append((attn_hook(layer, "z"), self._z_hook(run, layer, values, head_to_kv, weights)))
        return run

    def _v_hook(self, run, values):
        def hook(v, hook):
            # v: [b, q, kv, d_head]. Values of every position so far live in a buffer
            # that doubles when full, so appending one token is O(1) amortised.
            k_len, q_len = run.state.n_pos, v.shape[1]
            start = k_len - q_len
            buf = values.get("v")
            if q_len == k_len or buf is None:
                buf = v.new_zeros((v.shape[0], max(2 * k_len, 16)) + tuple(v.shape[2:]))
                values["n"] = 0
            if values["n"] != start:
                raise StepflowError(
                    f"StepMomentum saw {values['n']} earlier positions, expected {start}"
                )
            if buf.shape[1] < k_len:
                grown = buf.new_zeros((buf.shape[0], 2 * k_len) + tuple(buf.shape[2:]))
                grown[:, :start] = buf[:, :start]
                buf = grown
            buf[:, start:k_len] = v.detach()
            values["v"], values["n"] = buf, k_len

        return hook

    def key_weights(self, state: StepState, q_len: int) -> torch.Tensor:
        """``w`` ``[b, q, k]`` (fp32) for the last ``q_len`` positions: the momentum of
        query ``q`` is ``m = sum_k w[q, k] v_k``, ``[b, q, kv, d_head]``.

        Depends on the state only, not on the layer, so one forward computes it once.
        """
        b, k_len = state.segment_code.shape
        dev = state.device
        k_pos = torch.arange(k_len, device=dev)
        q_pos = k_pos[k_len - q_len:]
        sid = state.step_id.long()  # [b, k]
        thinking = state.segment_code == THINKING
        idx = torch.where(thinking, sid, torch.full_like(sid, k_len))  # step index, k_len = none
        ends = torch.full((b, k_len + 1), -1, dtype=torch.long, device=dev)
        ends = ends.scatter_reduce(1, idx, k_pos.expand(b, -1), reduce="amax")
        in_window = thinking
        if self.window is not None:
            in_window = thinking & (ends.gather(1, idx) - k_pos[None, :] < self.window)
        counts = torch.zeros((b, k_len + 1), device=dev).scatter_add(1, idx, in_window.float())
        key_count = counts.gather(1, idx).clamp_min(1.0)  # [b, k]
        first = idx.amin(dim=1)  # [b]
        s_q = sid[:, k_len - q_len:]  # [b, q]
        lag = (s_q[:, :, None] - 1 - sid[:, None, :]).float()  # [b, q, k]
        earlier = in_window[:, None, :] & (lag >= 0) & (k_pos[None, None, :] < q_pos[None, :, None])
        decay = torch.pow(torch.tensor(self.beta, device=dev), lag.clamp_min(0))
        is_first = sid[:, None, :] == first[:, None, None]
        step_weight = torch.where(is_first, decay, (1.0 - self.beta) * decay)
        return torch.where(earlier, step_weight / key_count[:, None, :], torch.zeros_like(step_weight))

    def direction(self, run: InterventionRun, layer: int, m_heads: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """What is added to z: ``alpha * m`` ``[b, q, head, d_head]``."""
        return self.alpha * m_heads

    def _z_hook(self, run, layer, values, head_to_kv, weights: PerStateCache):
        def hook(z, hook):
            return self.edit_z(run, layer, z, lambda: values["v"][:, :run.state.n_pos], head_to_kv, weights)

        return hook

    def edit_z(self, run: InterventionRun, layer: int, z: Float[torch.Tensor, "batch query head d_head"],
               values: Callable[[], Float[torch.Tensor, "batch key kv_head d_head"]],
               head_to_kv: Int[torch.Tensor, "head"], weights: PerStateCache) -> Float[torch.Tensor, "batch query head d_head"]:
        """``z`` of one layer with the injection added for the rows of ``run.state``
        (the last ``query`` positions are the queries); what the TL hook on ``hook_z``
        returns and what the vLLM engine applies to the input of ``o_proj``.
        ``values()`` gives the value vectors of every position of the state (called only
        when something may fire); ``weights`` caches the key weights per state."""
        st = run.state
        if st.phase == "prefill" and not self.during_prefill:
            return z
        q_len, k_len = z.shape[1], st.n_pos
        if q_len == 1 and st.last_starts_step is False:
            return z  # a decoded token that starts no step: nothing fires
        w = weights.get(st, q_len, lambda: self.key_weights(st, q_len))  # [b, q, k]
        v_hist = values().float()  # [b, k, kv, d]
        m = torch.einsum("bqk,bkvd->bqvd", w, v_hist)[:, :, head_to_kv]  # [b, q, head, d]
        q_pos = torch.arange(k_len - q_len, k_len, device=z.device)
        add = self.direction(run, layer, m, q_pos)
        fire = st.new_step[:, k_len - q_len:]
        if not self.during_prefill:
            fire = fire & ~st.prefill[:, k_len - q_len:]
        add = add * fire[:, :, None, None]
        norm = add.norm(dim=-1).transpose(1, 2)  # [b, head, q]
        run.record("inject", layer, k_len - q_len,
                   fired=fire[:, None, :].expand_as(norm) & (norm > 0), norm=norm)
        return (z.float() + add).to(z.dtype)


class RandomMomentum(StepMomentum):
    """Control: at the same positions and layers as SMI, a random direction per head
    (seeded per row, layer and position) scaled to the norm of ``alpha * m_h``."""

    name = "random_momentum"

    def direction(self, run: InterventionRun, layer: int, m_heads: Float[torch.Tensor, "batch query head d_head"], q_pos: Int[torch.Tensor, "query"]):
        st = run.state
        dev = m_heads.device
        b, q, h, d = m_heads.shape
        noise = hash_normal(
            torch.tensor(self.seed, device=dev), st.row_seed[:, None, None, None],
            torch.tensor(layer, device=dev), (q_pos[None, :] - st.pad[:, None])[:, :, None, None],
            torch.arange(h, device=dev)[None, None, :, None], torch.arange(d, device=dev)[None, None, None, :],
        )
        unit = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return unit * (self.alpha * m_heads).norm(dim=-1, keepdim=True)
