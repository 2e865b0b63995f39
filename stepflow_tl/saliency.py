"""Step-Saliency: attention x gradient, pooled into step-to-step maps per layer.

For layer ``l``, head ``h``, query token ``t`` and key token ``k``::

    I_l[t, k] = (1/H) * sum_h | A_lh[t, k] * dL/dA_lh[t, k] |

and the step map ``M_l[i, j]`` pools ``I_l`` over the block of query step ``i`` and key
step ``j`` (`stepflow_tl.pooling`). Three ways to get the same maps:

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

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from .backend import PermanentHooks, adapter, attn_hook, block_hook
from .errors import StepflowError
from .pooling import POOLS, block_sums, normalise_blocks, pair_counts, step_onehot

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]
LOSSES = ("sequence", "summary", "answer")
MODES = ("dense", "bounded")
SALIENCY_POOLS = ("mean", "causal_mean")
_FORMAT_VERSION = 1


@dataclass
class StepSaliency:
    """Step maps of one trace.

    Attributes:
        maps: ``[layer, step_q, step_k]`` float64, mean over heads.
        layers: model layer index of each row of ``maps``.
        n_model_layers: layers in the model (the diagnostics' bands are fractions of it).
        step_kinds, step_labels: per step (``"question"``/``"thinking"``/``"summary"``).
        map_kind: ``"saliency"`` (|A x dL/dA|) or ``"attention"`` (A).
        pool: ``"mean"``, ``"causal_mean"`` (or ``"mass"`` for attention).
        loss: the loss the gradient came from (``""`` for attention maps).
        head_maps: ``[layer, head, step_q, step_k]`` when asked for, else None.
        meta: JSON-safe details (model, trace id, label, ...).
    """

    maps: torch.Tensor
    layers: list
    n_model_layers: int
    step_kinds: list
    step_labels: list
    map_kind: str = "saliency"
    pool: str = "mean"
    loss: str = "sequence"
    head_maps: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return self.maps.shape[-1]

    def row_normalised(self) -> torch.Tensor:
        """``[layer, step_q, step_k]`` with each row summing to 1 (zero rows stay 0), for display."""
        sums = self.maps.sum(-1, keepdim=True)
        return torch.where(sums > 0, self.maps / torch.where(sums > 0, sums, 1), 0.0)

    def layer(self, layer: int) -> torch.Tensor:
        """The ``[step_q, step_k]`` map of model layer ``layer``."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not computed; have {self.layers}")
        return self.maps[self.layers.index(layer)]

    def to_dataframe(self):
        """Long format: layer, step_q, step_k, kind_q, kind_k, label_q, label_k, value."""
        import pandas as pd

        n_layers, n_q, n_k = self.maps.shape
        layer_idx, q_idx, k_idx = np.meshgrid(
            np.arange(n_layers), np.arange(n_q), np.arange(n_k), indexing="ij"
        )
        kinds = np.asarray(self.step_kinds, dtype=object)
        labels = np.asarray(self.step_labels, dtype=object)
        return pd.DataFrame(
            {
                "layer": np.asarray(self.layers)[layer_idx.ravel()],
                "step_q": q_idx.ravel(),
                "step_k": k_idx.ravel(),
                "kind_q": kinds[q_idx.ravel()],
                "kind_k": kinds[k_idx.ravel()],
                "label_q": labels[q_idx.ravel()],
                "label_k": labels[k_idx.ravel()],
                "value": self.maps.numpy().ravel(),
                "map_kind": self.map_kind,
            }
        )

    # ------------------------------------------------------------ persistence
    def save(self, path: Union[str, Path]) -> Path:
        """Write ``path`` (.npz, arrays) and ``path`` with .json (metadata). No pickle."""
        path = Path(path).with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"maps": self.maps.numpy()}
        if self.head_maps is not None:
            arrays["head_maps"] = self.head_maps.numpy()
        np.savez_compressed(path, **arrays)
        meta = {
            "format_version": _FORMAT_VERSION,
            "layers": list(map(int, self.layers)),
            "n_model_layers": int(self.n_model_layers),
            "step_kinds": list(self.step_kinds),
            "step_labels": list(self.step_labels),
            "map_kind": self.map_kind,
            "pool": self.pool,
            "loss": self.loss,
            "meta": self.meta,
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "StepSaliency":
        path = Path(path).with_suffix(".npz")
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise StepflowError(f"{path}: unknown format version {meta.get('format_version')}")
        with np.load(path, allow_pickle=False) as data:
            maps = torch.from_numpy(data["maps"].copy())
            head_maps = torch.from_numpy(data["head_maps"].copy()) if "head_maps" in data else None
        return cls(
            maps=maps,
            layers=meta["layers"],
            n_model_layers=meta["n_model_layers"],
            step_kinds=meta["step_kinds"],
            step_labels=meta["step_labels"],
            map_kind=meta["map_kind"],
            pool=meta["pool"],
            loss=meta["loss"],
            head_maps=head_maps,
            meta=meta["meta"],
        )

    # ------------------------------------------------------------ analysis & display
    def diagnose(self, **kwargs):
        """The failure diagnostics of this map (`stepflow_tl.diagnostics.diagnose`)."""
        from .diagnostics import diagnose

        return diagnose(self, **kwargs)

    def save_html(self, path: Union[str, Path], **kwargs) -> Path:
        """A self-contained HTML page with the step maps and diagnostics."""
        from .render import save_result_html

        return save_result_html(self, path, **kwargs)

    def show(self):
        """The circuitsvis step-map view (in a notebook), all layers, shared colour scale."""
        from .render import step_maps_view

        return step_maps_view(self)


# ---------------------------------------------------------------------- losses
def _token_positions(trace, kinds: Iterable[str]) -> torch.Tensor:
    wanted = [s.index for s in trace.steps if s.kind in kinds]
    return torch.isin(trace.token_steps, torch.tensor(wanted, dtype=torch.long)).nonzero()[:, 0]


def answer_token_positions(trace) -> torch.Tensor:
    """Token positions of the final answer inside the summary.

    The answer is the content of the last ``\\boxed{...}`` in the summary, else the
    text after the last ``Answer:``; tokens that overlap it count.
    """
    summary = [s for s in trace.steps if s.kind == "summary"]
    if not summary:
        raise StepflowError("loss='answer' needs a trace with a summary")
    start, end = summary[0].char_span[0], summary[-1].char_span[1]
    text = trace.text[start:end]
    span = _last_boxed(text)
    if span is None:
        match = None
        for match in re.finditer(r"answer\s*(?:is)?\s*[:：]?\s*", text, flags=re.IGNORECASE):
            pass
        if match is None or match.end() >= len(text.rstrip()):
            raise StepflowError(
                "loss='answer' found no answer in the summary (no \\boxed{...} and no 'Answer:')"
            )
        span = (match.end(), len(text.rstrip()))
    a, b = start + span[0], start + span[1]
    if trace.token_offsets is None:
        raise StepflowError("loss='answer' needs token offsets; rebuild the trace with Trace.from_text/from_parts")
    offsets = trace.token_offsets
    return ((offsets[:, 0] < b) & (offsets[:, 1] > a)).nonzero()[:, 0]


def _last_boxed(text: str):
    """Char span of the content of the last balanced ``\\boxed{...}``, or None."""
    found = None
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = (match.end(), i - 1)
    return found


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 products and log-softmaxes lose digits; float64 models keep theirs."""
    return x if x.dtype == torch.float64 else x.float()


def _target_ce(logits: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting the tokens at ``positions`` (each from the one before)."""
    positions = positions[positions > 0].to(logits.device)
    if positions.numel() == 0:
        raise StepflowError("the loss covers no predictable tokens")
    logp = torch.log_softmax(_at_least_fp32(logits[0, positions - 1]), dim=-1)
    return -logp.gather(-1, token_ids.to(logits.device)[positions, None]).mean()


def loss_target_positions(loss: str, trace) -> torch.Tensor:
    """Token positions whose prediction a built-in loss scores, ``[n]`` long."""
    if loss == "sequence":
        return torch.arange(1, trace.token_ids.shape[0])
    if loss == "summary":
        positions = _token_positions(trace, ("summary",))
        if positions.numel() == 0:
            raise StepflowError("loss='summary' needs a trace with summary tokens")
        return positions
    if loss == "answer":
        return answer_token_positions(trace)
    raise ValueError(f"loss must be one of {LOSSES} or a callable(logits, trace), got {loss!r}")


def resolve_loss(loss: Union[str, LossFn], trace) -> tuple:
    """``(name, fn(logits [1, pos, vocab]) -> scalar)`` for a loss spec."""
    if callable(loss):
        return getattr(loss, "__name__", "callable"), lambda logits: loss(logits, trace)
    positions = loss_target_positions(loss, trace)
    return loss, lambda logits: _target_ce(logits, trace.token_ids, positions)


# ---------------------------------------------------------------------- core
class _LayerPooler:
    """Accumulates per-head pooled maps, ``[layer, head, step, step]``, as layers arrive."""

    # Elements of the fp32 product |A * dL/dA| formed at once: 64 MB, whatever T is.
    PRODUCT_ELEMENTS = 1 << 24

    def __init__(self, trace, layers, n_heads, pool, device):
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

    def add_product(self, layer: int, pattern: torch.Tensor, grad: torch.Tensor) -> None:
        """Pool ``|pattern * grad|`` (both ``[1, head, q, k]``), formed in fp32 (float64 for float64 models).

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
            part = (_at_least_fp32(pattern[:, block]) * _at_least_fp32(grad[:, block])).abs_()
            self._check_finite(layer, part)
            sums += block_sums(part, self.onehot[block], self.onehot)
        self._store(layer, sums)


def _check_inputs(model, trace, pool, pools, layers):
    if pool not in pools:
        raise ValueError(f"pool must be one of {pools}, got {pool!r}")
    trace.check_tokenizer(model)
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
        raise ValueError("layers is empty")
    return a, sorted(set(layers))


def _make_result(trace, layers, pooler, *, n_model_layers, map_kind, pool, loss, per_head, meta=None):
    head_maps = pooler.head_maps
    return StepSaliency(
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


def step_saliency(
    model,
    trace,
    *,
    loss: Union[str, LossFn] = "sequence",
    pool: str = "mean",
    layers: Optional[Iterable[int]] = None,
    per_head: bool = False,
    mode: str = "dense",
) -> StepSaliency:
    """Step-Saliency maps of one trace.

    Args:
        model: ``TransformerBridge`` or ``HookedTransformer``.
        trace: a `stepflow_tl.Trace` tokenised with the model's tokenizer.
        loss: ``"sequence"`` (mean next-token cross-entropy over the whole trace, the
            authors' choice), ``"summary"`` (summary tokens only), ``"answer"`` (the final
            answer's tokens) or ``fn(logits [1, pos, vocab], trace) -> scalar``.
        pool: ``"mean"`` (whole block, the paper) or ``"causal_mean"`` (pairs k <= t).
        layers: model layers to map (default all).
        per_head: also keep ``head_maps [layer, head, step_q, step_k]``.
        mode: ``"dense"`` (reference) or ``"bounded"`` (activation checkpointing and a
            block-wise loss, memory of one layer's attention); both are exact. Bounded
            mode refuses a built-in loss on a model that transforms its logits after the
            unembedding (soft-capping); a callable loss gets whole logits in either mode.

    Returns:
        `StepSaliency` with ``maps [layer, step_q, step_k]`` (float64; the products
        ``|A * dL/dA|`` are formed in fp32 for fp16/bf16/fp32 models, float64 for float64 ones).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    a, layers = _check_inputs(model, trace, pool, SALIENCY_POOLS, layers)
    loss_name, loss_fn = resolve_loss(loss, trace)
    # Bounded mode never holds whole-sequence logits for a built-in loss; a callable
    # loss needs them, so it gets them.
    blockwise_loss = mode == "bounded" and not callable(loss)
    pooler = _LayerPooler(trace, layers, a.n_heads, pool, a.device)
    tokens = trace.token_ids[None].to(a.device)
    lowest = {}  # where backward may stop: the lowest mapped layer's pattern (dense) or input (bounded)

    def grad_hook(layer, pattern):
        def on_grad(grad):
            pooler.add_product(layer, pattern, grad)

        return on_grad

    def pattern_hook_dense(pattern, hook):
        layer = int(hook.name.split(".")[1])
        pattern.register_hook(grad_hook(layer, pattern.detach()))
        if layer == layers[0]:
            lowest["target"] = pattern

    # Bounded: the first call of each layer's hook is the checkpointed forward, whose
    # activations are dropped; the second is the recomputation during backward, whose
    # pattern is held just until that layer's gradient arrives. Backward stops at the
    # lowest mapped block's input, [1, pos, d_model]: holding that block's first-pass
    # pattern as the target, as dense mode does, would keep a T x T tensor alive.
    seen = dict.fromkeys(layers, 0)
    recomputed = {}

    def resid_hook_bounded(resid, hook):
        lowest.setdefault("target", resid)

    def pattern_hook_bounded(pattern, hook):
        layer = int(hook.name.split(".")[1])
        seen[layer] += 1
        if seen[layer] == 1:

            def on_grad(grad):
                pooler.add_product(layer, recomputed.pop(layer), grad)

            pattern.register_hook(on_grad)
        else:
            recomputed[layer] = pattern.detach()

    hook_fn = pattern_hook_dense if mode == "dense" else pattern_hook_bounded
    fwd_hooks = [(attn_hook(layer, "pattern"), hook_fn) for layer in layers]
    if mode == "bounded":
        fwd_hooks.append((block_hook(layers[0], "resid_pre"), resid_hook_bounded))
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(PermanentHooks(model, fwd_hooks))
        if mode == "bounded":
            stack.enter_context(_checkpointed_blocks(model, layers[0]))
            stack.enter_context(set_checkpoint_early_stop(False))
        if blockwise_loss:
            in_unembedding = stack.enter_context(
                _loss_in_unembedding(model, trace.token_ids, loss_target_positions(loss, trace))
            )
            value = in_unembedding.check_output(_forward(model, a, tokens))
        else:
            # no name for the logits: only what the loss saves for backward stays alive
            value = loss_fn(_forward(model, a, tokens))
        if value.ndim != 0:
            raise StepflowError(f"the loss must be a scalar, got shape {tuple(value.shape)}")
        if not bool(torch.isfinite(value)):
            raise StepflowError(f"the loss is not finite ({float(value.detach())})")
        torch.autograd.grad(value, [lowest["target"]])
    missing = set(layers) - pooler.done
    if missing:
        raise StepflowError(f"no gradient reached layers {sorted(missing)}")
    return _make_result(
        trace, layers, pooler, n_model_layers=a.n_layers, map_kind="saliency", pool=pool,
        loss=loss_name, per_head=per_head, meta={"mode": mode, "loss_value": float(value.detach())},
    )


class _loss_in_unembedding:
    """Compute a built-in loss inside the unembedding, one block of positions at a time.

    Used by bounded mode. Otherwise the ``[1, pos, vocab]`` logits, their log-softmax
    and its gradient (~4 such copies) are the largest tensors of a bounded run: 1.5 GiB
    at T = 2048 on SmolLM2's 49k vocabulary, ~40 GB at T = 16k on a 152k-vocabulary
    model. ``unembed.forward`` is shadowed for the duration: it receives the final
    normalised residual ``[1, pos, d_model]``, unembeds a block of predicting positions
    at a time under activation checkpointing (so one block's logits exist at a time, in
    the forward and again in the backward), sums their cross-entropy into ``self.loss``
    and hands the model a zero-stride stand-in for the logits.

    The loss is only right if nothing transforms the logits after the unembedding
    (soft-capping, a logit scale): `check_output` raises unless the model returned the
    stand-in untouched.
    """

    # Elements of one block's logits: 64 MB in fp32, whatever the vocabulary.
    LOGIT_ELEMENTS = 1 << 24

    def __init__(self, model, token_ids: torch.Tensor, positions: torch.Tensor):
        positions = torch.unique(positions[positions > 0])  # sorted
        if positions.numel() == 0:
            raise StepflowError("the loss covers no predictable tokens")
        self.unembed = model.unembed
        self.vocab = int(model.cfg.d_vocab_out)
        self.token_ids = token_ids
        self.positions = positions
        self.loss: Optional[torch.Tensor] = None
        self.stand_in: Optional[torch.Tensor] = None

    def _block_losses(self, unembed, resid, args, kwargs) -> torch.Tensor:
        """Mean cross-entropy over ``self.positions``, from ``resid [1, pos, d_model]``.

        Blocks are runs of consecutive positions, as long as the budget allows, even
        when the loss scores only a few of them (``loss="answer"``): a matrix product
        over a handful of rows takes another BLAS path than the dense mode's
        whole-sequence one and rounds differently (measured: 1e-5 relative in the maps
        of SmolLM2 with a 3-token answer), while blocks of hundreds of rows give the
        dense mode's numbers bit for bit in every case measured.
        """
        predicting = (self.positions - 1).to(resid.device)
        targets = self.token_ids.to(resid.device)[self.positions]

        def block_sum(resid, start, stop, rows, block_targets):
            logits = _at_least_fp32(unembed(resid[:, start:stop], *args, **kwargs)[0, rows])
            return -torch.log_softmax(logits, dim=-1).gather(-1, block_targets[:, None]).sum()

        length = max(1, self.LOGIT_ELEMENTS // self.vocab)
        stop = int(predicting[-1]) + 1
        lowest = max(0, min(int(predicting[0]), stop - length))
        total = 0.0
        for block_stop in range(stop, lowest, -length):
            block_start = max(lowest, block_stop - length)
            inside = (predicting >= block_start) & (predicting < block_stop)
            if bool(inside.any()):
                total = total + checkpoint(
                    block_sum, resid, block_start, block_stop, predicting[inside] - block_start,
                    targets[inside], use_reentrant=False,
                )
        return total / predicting.numel()

    def __enter__(self):
        original = self.unembed.forward

        def forward(resid, *args, **kwargs):
            self.loss = self._block_losses(original, resid, args, kwargs)
            self.stand_in = resid.new_zeros(()).expand(*resid.shape[:-1], self.vocab)
            return self.stand_in

        vars(self.unembed)["forward"] = forward  # as in _checkpointed_blocks
        return self

    def __exit__(self, *exc):
        vars(self.unembed).pop("forward", None)
        return False

    def check_output(self, output) -> torch.Tensor:
        """The loss, once the model's ``output`` is known to be the untouched logits."""
        if self.loss is None or output is not self.stand_in:
            raise StepflowError(
                "this model transforms its logits after the unembedding (e.g. soft-capping "
                "or a logit scale), so bounded mode cannot compute the loss block by block; "
                "use mode='dense' or pass the loss as a callable(logits, trace)"
            )
        return self.loss


def _forward(model, a, tokens):
    if a.kind == "bridge":  # a KV cache would be updated twice under checkpointing
        return model(tokens, use_cache=False)
    return model(tokens)


class _checkpointed_blocks:
    """Run blocks ``first..`` under non-reentrant activation checkpointing.

    Shadows each block's ``forward`` with an entry in the instance ``__dict__`` for the
    duration, and deletes it on exit, so the model is unchanged afterwards. (Plain
    ``setattr`` is not used: bridge components forward attribute writes to the wrapped
    HF module.)
    """

    def __init__(self, model, first: int):
        self.blocks = list(model.blocks)[first:]

    def __enter__(self):
        for block in self.blocks:
            original = block.forward

            def forward(*args, _original=original, **kwargs):
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            vars(block)["forward"] = forward
        return self

    def __exit__(self, *exc):
        for block in self.blocks:
            vars(block).pop("forward", None)
        return False


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
    trace,
    *,
    pool: str = "mean",
    layers: Optional[Iterable[int]] = None,
    per_head: bool = False,
    loss: str = "from cache",
) -> StepSaliency:
    """Step-Saliency from an ``ActivationCache`` with attention patterns and their gradients.

    Make the cache with::

        _, cache = model.run_with_cache(
            trace.token_ids[None], return_type="loss", incl_bwd=True,
            names_filter=lambda n: n.endswith("hook_pattern"),
        )

    ``return_type="loss"`` is TL's mean next-token cross-entropy, i.e. ``loss="sequence"``.
    """
    if pool not in SALIENCY_POOLS:
        raise ValueError(f"pool must be one of {SALIENCY_POOLS}, got {pool!r}")
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
    pooler = _LayerPooler(trace, layers, pattern0.shape[1], pool, pattern0.device)
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
    trace,
    *,
    pool: str = "mass",
    layers: Optional[Iterable[int]] = None,
    per_head: bool = False,
) -> StepSaliency:
    """Gradient-free step maps: attention probabilities pooled to steps.

    Args:
        model_or_cache: a TL model (one forward pass is run) or an ``ActivationCache``
            holding ``blocks.{l}.attn.hook_pattern``.
        pool: ``"mass"`` (default: attention mass from query step to key step, rows sum
            to at most 1), ``"mean"`` or ``"causal_mean"``.

    Returns:
        `StepSaliency` with ``map_kind="attention"``.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    n_pos = trace.token_ids.shape[0]
    if hasattr(model_or_cache, "hook_dict"):
        model = model_or_cache
        a, layers = _check_inputs(model, trace, pool, POOLS, layers)
        pooler = _LayerPooler(trace, layers, a.n_heads, pool, a.device)

        def capture(pattern, hook):
            pooler.add(int(hook.name.split(".")[1]), pattern.detach())

        with torch.no_grad(), PermanentHooks(model, [(attn_hook(l, "pattern"), capture) for l in layers]):
            model(trace.token_ids[None].to(a.device), **({"use_cache": False} if a.kind == "bridge" else {}))
        return _make_result(
            trace, layers, pooler, n_model_layers=a.n_layers, map_kind="attention", pool=pool,
            loss="", per_head=per_head,
        )
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
