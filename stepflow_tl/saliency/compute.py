"""Step-Saliency: attention x gradient, pooled into step-to-step maps per layer.

For layer ``l``, head ``h``, query token ``t`` and key token ``k``::

    I_l[t, k] = (1/H) * sum_h | A_lh[t, k] * dL/dA_lh[t, k] |

(``rule="abs"``; ``"signed"`` drops the absolute value, ``"grad"`` pools ``|dL/dA|``, and
``loss="logit"`` differentiates one logit instead of a loss: `stepflow_tl.saliency.rules`)
and the step map ``M_l[i, j]`` pools ``I_l`` over the block of query step ``i`` and key
step ``j`` (`stepflow_tl.traces.pooling`). Three ways to get the same maps:

- `step_saliency(model, trace, mode="dense")`: one forward and backward with hooks on
  ``hook_pattern``; autograd keeps every layer's attention alive, O(layers x heads x T^2).
- `step_saliency(model, trace, mode="bounded")`: every block runs under activation
  checkpointing, so its attention exists only while its own backward runs, and each
  layer is pooled the moment its gradient arrives; a built-in loss is computed inside
  the unembedding a block of positions at a time, so the ``[pos, vocab]`` logits never
  exist whole. Memory grows like one layer's attention, at the price of a second forward.
- `step_saliency_from_cache(cache, trace)`: from a user's ``run_with_cache(...,
  incl_bwd=True)`` cache.

`step_attention` pools the attention probabilities themselves (no gradient) into the
same result type.
"""

from __future__ import annotations

import re
import warnings
from contextlib import ExitStack, contextmanager
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch.utils.checkpoint import set_checkpoint_early_stop

from ..errors import StepflowError
from ..tl.adapter import TLModel, adapter, attn_hook, block_hook
from ..tl.attention import TiledAttentionScope, tiled_unsupported_reason
from ..tl.hooks import PermanentHooks, checkpointed_blocks, layer_of
from ..tl.models import software_versions
from ..traces.trace import Trace
from ..traces.pooling import POOLS, block_sums, check_token_steps, normalise_blocks, pair_counts, step_onehot
from .losses import LossFn, LossInUnembedding, at_least_fp32, loss_target_positions, resolve_loss
from .maps import StepSaliency
from .rules import TargetSpec, attribution, check_rule, resolve_target
from .tiled import TilePooler

SALIENCY_POOLS = ("mean", "causal_mean")


class HalfPrecisionWarning(UserWarning):
    """Step-Saliency was asked of a float16/bfloat16 model on the CPU."""


# ---------------------------------------------------------------------- core
class _LayerPooler:
    """Accumulates per-head pooled maps, ``[layer, head, step, step]``, as layers arrive."""

    # Elements of the fp32 product |A * dL/dA| formed at once: 64 MB, whatever T is.
    PRODUCT_ELEMENTS = 1 << 24

    def __init__(self, trace, layers, n_heads, pool, device, rule="abs"):
        self.rule = rule
        steps = trace.token_steps.to(device)
        self.onehot = step_onehot(steps, trace.n_steps)
        self.counts = pair_counts(steps, trace.n_steps, pool).to(device)
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.head_maps = torch.zeros(len(layers), n_heads, trace.n_steps, trace.n_steps, dtype=torch.float64)
        self.done = set()

    @staticmethod
    def _check_finite(layer: int, values: torch.Tensor) -> None:
        if not bool(torch.isfinite(values).all()):
            raise StepflowError(
                f"layer {layer}: non-finite attention or gradient (NaN/inf); with fp16 this "
                "is usually overflow: run the model in bf16 or fp32"
            )

    def _store(self, layer: int, sums: torch.Tensor) -> None:
        self.head_maps[self.index[layer]] = normalise_blocks(sums, self.counts).cpu()
        self.done.add(layer)

    def add(self, layer: int, values: torch.Tensor) -> None:
        """``values``: ``[1, head, q, k]`` token-level map of ``layer``."""
        self._check_finite(layer, values)
        self._store(layer, block_sums(values[0], self.onehot, self.onehot))

    def add_sums(self, layer: int, sums: torch.Tensor) -> None:
        """Store block sums already made, ``[head, step, step]`` or ``[1, step, step]``
        summed over heads (then every head's row holds the mean over heads)."""
        self._check_finite(layer, sums)
        n_heads = self.head_maps.shape[1]
        self._store(layer, sums if sums.shape[0] == n_heads else sums / n_heads)

    def add_product(self, layer: int, pattern: torch.Tensor, grad: torch.Tensor) -> None:
        """Pool the rule's value of ``pattern`` and ``grad`` (both ``[1, head, q, k]``; e.g.
        ``|pattern * grad|``), formed in fp32 (float64 for float64 models).

        The product is made a block of query rows at a time: the whole layer's
        ``[head, T, T]`` product (and its float64 copy) would otherwise add two to
        four T x T copies on top of what autograd already holds for the layer.
        """
        pattern, grad = pattern[0], grad[0]
        n_heads, n_q, n_k = pattern.shape
        rows = max(1, self.PRODUCT_ELEMENTS // max(1, n_heads * n_k))
        sums = torch.zeros(n_heads, *self.counts.shape, dtype=torch.float64, device=pattern.device)
        for row in range(0, n_q, rows):
            block = slice(row, row + rows)
            part = attribution(self.rule, at_least_fp32(pattern[:, block]), at_least_fp32(grad[:, block]))
            self._check_finite(layer, part)
            sums += block_sums(part, self.onehot[block], self.onehot)
        self._store(layer, sums)


def _check_inputs(model, trace, pool, pools, layers):
    if pool not in pools:
        raise StepflowError(f"pool must be one of {pools}, got {pool!r}")
    trace.check_tokenizer(model)
    if trace.token_steps.shape != trace.token_ids.shape:
        raise StepflowError(f"trace.token_steps has shape {tuple(trace.token_steps.shape)}, token_ids "
                            f"{tuple(trace.token_ids.shape)}; one step index per token is needed (rebuild the trace)")
    check_token_steps(trace.token_steps, trace.n_steps, "trace.token_steps")
    a = adapter(model)
    if a.n_ctx and trace.token_ids.shape[0] > a.n_ctx:
        raise StepflowError(
            f"the trace has {trace.token_ids.shape[0]} tokens, more than the model's context of {a.n_ctx}"
        )
    if trace.n_steps < 2:
        raise StepflowError(
            f"a step map needs at least two steps; this trace has {trace.n_steps}"
        )
    layers = a.check_layers(range(a.n_layers) if layers is None else layers)
    if not layers:
        raise StepflowError("layers is empty")
    return a, sorted(set(layers))


def _make_result(trace, layers, pooler, *, n_model_layers, map_kind, pool, loss, per_head, meta=None):
    head_maps = pooler.head_maps
    return StepSaliency(
        rule=pooler.rule if map_kind == "saliency" else "abs",
        maps=head_maps.mean(1),
        layers=list(layers),
        n_model_layers=n_model_layers,
        step_kinds=list(trace.step_kinds),
        step_labels=list(trace.step_labels),
        map_kind=map_kind,
        pool=pool,
        loss=loss,
        head_maps=head_maps if per_head else None,
        meta={**dict(getattr(trace, "meta", {}) or {}), **(meta or {})},
    )


def _taking_grad(resid: torch.Tensor) -> torch.Tensor:
    """``resid`` where it takes a gradient; else (the model's weights are frozen, so nothing
    before it takes one) its values as a leaf that does: the maps need the gradient from
    there up only, and without it no pattern would have one."""
    return resid if resid.requires_grad else resid.detach().requires_grad_(True)


class _DenseGradients:
    """Dense mode: one forward and one backward. Autograd keeps every mapped layer's
    pattern; each is pooled with its gradient when that arrives, and backward stops at
    the lowest mapped layer's pattern."""

    def __init__(self, pooler: _LayerPooler, layers: list):
        self.pooler, self.layers = pooler, layers
        self.target: Optional[torch.Tensor] = None  # where backward may stop

    def hooks(self) -> list:
        return [(attn_hook(layer, "pattern"), self._on_pattern) for layer in self.layers] + [
            (block_hook(self.layers[0], "resid_pre"), lambda resid, hook: _taking_grad(resid))]

    def contexts(self, model) -> list:
        return []

    def _on_pattern(self, pattern, hook):
        layer = layer_of(hook)
        kept = pattern.detach()
        pattern.register_hook(lambda grad: self.pooler.add_product(layer, kept, grad))
        if layer == self.layers[0]:
            self.target = pattern


class _StopsAtLowestInput:
    """Backward stops at the lowest mapped block's input, ``[1, pos, d_model]``."""

    target: Optional[torch.Tensor] = None

    def _on_input(self, resid, hook):
        resid = _taking_grad(resid)
        if self.target is None:
            self.target = resid
        return resid


class _BoundedGradients(_StopsAtLowestInput):
    """Bounded mode: the blocks from the lowest mapped one up run under activation
    checkpointing. The first call of each layer's pattern hook is the checkpointed
    forward, whose activations are dropped; the second is the recomputation during
    backward, whose pattern is held just until that layer's gradient arrives. Backward
    stops at the lowest mapped block's input, [1, pos, d_model]: holding that block's
    first-pass pattern as the target, as dense mode does, would keep a T x T tensor alive."""

    def __init__(self, pooler: _LayerPooler, layers: list):
        self.pooler, self.layers = pooler, layers
        self.seen = dict.fromkeys(layers, 0)
        self.recomputed: dict = {}

    def hooks(self) -> list:
        return [(attn_hook(layer, "pattern"), self._on_pattern) for layer in self.layers] + [
            (block_hook(self.layers[0], "resid_pre"), self._on_input)
        ]

    def contexts(self, model) -> list:
        return [checkpointed_blocks(model, self.layers[0]), set_checkpoint_early_stop(False)]

    def _on_pattern(self, pattern, hook):
        layer = layer_of(hook)
        self.seen[layer] += 1
        if self.seen[layer] == 1:
            pattern.register_hook(lambda grad: self.pooler.add_product(layer, self.recomputed.pop(layer), grad))
        else:
            self.recomputed[layer] = pattern.detach()


class _TiledGradients(_StopsAtLowestInput):
    """Tiled mode: no pattern exists. Every layer's attention runs as
    `tl.attention.TiledAttention`, whose backward hands each recomputed tile of
    A and dL/dA to that layer's `tiled.TilePooler`; backward stops at the lowest mapped
    block's input. With ``checkpoint`` the blocks run under activation checkpointing, as
    in bounded mode (memory of one block, a second forward); without it autograd keeps
    the blocks' ``O(T)`` activations, as in a plain forward and backward."""

    def __init__(self, pooler: _LayerPooler, layers: list, trace, n_heads: int, per_head: bool, block: int,
                 checkpoint: bool):
        self.pooler, self.layers, self.block, self.checkpoint = pooler, layers, block, checkpoint
        self.tiles = {layer: TilePooler(trace.token_steps, pooler.onehot, n_heads, per_head, pooler.rule)
                      for layer in layers}

    def hooks(self) -> list:
        return [(block_hook(self.layers[0], "resid_pre"), self._on_input)]

    def contexts(self, model) -> list:
        scope = TiledAttentionScope(model, self.tiles.get, self.block)
        return [scope, checkpointed_blocks(model, self.layers[0])] if self.checkpoint else [scope]

    def finish(self) -> None:
        for layer, tile in self.tiles.items():
            if tile.seen:
                self.pooler.add_sums(layer, tile.sums)


_GRADIENTS = {"dense": _DenseGradients, "bounded": _BoundedGradients, "tiled": _TiledGradients}
MODES = (*_GRADIENTS, "auto")
# "auto" runs a mode without activation checkpointing (tiled without it, or dense where
# tiled cannot run) where its estimated peak takes at most this share of the memory
# available on the device; else it checkpoints (tiled, or bounded).
AUTO_MEMORY_SHARE = 0.5


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free on ``device``: the CUDA allocator's free memory, or the kernel's
    ``MemAvailable`` for the CPU (None where neither can be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dense_memory(n_tokens: int, n_heads: int, n_layers_kept: int, vocab: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes of dense mode above the weights: each kept layer's attention
    pattern and a same-sized temporary (fp32 at least), and the logits with their gradient."""
    item = max(torch.finfo(dtype).bits // 8, 4)
    return 2 * n_layers_kept * n_heads * n_tokens ** 2 * item + 2 * n_tokens * vocab * item


def activation_memory(n_tokens: int, n_layers: int, d_model: int, d_mlp: int, vocab: int,
                      dtype: torch.dtype) -> int:
    """Estimated peak bytes of tiled mode without checkpointing above the weights: what
    autograd keeps of every block (about ``12 d_model + 4 d_mlp`` values per token) and,
    for a callable loss (``vocab``; 0 for a built-in one, computed block-wise), the
    whole-sequence logits, their log-softmax and its gradient (fp32 at least). On
    SmolLM2 (fp32, CPU) this is 2.16 MB per token with the logits; measured: 2.2 MB per
    token between 1,024 and 2,048 tokens when the built-in losses still held them."""
    item = torch.finfo(dtype).bits // 8
    return n_tokens * (n_layers * (12 * d_model + 4 * d_mlp) * item + 3 * vocab * max(item, 4))


def _fits(need: int, device: torch.device) -> bool:
    free = available_memory(device)
    return free is not None and need <= AUTO_MEMORY_SHARE * free


def auto_mode(a, trace: Trace, layers: list, interventions: list, model: TLModel) -> str:
    """The mode ``mode="auto"`` runs: tiled where the model's attention allows it and no
    intervention needs the pattern hooks (the fastest mode at every length measured, and
    the smallest: no ``T x T`` matrix), else dense where `dense_memory` fits in
    `AUTO_MEMORY_SHARE` of `available_memory`, else bounded."""
    if not interventions and tiled_unsupported_reason(model) is None:
        return "tiled"
    vocab = int(getattr(a.model.cfg, "d_vocab", 0) or 0)
    need = dense_memory(int(trace.token_ids.shape[0]), a.n_heads, a.n_layers - min(layers), vocab, a.dtype)
    return "dense" if _fits(need, a.device) else "bounded"


def auto_checkpoint(a, n_tokens: int, whole_logits: bool) -> bool:
    """Whether ``mode="auto"`` runs tiled mode under activation checkpointing: only where
    the blocks' activations (`activation_memory`, with the logits where a callable loss
    needs them whole) would not fit in `AUTO_MEMORY_SHARE` of `available_memory`.
    Checkpointing costs a second forward of every block."""
    cfg = a.model.cfg
    d_model = int(cfg.d_model)
    vocab = int(getattr(cfg, "d_vocab", 0) or 0) if whole_logits else 0
    need = activation_memory(n_tokens, a.n_layers, d_model, int(getattr(cfg, "d_mlp", None) or 4 * d_model),
                             vocab, a.dtype)
    return not _fits(need, a.device)


# Tile sides "auto" may pick on a GPU, and the share of the free device memory one tile's
# working set may take (scores, probabilities, their gradients, the product and its
# float64 pooling copy: about 24 bytes per head and element).
TILE_SIDES = (256, 512, 1024, 2048, 4096)
TILE_BYTES_PER_ELEMENT, TILE_MEMORY_SHARE = 24, 0.25


def auto_tile_side(n_tokens: int, n_heads: int, device: torch.device) -> int:
    """The tile side `step_saliency` uses in tiled mode when none is given. On a CPU,
    `TiledAttentionScope.BLOCK`; on a GPU, where the per-tile Python overhead dominates small
    tiles, the largest of `TILE_SIDES` (no longer than the trace needs) whose working set
    fits in `TILE_MEMORY_SHARE` of the device's free memory."""
    if device.type != "cuda":
        return TiledAttentionScope.BLOCK
    free = torch.cuda.mem_get_info(device)[0]
    side = TiledAttentionScope.BLOCK
    for candidate in TILE_SIDES:
        if candidate > side and candidate < 2 * max(n_tokens, 1) and \
                n_heads * candidate ** 2 * TILE_BYTES_PER_ELEMENT <= TILE_MEMORY_SHARE * free:
            side = candidate
    return side


def step_saliency(
    model: TLModel,
    trace: Trace,
    *,
    loss: Union[str, LossFn] = "sequence",
    pool: str = "mean",
    layers: Optional[Iterable[int]] = None,
    per_head: bool = False,
    mode: str = "dense",
    interventions: Sequence = (),
    state: Optional[object] = None,
    loss_positions: Optional[Int[torch.Tensor, "n"]] = None,
    rule: str = "abs",
    target: TargetSpec = None,
    block: Optional[int] = None,
    checkpoint: Optional[bool] = None,
) -> StepSaliency:
    """Step-Saliency maps of one trace.

    Args:
        model: ``TransformerBridge`` or ``HookedTransformer``.
        trace: a `stepflow_tl.Trace` tokenised with the model's tokenizer.
        loss: ``"sequence"`` (mean next-token cross-entropy over the whole trace, the
            authors' choice), ``"summary"`` (summary tokens only), ``"answer"`` (the final
            answer's tokens), ``"logit"`` (no loss: the logit of ``target``, the
            authors' other scalar) or ``fn(logits [1, pos, vocab], trace) -> scalar``.
        pool: ``"mean"`` (whole block, the paper) or ``"causal_mean"`` (pairs k <= t).
        layers: model layers to map (default all).
        per_head: also keep ``head_maps [layer, head, step_q, step_k]``.
        mode: ``"dense"`` (reference), ``"bounded"`` (activation checkpointing and a
            block-wise loss, memory of one layer's attention), ``"tiled"`` (as bounded,
            and attention runs tile by tile with the pooling inside its backward
            (`stepflow_tl.tl.attention`): no ``T x T`` matrix, memory linear in T; the
            layers' ``hook_attn_scores``/``hook_pattern`` do not fire) or ``"auto"``
            (`auto_mode`: tiled where the model's attention allows it, without
            activation checkpointing where the activations fit the device
            (`auto_checkpoint`); else dense where its memory fits, else bounded). All
            are exact. Bounded and checkpointed tiled modes refuse a built-in loss on a
            model that transforms its logits after the unembedding (soft-capping); a
            callable loss gets whole logits in every mode.
        interventions, state: see `intervened`; the maps are then those of the
            teacher-forced forward that StepFlow (or a control) edits exactly as
            KV-cached generation edits each position of this trace.
        loss_positions: the positions a built-in ``loss`` scores
            (`stepflow_tl.saliency.losses.loss_target_positions`), when the caller resolved
            them already (the CLI does, to skip traces the loss cannot measure).
        rule: what is pooled per attention entry (`stepflow_tl.saliency.rules`): ``"abs"``
            ``|A * dL/dA|`` (the paper), ``"signed"`` ``A * dL/dA`` (maps may be negative),
            ``"grad"`` ``|dL/dA|`` on the pairs with ``A > 0``.
        target: with ``loss="logit"``: a `LogitTarget` or ``(position, token_id)``, the
            logit ``logits[0, position, token_id]``; None or ``"answer"``: the answer's
            first token, read at the position before it.
        block: tiled mode's tile side in tokens (default `auto_tile_side`: 256 on a CPU,
            growing with free memory on a GPU). ``meta["mode"]`` says which mode ran and,
            for tiled mode, ``meta["block"]`` which tile side.
        checkpoint: tiled mode only: run the blocks under activation checkpointing
            (memory of one block, at the price of a second forward) or keep their
            activations, as a plain backward does (one forward; memory
            `activation_memory`). Either way a built-in loss is computed block-wise, as in
            bounded mode. Default:
            True for ``mode="tiled"``, `auto_checkpoint` for ``"auto"``;
            ``meta["checkpoint"]`` says which ran.

    Returns:
        `StepSaliency` with ``maps [layer, step_q, step_k]`` (float64; the products
        ``|A * dL/dA|`` are formed in fp32 for fp16/bf16/fp32 models, float64 for float64 ones).
    """
    if mode not in MODES:
        raise StepflowError(f"mode must be one of {MODES}, got {mode!r}")
    check_rule(rule)
    a, layers = _check_inputs(model, trace, pool, SALIENCY_POOLS, layers)
    if target is not None and loss != "logit":
        raise StepflowError(f"target= is the logit of loss='logit'; loss={loss!r} takes no target")
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        warnings.warn(f"Step-Saliency of a {str(a.dtype).removeprefix('torch.')} model on the CPU: half precision "
                      "changes the maps against float32 (the dtype is recorded in the map's metadata); load the "
                      "model in float32 on the CPU", HalfPrecisionWarning, stacklevel=2)
    requested = mode
    interventions = list(interventions)
    if mode == "auto":
        mode = auto_mode(a, trace, layers, interventions, model)
    if checkpoint is not None and requested not in ("tiled", "auto"):
        raise StepflowError(f"checkpoint= chooses whether tiled mode recomputes its blocks; mode={requested!r} "
                            "takes none (bounded mode always checkpoints, dense mode never does)")
    if mode == "tiled" and checkpoint is None:
        checkpoint = requested == "tiled" or auto_checkpoint(a, int(trace.token_ids.shape[0]), callable(loss))
    if mode == "tiled" and interventions:
        # Tiled layers never fire hook_attn_scores/hook_pattern, where OEB and its
        # controls edit attention: the edits would be silently skipped.
        raise StepflowError("mode='tiled' cannot apply interventions (its attention runs without the "
                            "hook_attn_scores/hook_pattern they edit); use mode='bounded' or 'dense'")
    positions, logit = None, None
    if loss == "logit":
        answer = None
        if target is None or target == "answer":
            answer = loss_positions if loss_positions is not None else loss_target_positions(loss, trace)
        logit = resolve_target(target, trace, int(model.cfg.d_vocab_out), answer)
    elif not callable(loss):  # resolved once: the loss function and the block-wise loss share them
        positions = loss_positions if loss_positions is not None else loss_target_positions(loss, trace)
    loss_name, loss_fn = resolve_loss(loss, trace, positions, logit)
    # Bounded and tiled modes never hold whole-sequence logits for a built-in loss (dense mode
    # is the reference, computed as the authors do); a callable loss needs them, so it gets them.
    # Tiled mode without checkpointing gets them too where the model changes its logits
    # after the unembedding (the block-wise loss would be wrong; bounded mode refuses).
    tokens = trace.token_ids[None].to(a.device)
    blockwise_loss = mode in ("bounded", "tiled") and not callable(loss) and (
        mode == "bounded" or checkpoint or LossInUnembedding.logits_untouched(model, a.forward, tokens[0]))
    pooler = _LayerPooler(trace, layers, a.n_heads, pool, a.device, rule)
    if mode == "tiled":
        if block is None:
            block = auto_tile_side(trace.token_ids.shape[0], a.n_heads, a.device)
        gradients = _TiledGradients(pooler, layers, trace, a.n_heads, per_head, block, bool(checkpoint))
    else:
        gradients = _GRADIENTS[mode](pooler, layers)
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        # first: installing an intervention may run a probe forward, which the map hooks must not see
        stack.enter_context(intervened(model, trace, interventions, state))
        stack.enter_context(PermanentHooks(model, gradients.hooks()))
        for context in gradients.contexts(model):
            stack.enter_context(context)
        if blockwise_loss:
            in_unembedding = stack.enter_context(
                LossInUnembedding(model, trace.token_ids, positions, logit)
            )
            value = in_unembedding.check_output(a.forward(tokens))
        else:
            # no name for the logits: only what the loss saves for backward stays alive
            value = loss_fn(a.forward(tokens))
        if value.ndim != 0:
            raise StepflowError(f"the loss must be a scalar, got shape {tuple(value.shape)}")
        if not bool(torch.isfinite(value)):
            raise StepflowError(f"the loss is not finite ({float(value.detach())})")
        torch.autograd.grad(value, [gradients.target])
    if mode == "tiled":
        gradients.finish()
    missing = set(layers) - pooler.done
    if missing:
        raise StepflowError(f"no gradient reached layers {sorted(missing)}")
    return _make_result(
        trace, layers, pooler, n_model_layers=a.n_layers, map_kind="saliency", pool=pool,
        loss=loss_name, per_head=per_head,
        meta={"mode": mode, **({"requested_mode": requested} if requested != mode else {}),
              **({"block": gradients.block, "checkpoint": gradients.checkpoint} if mode == "tiled" else {}),
              "loss_value": float(value.detach()), **_provenance(a), **_intervention_meta(interventions),
              **({"target": [logit.position, logit.token_id]} if logit is not None else {})},
    )


@contextmanager
def intervened(model: TLModel, trace: Trace, interventions: Sequence = (), state: Optional[object] = None) -> Iterator[None]:
    """The context in which a forward over ``trace.token_ids`` is edited by ``interventions``
    (each enters ``iv.applied_to_trace(model, trace, state)``, in list order, so their
    hooks compose as in `generate`).

    ``state`` is the `StepState` the interventions read (default:
    ``StepState.from_trace(trace)``, the trace's own step structure, every position
    an edited query, row seed 0). In KV-cached generation each decoded token is edited
    with the structure known at its position; the edits look at no later position,
    so one teacher-forced forward with the whole trace's state applies, at every
    position, what generation applied there. Prompt tokens that generation did not
    edit need ``StepState.from_trace(trace, prefill=n_prompt_tokens)``; the row seed
    of the random controls must be the generation row's (``Generation.seed``). Where
    generation's tracker re-labelled earlier tokens (a tag split over several tokens),
    generation edited them with the labels known then; this state has the final ones.
    No interventions: nothing is installed.
    """
    with ExitStack() as stack:
        for iv in interventions:
            apply = getattr(iv, "applied_to_trace", None)
            if apply is None:
                raise StepflowError(f"expected an Intervention (e.g. StepFlow()), got {type(iv).__name__}")
            stack.enter_context(apply(model, trace, state))
        yield


def _provenance(a) -> dict:
    """What decides a map's numerics besides its mode and tile side, for its metadata
    (and so for metrics.csv): the model's dtype and device, the software versions."""
    software = ";".join(f"{k}={v}" for k, v in software_versions().items())
    return {"dtype": str(a.dtype).removeprefix("torch."), "device": str(a.device), "software": software}


def _intervention_meta(interventions) -> dict:
    return {"interventions": [repr(iv) for iv in interventions]} if interventions else {}


# ---------------------------------------------------------------------- from caches
def _cache_tensor(cache, name: str, n_pos: int, how: str) -> torch.Tensor:
    try:
        value = cache[name]
    except KeyError:
        raise StepflowError(f"the cache has no {name!r}; {how}") from None
    value = value if value.ndim == 4 else value[None]
    if value.shape[0] != 1:
        raise StepflowError(f"{name}: expected batch size 1, got {value.shape[0]}")
    if value.shape[-1] != n_pos or value.shape[-2] != n_pos:
        raise StepflowError(
            f"{name} covers {value.shape[-1]} positions but the trace has {n_pos} tokens: "
            "the cache comes from another input"
        )
    return value


def _cache_layers(cache, layers) -> list:
    if layers is not None:
        return sorted(set(int(l) for l in layers))
    found = sorted(
        {int(m.group(1)) for k in cache.keys() if (m := re.fullmatch(r"blocks\.(\d+)\.attn\.hook_pattern", k))}
    )
    if not found:
        raise StepflowError(
            "the cache has no 'blocks.{l}.attn.hook_pattern'; make it with "
            "model.run_with_cache(tokens, names_filter=lambda n: n.endswith('hook_pattern'))"
        )
    return found


def _n_model_layers(cache, fallback: int) -> int:
    model = getattr(cache, "model", None)
    return int(model.cfg.n_layers) if model is not None else fallback


def step_saliency_from_cache(
    cache,
    trace: Trace,
    *,
    pool: str = "mean",
    layers: Optional[Iterable[int]] = None,
    per_head: bool = False,
    loss: str = "from cache",
    rule: str = "abs",
) -> StepSaliency:
    """Step-Saliency from an ``ActivationCache`` with attention patterns and their gradients
    (``rule`` as in `step_saliency`).

    Make the cache with::

        _, cache = model.run_with_cache(
            trace.token_ids[None], return_type="loss", incl_bwd=True,
            names_filter=lambda n: n.endswith("hook_pattern"),
        )

    ``return_type="loss"`` is TL's mean next-token cross-entropy, i.e. ``loss="sequence"``.
    """
    if pool not in SALIENCY_POOLS:
        raise StepflowError(f"pool must be one of {SALIENCY_POOLS}, got {pool!r}")
    check_rule(rule)
    layers = _cache_layers(cache, layers)
    n_pos = trace.token_ids.shape[0]
    how = ("make the cache with model.run_with_cache(tokens, return_type='loss', incl_bwd=True) "
           "including these layers' hook_pattern")
    missing = [
        n for l in layers for n in (attn_hook(l, "pattern"), attn_hook(l, "pattern") + "_grad")
        if n not in cache.keys()
    ]
    if missing:
        raise StepflowError(f"the cache lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}; {how}")
    pattern0 = _cache_tensor(cache, attn_hook(layers[0], "pattern"), n_pos, how)
    pooler = _LayerPooler(trace, layers, pattern0.shape[1], pool, pattern0.device, rule)
    for layer in layers:
        pattern = _cache_tensor(cache, attn_hook(layer, "pattern"), n_pos, how)
        grad = _cache_tensor(cache, attn_hook(layer, "pattern") + "_grad", n_pos, how)
        pooler.add_product(layer, pattern, grad)
    return _make_result(
        trace, layers, pooler, n_model_layers=_n_model_layers(cache, max(layers) + 1),
        map_kind="saliency", pool=pool, loss=loss, per_head=per_head,
    )


def step_attention(
    model_or_cache,
    trace: Trace,
    *,
    pool: str = "mass",
    layers: Optional[Iterable[int]] = None,
    per_head: bool = False,
    interventions: Sequence = (),
    state: Optional[object] = None,
) -> StepSaliency:
    """Gradient-free step maps: attention probabilities pooled to steps.

    Args:
        model_or_cache: a TL model (one forward pass is run) or an ``ActivationCache``
            holding ``blocks.{l}.attn.hook_pattern``.
        pool: ``"mass"`` (default: attention mass from query step to key step, rows sum
            to at most 1), ``"mean"`` or ``"causal_mean"``.
        interventions, state: with a model, the attention of the forward edited as in
            `intervened` (``hook_pattern`` sees the edited attention).

    Returns:
        `StepSaliency` with ``map_kind="attention"``.
    """
    if pool not in POOLS:
        raise StepflowError(f"pool must be one of {POOLS}, got {pool!r}")
    n_pos = trace.token_ids.shape[0]
    if hasattr(model_or_cache, "hook_dict"):
        model = model_or_cache
        a, layers = _check_inputs(model, trace, pool, POOLS, layers)
        pooler = _LayerPooler(trace, layers, a.n_heads, pool, a.device)

        def capture(pattern, hook):
            pooler.add(layer_of(hook), pattern.detach())

        with torch.no_grad(), intervened(model, trace, interventions, state), \
                PermanentHooks(model, [(attn_hook(l, "pattern"), capture) for l in layers]):
            a.forward(trace.token_ids[None].to(a.device))
        return _make_result(
            trace, layers, pooler, n_model_layers=a.n_layers, map_kind="attention", pool=pool,
            loss="", per_head=per_head, meta={**_provenance(a), **_intervention_meta(interventions)},
        )
    if interventions:
        raise StepflowError("interventions need a model to run; a cache holds a finished forward")
    cache = model_or_cache
    layers = _cache_layers(cache, layers)
    how = "make the cache with model.run_with_cache(tokens) including these layers' hook_pattern"
    pattern0 = _cache_tensor(cache, attn_hook(layers[0], "pattern"), n_pos, how)
    pooler = _LayerPooler(trace, layers, pattern0.shape[1], pool, pattern0.device)
    for layer in layers:
        pooler.add(layer, _cache_tensor(cache, attn_hook(layer, "pattern"), n_pos, how).detach())
    return _make_result(
        trace, layers, pooler, n_model_layers=_n_model_layers(cache, max(layers) + 1),
        map_kind="attention", pool=pool, loss="", per_head=per_head,
    )
