"""Step-granularity hook points that ordinary TransformerLens calls accept by name.

While a trace is attached (``with attach_trace(model, trace):``), every layer gains

- ``blocks.{l}.attn.hook_step_pattern``: ``[batch, head, step_q, step_k]``, the attention
  mass each query step sends to each key step (mean over the query step's tokens of the
  summed probabilities on the key step's tokens);
- ``blocks.{l}.hook_step_resid``: ``[batch, step, d_model]``, the mean residual stream
  (``hook_resid_post``) over each step's tokens.

Both are real ``HookPoint`` modules, so ``run_with_hooks``, ``run_with_cache`` and
``model.hooks()`` take them like any other name. Editing them edits the model:

- a new step pattern ``P'`` reweights the token-level pattern block by block,
  ``A'[t, k] ~ A[t, k] * P'[i, j] / P[i, j]`` for ``t`` in step ``i``, ``k`` in step ``j``
  (markup rows and columns keep weight 1), renormalised per row. It is applied as
  ``log(P'/P)`` added to the pre-softmax scores (``hook_attn_scores``), so the model's
  own softmax does the renormalising and ``P'[..., j] = 0`` is exactly the token-level
  knockout (scores set to -inf);
- a new step residual adds ``resid'[s] - resid[s]`` to every token of step ``s``.

The pooled tensors are only computed when something is hooked on the step hook
point, and with no trace attached the model is untouched.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from transformer_lens.hook_points import HookPoint

from ..errors import StepflowError
from ..tl.adapter import adapter, attn_hook, block_hook
from ..tl.hooks import PermanentHooks, add_hook_point, refresh_hook_dict, remove_hook_point
from .pooling import block_sums, normalise_blocks, pair_counts, step_onehot

STEP_PATTERN = "hook_step_pattern"
STEP_RESID = "hook_step_resid"


def step_pattern_name(layer: int) -> str:
    return f"blocks.{layer}.attn.{STEP_PATTERN}"


def step_resid_name(layer: int) -> str:
    return f"blocks.{layer}.{STEP_RESID}"


class attach_trace:
    """Context manager that adds the step hook points for one trace.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``.
        trace: a `stepflow_tl.Trace` tokenised with the model's tokenizer; every
            forward pass inside the context must run exactly ``trace.token_ids``
            (any batch size, all rows the same trace).
        layers: layers that get step hook points (default all).

    Example::

        with attach_trace(model, trace):
            def knock_out(pattern, hook):
                pattern[:, :, :, 0] = 0   # no query step may attend to the question
            logits = model.run_with_hooks(
                trace.token_ids[None], fwd_hooks=[("blocks.3.attn.hook_step_pattern", knock_out)]
            )
    """

    def __init__(self, model, trace, layers: Optional[Iterable[int]] = None):
        self.model = model
        self.trace = trace
        self._adapter = adapter(model)
        self.layers = self._adapter.check_layers(
            range(self._adapter.n_layers) if layers is None else layers
        )
        self._points: list = []  # (parent module, attribute, full name, HookPoint)
        self._hooks: Optional[PermanentHooks] = None

    # ---------------------------------------------------------------- install
    def __enter__(self):
        self.trace.check_tokenizer(self.model)
        device = self._adapter.device
        steps = self.trace.token_steps.to(device)
        self._n_pos = steps.shape[0]
        self._n_steps = self.trace.n_steps
        self._onehot = step_onehot(steps, self._n_steps)
        self._mass_counts = pair_counts(steps, self._n_steps, "mass").to(device)
        self._sizes = self._onehot.sum(0)
        # Step index with markup mapped to an extra "step" whose weight stays 1.
        self._ext_index = torch.where(steps >= 0, steps, torch.full_like(steps, self._n_steps))
        try:
            internal = []
            for layer in self.layers:
                attn = self.model.blocks[layer].attn
                block = self.model.blocks[layer]
                pattern_point = self._add_point(attn, STEP_PATTERN, step_pattern_name(layer))
                resid_point = self._add_point(block, STEP_RESID, step_resid_name(layer))
                internal.append((attn_hook(layer, "attn_scores"), self._scores_hook(pattern_point)))
                internal.append((block_hook(layer, "resid_post"), self._resid_hook(resid_point)))
            refresh_hook_dict(self.model)
            self._hooks = PermanentHooks(self.model, internal).__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self._hooks is not None:
                self._hooks.__exit__(None, None, None)
                self._hooks = None
        finally:
            for parent, attr, name, point in self._points:
                remove_hook_point(self.model, parent, attr, name, point)
            self._points.clear()
            refresh_hook_dict(self.model)
        return False

    def _add_point(self, parent, attr: str, name: str) -> HookPoint:
        if hasattr(parent, attr):
            raise StepflowError(f"{name} already exists: is another trace attached to this model?")
        point = add_hook_point(self.model, parent, attr, name)
        self._points.append((parent, attr, name, point))
        return point

    # ---------------------------------------------------------------- hooks
    def _check_length(self, n_pos: int, name: str) -> None:
        if n_pos != self._n_pos:
            raise StepflowError(
                f"{name}: the attached trace has {self._n_pos} tokens but the model ran "
                f"{n_pos}; run exactly trace.token_ids while the trace is attached"
            )

    def _scores_hook(self, point: HookPoint):
        def hook(scores: torch.Tensor, hook):
            if not point.fwd_hooks:
                return None
            self._check_length(scores.shape[-1], hook.name)
            pattern = torch.softmax(scores.float(), dim=-1)
            sums = block_sums(pattern, self._onehot, self._onehot)
            step_pattern = normalise_blocks(sums, self._mass_counts).to(pattern.dtype)
            edited = point(step_pattern.clone())
            if torch.equal(edited, step_pattern):
                return None
            return scores + self._log_factor(step_pattern, edited, point.name).to(scores.dtype)

        return hook

    def _log_factor(self, old, new, name) -> torch.Tensor:
        """``[b, h, q, k]`` log reweighting of the token blocks for a step-level edit."""
        if new.shape != old.shape:
            raise StepflowError(f"{name}: expected a tensor of shape {tuple(old.shape)}, got {tuple(new.shape)}")
        old64, new64 = old.double(), new.double()
        # Checked first: NaN != 0, so a NaN edit would otherwise read as mass put on an empty block.
        if not bool(torch.isfinite(new64).all()) or bool((new64 < 0).any()):
            n_bad = int((~torch.isfinite(new64) | (new64 < 0)).sum())
            raise StepflowError(f"{name}: the edited step pattern has {n_bad} NaN, infinite or negative "
                                "entries; every entry must be finite and >= 0")
        if bool(((old64 == 0) & (new64 != 0)).any()):
            raise StepflowError(
                f"{name}: cannot put attention mass on a step block that has none "
                "(e.g. a later step, which the causal mask hides); only rescale existing mass"
            )
        ratio = torch.where(old64 > 0, new64 / torch.where(old64 > 0, old64, 1), 1.0)
        log_ratio = torch.nn.functional.pad(ratio.log(), (0, 1, 0, 1), value=0.0)  # markup: weight 1
        log_factor = log_ratio[:, :, self._ext_index][:, :, :, self._ext_index]
        if bool(torch.isinf(log_factor).all(-1).any()):
            raise StepflowError(f"{name}: the edit removes all attention from some query tokens")
        return log_factor

    def _resid_hook(self, point: HookPoint):
        def hook(resid: torch.Tensor, hook):
            if not point.fwd_hooks:
                return None
            self._check_length(resid.shape[1], hook.name)
            onehot = self._onehot.to(resid.dtype)
            sizes = self._sizes.clamp_min(1).to(resid.dtype)
            step_resid = torch.einsum("ts,btd->bsd", onehot, resid) / sizes[None, :, None]
            edited = point(step_resid.clone())
            if torch.equal(edited, step_resid):
                return None
            if edited.shape != step_resid.shape:
                raise StepflowError(
                    f"{point.name}: expected a tensor of shape {tuple(step_resid.shape)}, "
                    f"got {tuple(edited.shape)}"
                )
            return resid + torch.einsum("ts,bsd->btd", onehot, edited - step_resid)

        return hook
