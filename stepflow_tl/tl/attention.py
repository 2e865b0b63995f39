"""Tiled attention: exact softmax attention that never forms a ``T x T`` matrix.

`TiledAttention` is an autograd function that computes a layer's attention the way
FlashAttention does, in tiles of query rows x keys:

- forward: for each block of query rows, the keys are visited a tile at a time with an
  online softmax; only the output ``z`` and the row log-sum-exp are kept (``O(T d)``);
- backward: each tile of ``A`` is recomputed from the rotated queries and keys and the
  row log-sum-exp, and the gradients of q, k, v follow FlashAttention's backward. The
  tile's ``A`` and ``dL/dA`` (``dL/dz . V^T``, 0 on masked pairs) are handed to a
  callback, which is how `stepflow_tl.saliency` pools Step-Saliency (any of its rules)
  without the attention matrix.

Tiles above the causal diagonal (and before a sliding window) are skipped, not
masked. Grouped-query heads share their key/value head without copying: the query
heads of one group are stacked along the rows of the tile.

`TiledAttentionScope` installs the function in the attention of a ``TransformerBridge``
(Llama/Qwen2/Mistral-style rotary attention, `PositionEmbeddingsAttentionBridge`) or
a ``HookedTransformer``, for the duration of a ``with`` block. Reproducing each
backend's attention up to its rotated q and k is backend code, so it lives here, next
to the adapter. It refuses attention it cannot reproduce exactly (soft-capping, ALiBi,
relative biases, QK-norms other than Qwen3's, gates, KV caches, ...) with a
`StepflowError`.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch.autograd.function import FunctionCtx

from ..checks import check_int
from ..errors import StepflowError
from .adapter import TLModel, adapter, with_cache_alias
from .bypass import HookCensus, watched

TileFn = Callable[[slice, slice, torch.Tensor, torch.Tensor], None]

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Scores and softmax in fp32 at least (float64 models keep float64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class TileSpec:
    """The mask of a layer's attention, as position rules rather than a matrix.

    Attributes:
        scale: multiplier of ``q . k``.
        causal: keys after the query are masked.
        window: sliding window, keys ``k <= t - window`` are masked (None: no window).
        block: tile side in tokens.
    """

    def __init__(self, scale: float, causal: bool = True, window: Optional[int] = None,
                 block: int = 256):
        if window is not None and window < 1:
            raise StepflowError(f"sliding window must be >= 1, got {window}")
        self.scale = float(scale)
        self.causal = causal
        self.window = window
        self.block = int(block)

    def key_range(self, q0: int, q1: int, n_keys: int) -> tuple:
        """Keys ``[lo, hi)`` that query rows ``[q0, q1)`` may see."""
        lo = 0 if self.window is None else max(0, q0 - self.window + 1)
        hi = min(n_keys, q1) if self.causal else n_keys
        return lo, hi

    def tile_mask(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> Optional[torch.Tensor]:
        """``[q, k]`` bool of allowed pairs, or None when the whole tile is allowed."""
        inside_causal = not self.causal or k1 - 1 <= q0
        inside_window = self.window is None or k0 > q1 - 1 - self.window
        if inside_causal and inside_window:
            return None
        t = torch.arange(q0, q1, device=device)[:, None]
        k = torch.arange(k0, k1, device=device)[None, :]
        allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
        if self.causal:
            allowed &= k <= t
        if self.window is not None:
            allowed &= k > t - self.window
        return allowed


class TiledAttention(torch.autograd.Function):
    """``z = softmax(scale * q k^T + mask [+ sink column]) v`` without the ``T x T`` matrix.

    Inputs (grouped layout: ``n = batch * kv_head``, ``g`` query heads per kv head):
        q: ``[n, g, T, d]``; k, v: ``[n, T, d]``;
        key_valid: ``[n, T]`` bool or None (False: padding, never attended);
        sinks: ``[n, g]`` sink logits (GPT-OSS) or None;
        spec: `TileSpec`; on_tile: called in backward as ``on_tile(rows, cols, a, da)``
        with the tile's ``A`` and ``dL/dA`` (``[n, g, q, k]``; ``dL/dA`` is 0 on masked
        pairs, where ``A`` is 0 by construction), or None. Both are lent for the call:
        backward reuses their memory once it returns.

    Rows with no allowed key (left padding) give ``z = 0``.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: Float[torch.Tensor, "batch_kv group pos d_head"],
        k: Float[torch.Tensor, "batch_kv pos d_head"],
        v: Float[torch.Tensor, "batch_kv pos d_head"],
        key_valid: Optional[Bool[torch.Tensor, "batch_kv pos"]],
        sinks: Optional[Float[torch.Tensor, "batch_kv group"]],
        spec: TileSpec,
        on_tile: Optional[TileFn],
    ) -> Float[torch.Tensor, "batch_kv group pos d_head"]:
        cd = _compute_dtype(q)
        n, g, T, d = q.shape
        n_k = k.shape[1]
        out = torch.zeros(n, g, T, d, dtype=cd, device=q.device)
        lse = torch.empty(n, g, T, dtype=cd, device=q.device)
        kt, vc = k.to(cd).transpose(-1, -2), v.to(cd)
        for q0 in range(0, T, spec.block):
            q1 = min(T, q0 + spec.block)
            rows = q1 - q0
            qb = _query_block(q, q0, q1, spec.scale, cd)
            m = torch.full((n, g * rows), -torch.inf, dtype=cd, device=q.device)
            l = torch.zeros(n, g * rows, dtype=cd, device=q.device)
            acc = torch.zeros(n, g * rows, d, dtype=cd, device=q.device)
            lo, hi = spec.key_range(q0, q1, n_k)
            for k0 in range(lo, hi, spec.block):
                k1 = min(hi, k0 + spec.block)
                s, _ = _scores(qb, kt, key_valid, spec, q0, q1, k0, k1, g)
                m_new = torch.maximum(m, s.amax(-1))
                shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = s.sub_(shift[..., None]).exp_()  # in place: the scores are not needed again
                rescale = torch.exp(m - shift)
                l = l.mul_(rescale).add_(p.sum(-1))
                acc = torch.baddbmm(acc.mul_(rescale[..., None]), p, vc[:, k0:k1])
                m = m_new
            block_lse = m + torch.log(l)
            if sinks is not None:
                sink = sinks.to(cd)[:, :, None].expand(n, g, rows).reshape(n, g * rows)
                block_lse = torch.logaddexp(block_lse, sink)
            # A row with no visible key (and no sink) has lse -inf: +inf makes its
            # probabilities exp(s - inf) = 0 in backward and its output 0 here.
            block_lse = torch.where(torch.isneginf(block_lse), torch.full_like(block_lse, torch.inf), block_lse)
            shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            acc = acc * torch.exp(shift - block_lse)[..., None]
            out[:, :, q0:q1] = acc.reshape(n, g, rows, d)
            lse[:, :, q0:q1] = block_lse.reshape(n, g, rows)
        ctx.spec, ctx.on_tile = spec, on_tile
        ctx.has_valid, ctx.has_sinks = key_valid is not None, sinks is not None
        ctx.save_for_backward(q, k, v, out, lse,
                              *([key_valid] if key_valid is not None else []),
                              *([sinks] if sinks is not None else []))
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, dout: Float[torch.Tensor, "batch_kv group pos d_head"]) -> tuple:
        q, k, v, out, lse, *rest = ctx.saved_tensors
        key_valid = rest.pop(0) if ctx.has_valid else None
        sinks = rest.pop(0) if ctx.has_sinks else None
        spec, on_tile = ctx.spec, ctx.on_tile
        cd = out.dtype
        n, g, T, d = q.shape
        n_k = k.shape[1]
        dout = dout.to(cd)
        delta = (dout * out).sum(-1)  # [n, g, T]: sum_k A dP = dz . z
        dq = torch.empty(n, g, T, d, dtype=cd, device=q.device)
        # dk and dv accumulate over query blocks; the scale of dk and dq is applied once, at the end
        dk = torch.zeros(k.shape, dtype=cd, device=q.device)
        dv = torch.zeros(v.shape, dtype=cd, device=q.device)
        kc, vc = k.to(cd), v.to(cd)
        kt, vt = kc.transpose(-1, -2), vc.transpose(-1, -2)
        for q0 in range(0, T, spec.block):
            q1 = min(T, q0 + spec.block)
            rows = q1 - q0
            qb = _query_block(q, q0, q1, spec.scale, cd)  # scaled: s = qb k^T, and dk = ds^T qb
            dob = dout[:, :, q0:q1].reshape(n, g * rows, d)
            lse_b = lse[:, :, q0:q1].reshape(n, g * rows)[..., None]
            delta_b = delta[:, :, q0:q1].reshape(n, g * rows)[..., None]
            dqb = torch.zeros(n, g * rows, d, dtype=cd, device=q.device)
            lo, hi = spec.key_range(q0, q1, n_k)
            for k0 in range(lo, hi, spec.block):
                k1 = min(hi, k0 + spec.block)
                s, allowed = _scores(qb, kt, key_valid, spec, q0, q1, k0, k1, g)
                p = s.sub_(lse_b).exp_()  # in place; masked pairs: exp(-inf) = 0
                dp = dob @ vt[:, :, k0:k1]
                if on_tile is not None:
                    if allowed is not None:
                        dp.masked_fill_(~allowed, 0.0)  # dL/dA is 0 where the attention cannot look
                    shape = (n, g, rows, k1 - k0)
                    on_tile(slice(q0, q1), slice(k0, k1), p.view(shape), dp.view(shape))
                ds = dp.sub_(delta_b).mul_(p)  # in place: dp was only lent to on_tile
                dv[:, k0:k1].baddbmm_(p.transpose(-1, -2), dob)
                dqb.baddbmm_(ds, kc[:, k0:k1])
                dk[:, k0:k1].baddbmm_(ds.transpose(-1, -2), qb)
            dq[:, :, q0:q1] = dqb.reshape(n, g, rows, d)
        dq.mul_(spec.scale)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[4]:
            # the sink column's own probability times (0 - delta): it carries no value
            dsinks = -(torch.exp(sinks.to(cd)[:, :, None] - lse) * delta).sum(-1).to(sinks.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, dsinks, None, None


def _query_block(q, q0, q1, scale, cd):
    """Query rows ``[q0, q1)`` of every head of a group, scaled, ``[n, g * rows, d]``."""
    n, g, _, d = q.shape
    return (q[:, :, q0:q1].to(cd) * scale).reshape(n, g * (q1 - q0), d)


def _scores(qb, kt, key_valid, spec, q0, q1, k0, k1, g):
    """Masked scores of one tile, ``[n, g * rows, cols]`` (masked pairs are -inf), from the
    scaled query block and the transposed keys, and the tile's allowed pairs (None: all)."""
    n = qb.shape[0]
    s = qb @ kt[:, :, k0:k1]
    allowed = spec.tile_mask(q0, q1, k0, k1, qb.device)
    if allowed is not None:
        allowed = allowed.repeat(g, 1)[None]  # [1, g * rows, cols], the group's heads stacked on rows
    if key_valid is not None:
        valid = key_valid[:, None, k0:k1]
        allowed = valid if allowed is None else allowed & valid
    if allowed is not None:
        s.masked_fill_(~allowed, -torch.inf)
    return s, allowed


def tiled_attention_heads(
    q: Float[torch.Tensor, "batch head pos d_head"],
    k: Float[torch.Tensor, "batch kv_head pos d_head"],
    v: Float[torch.Tensor, "batch kv_head pos d_head"],
    spec: TileSpec,
    *,
    key_valid: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    on_tile: Optional[TileFn] = None,
) -> Float[torch.Tensor, "batch head pos d_head"]:
    """Attention output of every head, as ``softmax(scale q k^T + mask) v``, tiled.

    Args:
        q: rotated queries; k, v: rotated keys and values of the ``kv_head`` groups
            (query head ``h`` uses kv head ``h // (head / kv_head)``, as ``repeat_kv``).
        key_valid: ``[batch, pos]``, False on padding.
        sinks: ``[head]`` attention-sink logits, or None.
        on_tile: receives ``(rows, cols, a, da)`` during backward: the tile's ``A`` and
            ``dL/dA``, each ``[batch * kv_head, group, q, k]``, valid during the call only.
    """
    b, h, T, d = q.shape
    kvh = k.shape[1]
    if h % kvh:
        raise StepflowError(f"{h} query heads do not split into {kvh} key/value heads")
    g = h // kvh
    qg = q.reshape(b * kvh, g, T, d)
    kg, vg = k.reshape(b * kvh, -1, d), v.reshape(b * kvh, -1, d)
    valid = None if key_valid is None else key_valid.bool()[:, None].expand(b, kvh, -1).reshape(b * kvh, -1)
    sink = None if sinks is None else sinks.reshape(1, kvh, g).expand(b, -1, -1).reshape(b * kvh, g)
    out = TiledAttention.apply(qg, kg, vg, valid, sink, spec, on_tile)
    return out.reshape(b, h, T, d)


# ---------------------------------------------------------------------- installing it in models
class TiledAttentionScope:
    """Run the attention of ``model``'s blocks with `tiled_attention_heads`, for a ``with`` block.

    Args:
        model: ``TransformerBridge`` or ``HookedTransformer``.
        on_tile: ``layer -> TileFn or None``: the pooler of each layer (None: no pooling).
        block: side of a square tile in tokens (default `BLOCK`).

    Each attention module's ``forward`` is shadowed (instance ``__dict__``), then restored.
    The hooks on ``O(T d)`` tensors still fire where the model fires them (``hook_q``,
    ``hook_k``, ``hook_v``, ``hook_rot_q``, ``hook_rot_k``, ``hook_z``), and their edits
    flow through; ``hook_attn_scores`` and ``hook_pattern`` do not, as no pattern exists:
    a hook installed on them makes this raise rather than be ignored.
    """

    # Side of a square tile, in tokens: a tile of 9 heads is 2.4 MB in fp32, and a 32k
    # trace has 8k tiles per pass per layer, few enough for a Python loop.
    BLOCK = 256

    def __init__(self, model: TLModel, on_tile: Callable[[int], Optional[TileFn]], block: Optional[int] = None):
        self.model = model
        self.kind = adapter(model).kind
        self.on_tile = on_tile
        self.block = self.BLOCK if block is None else check_int("block (tile side in tokens)", block, low=1)
        self._stack = ExitStack()

    def __enter__(self):
        try:
            for layer, block in enumerate(self.model.blocks):
                attn = block.attn
                _refuse_pattern_hooks(attn, layer)
                make = _bridge_forward if self.kind == "bridge" else _hooked_forward
                vars(attn)["forward"] = make(attn, layer, self)
                self._stack.callback(vars(attn).pop, "forward", None)
            if self.kind == "bridge":
                self._stack.enter_context(_NoMaterialisedMask(self.model))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def tiled_unsupported_reason(model: TLModel) -> Optional[str]:
    """Why `TiledAttentionScope` would refuse ``model``, or None if it runs it."""
    try:
        with TiledAttentionScope(model, lambda layer: None):
            pass
    except StepflowError as error:
        return str(error)
    return None


def _refuse_pattern_hooks(attn, layer: int) -> None:
    for name in ("hook_attn_scores", "hook_pattern"):
        point = getattr(attn, name, None)
        if point is not None and (point.fwd_hooks or point.bwd_hooks):
            raise StepflowError(
                f"blocks.{layer}.attn.{name} has hooks, but tiled attention forms no "
                "T x T scores or pattern, so they would not run; remove them or use "
                "mode='bounded' (which runs the model's own attention)"
            )


class _NoMaterialisedMask:
    """Let transformers pass a 2D padding mask (or None), not a ``[batch, 1, T, T]`` one.

    The eager mask of a 32k trace is 4 GiB in fp32. The flash-attention mask interface
    of ``transformers.masking_utils`` returns None when nothing is padded and the 2D
    ``[batch, T]`` padding mask otherwise; the tiled forward applies the causal and
    sliding-window rules itself. Only the mask builder reads this setting: the
    bridge's attention is our own function for the duration.
    """

    def __init__(self, model):
        self.config = model.original_model.config
        self.before = None

    def __enter__(self):
        self.before = self.config._attn_implementation
        self.config._attn_implementation = "flash_attention_2"
        return self

    def __exit__(self, *exc):
        self.config._attn_implementation = self.before
        return False


def _unsupported(layer: int, what: str) -> StepflowError:
    return StepflowError(
        f"blocks.{layer}.attn: tiled attention cannot reproduce {what} exactly; "
        "use mode='bounded' or mode='dense'"
    )


def _key_valid(attention_mask, layer: int) -> Optional[torch.Tensor]:
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2:
        raise _unsupported(layer, f"a {attention_mask.ndim}-D attention mask (tiled attention takes a 2-D padding mask)")
    return attention_mask.bool()


def _bridge_refusal(attn) -> Optional[str]:
    """What of ``attn`` (a bridge attention) the reimplemented forward cannot reproduce
    exactly, or None."""
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    if not isinstance(attn, PositionEmbeddingsAttentionBridge) or (
        type(attn).forward is not PositionEmbeddingsAttentionBridge.forward
    ) or type(attn)._pre_output_projection is not PositionEmbeddingsAttentionBridge._pre_output_projection:
        return (f"{type(attn).__name__} (only rotary attention of "
                "PositionEmbeddingsAttentionBridge: Llama, Qwen2, Mistral, ...)")
    hf = attn.original_component
    cfg = attn.config
    checks = [
        (getattr(hf, "attn_logit_softcapping", None) is not None, "attention-logit soft-capping"),
        (bool(getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False)), "split q/k/v inputs"),
        (bool(getattr(cfg, "use_attn_result", False)), "use_attn_result (per-head results)"),
        (bool(getattr(cfg, "gated_q_proj", False)) or "gate" in attn.submodules, "gated attention"),
        (("q_norm" in attn.submodules or "k_norm" in attn.submodules) and not _plain_qk_norm(attn),
         "QK-norms other than Qwen3's (per-head RMSNorm before the rotary embedding)"),
        (getattr(hf, "key_multiplier", None) is not None, "a key multiplier"),
        (getattr(getattr(hf, "config", None), "clip_qkv", None) is not None, "clip_qkv"),
        (bool(getattr(cfg, "rotary_interleaved_cos_sin", False) or getattr(cfg, "rotary_adjacent_pairs", False)),
         "adjacent-pair rotary embeddings"),
        (isinstance(getattr(getattr(hf, "config", None), "rope_parameters", None), dict)
         and hf.config.rope_parameters.get("llama_4_scaling_beta") is not None, "llama-4 query scaling"),
        (attn.training and getattr(hf, "attention_dropout", 0.0) > 0, "attention dropout in training mode"),
        (not attn.is_causal or getattr(attn, "is_cross_attention", False), "non-causal or cross attention"),
    ]
    return next((what for bad, what in checks if bad), None)


def _check_bridge_attention(attn, layer: int) -> None:
    what = _bridge_refusal(attn)
    if what is not None:
        raise _unsupported(layer, what)


def _plain_qk_norm(attn) -> bool:
    """Qwen3's QK-norm: one ``[d_head]`` norm over each head's q (and k), before RoPE."""
    return (
        getattr(attn, "_qk_norm_phase", None) == "post_reshape" and not getattr(attn, "_qk_norm_per_head", False)
        and not getattr(attn.config, "qk_norm_after_rope", False)
    )


def _bridge_rotated_qkv(attn, layer: int, hidden, position_embeddings):
    """The bridge's rotary attention (TL 4.x `PositionEmbeddingsAttentionBridge.forward`)
    from ``hook_in`` to ``hook_rot_k``, with the same hooks and operations: rotated
    ``q [batch, head, pos, d_head]``, ``k``, ``v [batch, kv_head, pos, d_head]``, and the
    input shape ``(batch, pos)``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim = attn.original_component.head_dim
    hidden = _fire(attn.hook_in, hidden)
    input_shape = hidden.shape[:-1]
    shape = (*input_shape, -1, head_dim)
    q = _project(attn.q, hidden).view(shape).transpose(1, 2)
    k = _project(attn.k, hidden).view(shape).transpose(1, 2)
    v = _project(attn.v, hidden).view(shape).transpose(1, 2)
    if "q_norm" in attn.submodules:
        q = attn.hook_q_normed(attn.q_norm(q))
    if "k_norm" in attn.submodules:
        k = attn.hook_k_normed(attn.k_norm(k))
    if position_embeddings is None:
        if getattr(attn.config, "positional_embedding_type", None) == "rotary":
            raise _unsupported(layer, "rotary attention without position embeddings")
    else:
        from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

        cos, sin = attn._apply_position_embedding_hooks(position_embeddings)
        rotary_dim = cos.shape[-1]
        if rotary_dim * 2 == head_dim and get_rotary_pct_from_config(attn.config) == 1.0:
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        elif rotary_dim < head_dim:
            q_rot, k_rot = apply_rotary_pos_emb(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
            q = torch.cat([q_rot, q[..., rotary_dim:]], dim=-1)
            k = torch.cat([k_rot, k[..., rotary_dim:]], dim=-1)
        else:
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if hasattr(attn, "hook_rot_q"):
        q = _fire(attn.hook_rot_q, q)
    if hasattr(attn, "hook_rot_k"):
        k = _fire(attn.hook_rot_k, k)
    return q, k, v, input_shape


def _fire(point, x: torch.Tensor) -> torch.Tensor:
    """``point(x)`` for a hook point: skipped where nothing watches it (a hook point is the
    identity without hooks, and the module call is a real share of a decoding step)."""
    return point(x) if watched(point) else x


def _project(linear, x: torch.Tensor) -> torch.Tensor:
    """A bridge's linear map of ``x`` as the bridge's own forward computes it (``hook_in``,
    the wrapped ``nn.Linear``, ``hook_out``, the record in ``_fired_hook_out``), without
    the bridge's module call where nothing watches the bridge or its ``nn.Linear``, and
    without calling the hook points nothing watches."""
    if type(linear).__name__ != "LinearBridge" or linear._suppress_next_hook_in or not _plain_linear(linear):
        return linear(x)
    out = _fire(linear.hook_out, linear.original_component(_fire(linear.hook_in, x)))
    object.__setattr__(linear, "_fired_hook_out", True)
    return out


def _plain_linear(linear) -> bool:
    """Whether calling a linear bridge does no more than its ``forward`` (no torch hook on
    and no replaced ``forward`` of it or its ``nn.Linear``)."""
    return not watched(linear) and not watched(linear.original_component)


def _linear_call(linear):
    """What computes a linear bridge's output as its call does: its ``nn.Linear`` alone
    where no hook point of it is watched either (the caller records ``_fired_hook_out``),
    `_project` where one is, else the bridge."""
    if not _plain_linear(linear):
        return linear
    if not watched(linear.hook_in) and not watched(linear.hook_out):
        return linear.original_component
    return functools.partial(_project, linear)


def _bridge_output(attn, z, input_shape):
    """``z [batch, head, pos, d_head]`` through the bridge's output projection (``hook_z``
    is ``o.hook_in``) and ``hook_out``, as the bridge's forward returns it."""
    z = z.transpose(1, 2).reshape(*input_shape, -1)
    o_weight = getattr(attn.o.original_component, "weight", None)
    if isinstance(o_weight, torch.Tensor) and o_weight.dtype.is_floating_point and z.dtype != o_weight.dtype:
        z = z.to(o_weight.dtype)
    return _fire(attn.hook_out, _project(attn.o, z)), None


def _bridge_forward(attn, layer: int, owner: TiledAttentionScope):
    """The bridge's rotary attention forward with `tiled_attention_heads` for the
    softmax attention."""
    _check_bridge_attention(attn, layer)
    hf = attn.original_component
    # Qwen2/GPT-OSS store the window of sliding layers on the module (None on full
    # layers); Mistral passes its config's window to every layer.
    window = hf.sliding_window if hasattr(hf, "sliding_window") else getattr(hf.config, "sliding_window", None)
    spec = TileSpec(getattr(hf, "scaling", hf.head_dim ** -0.5), causal=True, window=window, block=owner.block)

    def forward(*args, **kwargs):
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.pop("position_embeddings", None)
        attention_mask = kwargs.pop("attention_mask", None)
        # transformers 5.24 renamed the layer's past_key_values to cache
        if any(kwargs.get(name) is not None for name in ("past_key_values", "past_key_value", "cache")):
            raise _unsupported(layer, "a KV cache")
        q, k, v, input_shape = _bridge_rotated_qkv(attn, layer, hidden, position_embeddings)
        z = tiled_attention_heads(
            q, k, v, spec, key_valid=_key_valid(attention_mask, layer),
            sinks=getattr(hf, "sinks", None), on_tile=owner.on_tile(layer),
        )
        return _bridge_output(attn, z, input_shape)

    return forward


def _hooked_refusal(attn) -> Optional[str]:
    """What of ``attn`` (a TL 3.9 attention) the reimplemented forward cannot reproduce
    exactly, or None."""
    cfg = attn.cfg
    checks = [
        (cfg.positional_embedding_type in ("alibi", "relative_positional_bias"),
         f"{cfg.positional_embedding_type} position biases"),
        (cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"), "QK-norms"),
        (cfg.clip_qkv is not None, "clip_qkv"),
        (bool(cfg.use_logn_attn), "log-n attention scaling"),
        (bool(cfg.attn_scores_soft_cap and cfg.attn_scores_soft_cap > 0), "attention-score soft-capping"),
        (bool(cfg.use_attn_result), "use_attn_result (hook_result)"),
        (bool(cfg.load_in_4bit), "4-bit weights"),
        ((attn._attention_dir_override or cfg.attention_dir) != "causal", "non-causal attention"),
        (bool(getattr(cfg, "ungroup_grouped_query_attention", False)), "ungrouped grouped-query attention"),
    ]
    return next((what for bad, what in checks if bad), None)


def _hooked_output(attn, z):
    """``z [batch, pos, head, d_head]`` (after ``hook_z``) through TL 3.9's output projection."""
    import torch.nn.functional as F

    w = attn.W_O.reshape(-1, attn.W_O.shape[-1]).T.contiguous()  # [d_model, head*d_head]
    z = z.to(w.dtype).reshape(z.shape[0], z.shape[1], -1)
    return F.linear(z, w.to(z.device), attn.b_O.to(z.device))


def _hooked_forward(attn, layer: int, owner: TiledAttentionScope):
    """TL 3.9 ``AbstractAttention.forward`` for causal rotary/standard attention, with
    the same hooks up to ``hook_rot_k`` and ``hook_z``, then the output projection."""
    what = _hooked_refusal(attn)
    if what is not None:
        raise _unsupported(layer, what)
    cfg = attn.cfg
    window = cfg.window_size if attn.attn_type == "local" else None
    spec = TileSpec(1.0 / attn.attn_scale, causal=True, window=window, block=owner.block)

    def forward(query_input, key_input, value_input, past_kv_cache_entry=None,
                additive_attention_mask=None, attention_mask=None, position_bias=None):
        if past_kv_cache_entry is not None:
            raise _unsupported(layer, "a KV cache")
        if additive_attention_mask is not None:
            raise _unsupported(layer, "an additive attention mask")
        q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
        if cfg.positional_embedding_type == "rotary":
            q = attn.hook_rot_q(attn.apply_rotary(q, 0, attention_mask))
            k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
        z = tiled_attention_heads(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spec,
            key_valid=_key_valid(attention_mask, layer),
            sinks=attn.sinks if getattr(cfg, "use_attention_sinks", False) else None, on_tile=owner.on_tile(layer),
        )
        return _hooked_output(attn, attn.hook_z(z.transpose(1, 2)))

    return forward


# ---------------------------------------------------------------------- fused attention
class fused_attention:
    """Run attention with torch's fused ``scaled_dot_product_attention`` in every layer
    whose scores and pattern nothing reads, for a ``with`` block.

    The choice is made at every call of every layer, from the hooks present at that
    moment: a layer with any hook on ``hook_attn_scores`` or ``hook_pattern`` (an
    intervention such as OEB, the step hook points of `attach_trace`, saliency's
    pattern hooks, a user's ``run_with_hooks`` / ``run_with_cache``) runs the backend's
    own explicit attention, so every such hook fires as before. Fused layers fire every
    other hook (``hook_q`` .. ``hook_rot_k``, ``hook_z``, ``hook_out``) where the
    backend fires it, and their edits flow through.

    The fused kernel computes the same softmax attention in another order of floating
    point operations (outputs agree to rounding, ~1e-7 relative in fp32). Layers whose
    attention it cannot reproduce exactly (the `TiledAttentionScope` refusals, attention
    sinks, a mask other than the backend's usual one) keep the explicit path; a layer
    whose ``forward`` is already replaced (e.g. by `TiledAttentionScope`) is left alone.
    """

    def __init__(self, model):
        self.model = model
        self.kind = adapter(model).kind
        self._stack = ExitStack()

    def __enter__(self):
        try:
            for layer, block in enumerate(self.model.blocks):
                attn = block.attn
                if "forward" in vars(attn):
                    continue
                if self.kind == "bridge":
                    reason = _bridge_refusal(attn) or (
                        "attention sinks" if getattr(attn.original_component, "sinks", None) is not None else None)
                    make = _bridge_fused_forward
                else:
                    reason = _hooked_refusal(attn) or (
                        "attention sinks" if getattr(attn.cfg, "use_attention_sinks", False) else None)
                    make = _hooked_fused_forward
                if reason is None:
                    vars(attn)["forward"] = make(attn, layer)
                    self._stack.callback(vars(attn).pop, "forward", None)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def pattern_is_read(attn) -> bool:
    """Whether any hook sits on ``attn``'s scores or pattern (the explicit path's tensors)."""
    for name in ("hook_attn_scores", "hook_pattern"):
        point = getattr(attn, name, None)
        if point is not None and (point.fwd_hooks or point.bwd_hooks):
            return True
    return False


def _fused_heads(q, k, v, mask, scale):
    """``softmax(scale q k^T + mask) v`` by torch's fused kernel, ``q [batch, head, q, d]``,
    ``k``, ``v [batch, kv_head, k, d]``; ``mask`` is boolean (True: attend) or additive.
    A query row with no visible key gives 0, as the explicit paths' NaN scrub does (such
    rows are the padding queries of a prefill; a single decoded token sees at least
    itself, so a decoding step skips the scrub)."""
    z = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return torch.nan_to_num(z, nan=0.0) if q.shape[-2] > 1 else z


def _bridge_fused_forward(attn, layer: int):
    """The bridge's attention forward with the fused kernel, when nothing reads its pattern.

    The bridge receives transformers' eager mask: ``[batch, 1, q, k]`` additive, causal
    (and sliding-window) rules included, which the fused kernel takes as it is; any other
    mask runs the bridge's own forward. A layer whose scores or pattern a hook reads runs
    `_bridge_explicit_heads` (TL 4.x; TL 3.9's bridge runs its own forward). The rest runs
    as `_AttentionPlan`; both choices are made again only when the layer's hooks change
    (`HookCensus`)."""
    explicit = type(attn).forward
    hf = attn.original_component
    scale = getattr(hf, "scaling", hf.head_dim ** -0.5)
    own_explicit = hasattr(attn, "_masked_softmax")
    census = HookCensus(_AttentionPlan.consulted(attn))
    plan: dict = {"key": None, "plan": None, "read": None}

    def forward(*args, **kwargs):
        kwargs = with_cache_alias(kwargs)
        mask = kwargs.get("attention_mask")
        key = census.key()
        if key != plan["key"]:
            plan["plan"], plan["read"], plan["key"] = _AttentionPlan.of(attn), pattern_is_read(attn), key
        planned, read = plan["plan"], plan["read"]
        if mask is None or mask.ndim != 4 or (read and not own_explicit):
            return explicit(attn, *args, **kwargs)
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.pop("position_embeddings", None)
        kwargs.pop("attention_mask")
        if planned is not None and planned.takes(position_embeddings):
            q, k, v, input_shape = planned.rotated_qkv(hidden, position_embeddings)
        else:
            planned = None
            q, k, v, input_shape = _bridge_rotated_qkv(attn, layer, hidden, position_embeddings)
        k, v = attn._update_kv_cache(k, v, **kwargs)
        if read:
            z, pattern = _bridge_explicit_heads(attn, q, k, v, mask, scale)
        else:
            mask = mask[..., : k.shape[-2]]
            if mask.shape[-2] != q.shape[-2]:
                mask = mask[..., -q.shape[-2]:, :]
            z, pattern = _fused_heads(q, k, v, mask.to(q.dtype) if mask.is_floating_point() else mask, scale), None
        out = planned.output(z, input_shape) if planned is not None else _bridge_output(attn, z, input_shape)[0]
        return out, pattern

    forward.aliases_cache = True
    return forward


class _AttentionPlan:
    """`_bridge_rotated_qkv` and `_bridge_output` with every choice they make per call
    (fire a hook point or skip it, call a linear bridge or the ``nn.Linear`` it wraps)
    made once from the hooks present: the same operations, on modules held directly,
    without asking every hook point and bridge attribute at every call. Rebuilt whenever
    the layer's hooks change (`HookCensus`); the scores and pattern are
    `_bridge_explicit_heads`' business."""

    def __init__(self, attn, linears):
        self.linears = linears
        self.q, self.k, self.v, self.o = calls = [_linear_call(linear) for linear in linears]
        # the bridges whose nn.Linear the plan calls itself, so it records their hook_out
        self.bare = [linear for linear, call in zip(linears, calls) if call is linear.original_component]
        self.hook_in, self.hook_rot_q, self.hook_rot_k, self.hook_out = (
            point if point is not None and watched(point) else None
            for point in (attn.hook_in, getattr(attn, "hook_rot_q", None), getattr(attn, "hook_rot_k", None),
                          attn.hook_out))
        self.rotary_hooks = attn._apply_position_embedding_hooks if (
            watched(attn.hook_cos) or watched(attn.hook_sin)) else None
        self.head_dim = attn.original_component.head_dim
        o_weight = getattr(linears[3].original_component, "weight", None)
        self.o_dtype = o_weight.dtype if isinstance(o_weight, torch.Tensor) and o_weight.dtype.is_floating_point else None

    @classmethod
    def of(cls, attn) -> Optional["_AttentionPlan"]:
        """The plan of ``attn``, or None where `_bridge_rotated_qkv` does more than it
        (QK-norms, other projections)."""
        linears = [getattr(attn, name, None) for name in ("q", "k", "v", "o")]
        if (any(type(linear).__name__ != "LinearBridge" for linear in linears)
                or "q_norm" in attn.submodules or "k_norm" in attn.submodules
                or not all(hasattr(attn, name) for name in ("hook_in", "hook_out", "hook_cos", "hook_sin"))):
            return None
        return cls(attn, linears)

    @staticmethod
    def consulted(attn) -> list:
        """The modules whose hooks the plan depends on: every hook point, the linear
        bridges and what they wrap (the wrapped attention module is never called)."""
        from transformer_lens.hook_points import HookPoint

        linears = [m for m in attn.modules() if type(m).__name__ == "LinearBridge"]
        return ([m for m in attn.modules() if isinstance(m, HookPoint)] + linears
                + [linear.original_component for linear in linears])

    def takes(self, position_embeddings) -> bool:
        """Whether this call is the plain rotary case (full-width cos and sin, nothing
        waiting to suppress a linear's ``hook_in``)."""
        return (isinstance(position_embeddings, tuple) and len(position_embeddings) == 2
                and position_embeddings[0].shape[-1] == self.head_dim
                and not any(linear._suppress_next_hook_in for linear in self.linears))

    def rotated_qkv(self, hidden, position_embeddings):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if self.hook_in is not None:
            hidden = self.hook_in(hidden)
        input_shape = hidden.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q = self.q(hidden).view(shape).transpose(1, 2)
        k = self.k(hidden).view(shape).transpose(1, 2)
        v = self.v(hidden).view(shape).transpose(1, 2)
        for linear in self.bare:  # as the bridge's forward records it
            object.__setattr__(linear, "_fired_hook_out", True)
        if self.rotary_hooks is not None:
            position_embeddings = self.rotary_hooks(position_embeddings)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if self.hook_rot_q is not None:
            q = self.hook_rot_q(q)
        if self.hook_rot_k is not None:
            k = self.hook_rot_k(k)
        return q, k, v, input_shape

    def output(self, z, input_shape):
        z = z.transpose(1, 2).reshape(*input_shape, -1)
        if self.o_dtype is not None and z.dtype != self.o_dtype:
            z = z.to(self.o_dtype)
        out = self.o(z)
        return self.hook_out(out) if self.hook_out is not None else out


def _bridge_explicit_heads(attn, q, k, v, mask, scale):
    """The explicit attention of TL 4.x's `PositionEmbeddingsAttentionBridge.forward` (the
    same scores, mask, fp32 softmax and NaN scrub), firing ``hook_attn_scores`` and
    ``hook_pattern``: ``(z [batch, head, q, d_head], pattern)``. Only what the refusals
    leave (no sinks, soft-capping or dropout) is reproduced.

    Where query heads share KV heads, TL copies every KV head to each of its query heads
    (``repeat_kv``) and runs one small matrix product per head. Here the query heads of a
    KV head are stacked as rows of one product with that head's keys (and the pattern's
    rows of one product with its values), so nothing is copied and the kernel runs a few
    large products instead of many matrix-vector ones (docs/performance.md has the times).
    The sums are the same but in the kernel's other blocking, so the scores agree with
    TL's to rounding (~1e-7 relative in fp32), as the fused layers' outputs do."""
    batch, heads, q_len, d_head = q.shape
    kv_heads, k_len = k.shape[1], k.shape[-2]
    stacked = (batch, kv_heads, heads // kv_heads * q_len)
    scores = torch.matmul(q.reshape(*stacked, d_head), k.transpose(-2, -1)).view(batch, heads, q_len, k_len) * scale
    scores = attn._apply_reconstruct_attention_mask(attn_scores=scores, attention_mask=mask, seq_len=k_len,
                                                    q_seq_len=q_len)
    scores = _fire(attn.hook_attn_scores, scores)
    pattern = attn._scrub_compatibility_pattern_nans(attn._masked_softmax(scores, dtype=torch.float32).to(q.dtype))
    pattern = _fire(attn.hook_pattern, pattern)
    z = torch.matmul(pattern.reshape(*stacked, k_len), v).view(batch, heads, q_len, v.shape[-1])
    return z, pattern


def _hooked_fused_forward(attn, layer: int):
    """TL 3.9 ``AbstractAttention.forward`` with the fused kernel, when nothing reads its
    pattern: the same KV-cache append, rotary offsets and causal/padding mask."""
    explicit = type(attn).forward
    cfg = attn.cfg

    def forward(query_input, key_input, value_input, past_kv_cache_entry=None,
                additive_attention_mask=None, attention_mask=None, position_bias=None):
        if pattern_is_read(attn) or additive_attention_mask is not None or position_bias is not None:
            return explicit(attn, query_input, key_input, value_input, past_kv_cache_entry,
                            additive_attention_mask, attention_mask, position_bias)
        q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
        offset = 0
        if past_kv_cache_entry is not None:
            offset = past_kv_cache_entry.past_keys.size(1)
            k, v = past_kv_cache_entry.append(k, v)
        if cfg.positional_embedding_type == "rotary":
            q = attn.hook_rot_q(attn.apply_rotary(q, offset, attention_mask))
            k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
        mask = attn._make_causal_mask(q.shape[1], k.shape[1], offset, q.device)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :].to(q.device)
        z = _fused_heads(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).to(q.dtype), mask,
                         1.0 / attn.attn_scale)
        return _hooked_output(attn, attn.hook_z(z.transpose(1, 2)))

    return forward


# Deprecated alias of the old lowercase name, removed in the next release (docs/architecture.md).
tiled_attention = TiledAttentionScope
