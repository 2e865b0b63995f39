"""Pooling token-level ``[..., q, k]`` tensors into step-level ``[..., step_q, step_k]``.

This is the one pooling implementation: Step-Saliency (dense and bounded),
saliency from a user's cache, gradient-free step attention and the
``hook_step_pattern`` hook points all call it.

Three reductions over the block of token pairs ``(t, k)`` with ``t`` in step ``i`` and
``k`` in step ``j``:

- ``"mean"``: mean over the whole block, ``|i| * |j|`` pairs, causally masked zeros
  included (the paper's choice);
- ``"causal_mean"``: mean over the pairs with ``k <= t`` only (blocks with no such
  pair are 0);
- ``"mass"``: sum over ``k``, mean over ``t``: the attention mass a query step sends to a
  key step (what ``hook_step_pattern`` shows).

Tokens with step ``-1`` (template markup) belong to no block.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int

from ..errors import StepflowError

Pool = Literal["mean", "causal_mean", "mass"]
POOLS = ("mean", "causal_mean", "mass")


def check_token_steps(token_steps: Int[torch.Tensor, "pos"], n_steps: int, name: str = "token_steps") -> None:
    """Raise `StepflowError` unless ``token_steps`` is a 1-d integer tensor of step
    indices in ``[-1, n_steps)`` (-1: markup)."""
    if not isinstance(token_steps, torch.Tensor) or token_steps.dim() != 1 or token_steps.dtype.is_floating_point:
        raise StepflowError(f"{name} must be a 1-d integer tensor (one step index per token), got "
                            f"{getattr(token_steps, 'shape', type(token_steps).__name__)}")
    if token_steps.numel():
        low, high = int(token_steps.min()), int(token_steps.max())
        if low < -1 or high >= n_steps:
            bad = low if low < -1 else high
            raise StepflowError(f"{name} holds step {bad}, outside 0..{n_steps - 1} (n_steps={n_steps}; -1 marks "
                                "markup); give every token a step below n_steps (build traces with "
                                "Trace.from_text/from_ids rather than editing them)")


def step_onehot(token_steps: Int[torch.Tensor, "pos"], n_steps: int, dtype=torch.float64) -> Float[torch.Tensor, "pos step"]:
    """``[pos, step]`` indicator matrix; rows of markup tokens (step -1) are zero."""
    check_token_steps(token_steps, n_steps)
    token_steps = token_steps.long()
    onehot = torch.zeros(token_steps.shape[0], n_steps, dtype=dtype, device=token_steps.device)
    inside = token_steps >= 0
    onehot[inside.nonzero(as_tuple=True)[0], token_steps[inside]] = 1
    return onehot


def block_sums(
    x: Float[torch.Tensor, "*lead q k"],
    q_onehot: Float[torch.Tensor, "q step_q"],
    k_onehot: Float[torch.Tensor, "k step_k"],
    max_elements: int = 1 << 24,
) -> Float[torch.Tensor, "*lead step_q step_k"]:
    """Sum of ``x`` over each (query step, key step) block, accumulated in float64.

    Args:
        x: ``[..., q, k]`` token-level values (any float dtype).
        q_onehot: ``[q, step_q]`` indicator of the query rows present in ``x``.
        k_onehot: ``[k, step_k]`` indicator of the key columns.
        max_elements: size of the float64 working copy; ``x`` is converted a slice of
            leading entries, or of query rows, at a time, so at T = 8192 no full
            ``[head, T, T]`` float64 copy (4.8 GB for 9 heads) is ever made.

    Returns:
        ``[..., step_q, step_k]`` float64 block sums.
    """
    lead = x.shape[:-2]
    n_q, n_k = x.shape[-2:]
    flat = x.reshape(-1, n_q, n_k)
    per_slice = max(1, n_q * n_k)
    lead_step = max(1, min(flat.shape[0], max_elements // per_slice))
    rows = n_q if per_slice <= max_elements else max(1, max_elements // max(1, n_k))
    out = torch.zeros(flat.shape[0], q_onehot.shape[1], k_onehot.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, flat.shape[0], lead_step):
        for row in range(0, n_q, rows):
            part = flat[start : start + lead_step, row : row + rows].to(torch.float64)
            out[start : start + lead_step] += q_onehot[row : row + rows].T @ (part @ k_onehot)
    return out.reshape(*lead, q_onehot.shape[1], k_onehot.shape[1])


def pair_counts(token_steps: Int[torch.Tensor, "pos"], n_steps: int, pool: Pool) -> Float[torch.Tensor, "step_q step_k"]:
    """``[step, step]`` float64 divisor of each block for ``pool``."""
    onehot = step_onehot(token_steps, n_steps)
    sizes = onehot.sum(0)
    if pool == "mean":
        return sizes[:, None] * sizes[None, :]
    if pool == "mass":
        return sizes[:, None].expand(n_steps, n_steps).clone()
    if pool == "causal_mean":
        # keys of step j at or before position t, summed over t in step i
        return onehot.T @ torch.cumsum(onehot, dim=0)
    raise StepflowError(f"pool must be one of {POOLS}, got {pool!r}")


def normalise_blocks(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Divide block sums by their pair counts; empty blocks give 0, not NaN."""
    counts = counts.to(sums.device)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))


def pool_to_steps(
    x: Float[torch.Tensor, "*lead pos pos"],
    token_steps: Int[torch.Tensor, "pos"],
    n_steps: int | None = None,
    pool: Pool = "mean",
) -> Float[torch.Tensor, "*lead step_q step_k"]:
    """Pool a token-level tensor to steps.

    Args:
        x: ``[..., q, k]`` with ``q == k == len(token_steps)`` (a full square map).
        token_steps: ``[pos]`` step index per token, -1 for markup.
        n_steps: number of steps (default ``token_steps.max() + 1``).
        pool: ``"mean"``, ``"causal_mean"`` or ``"mass"`` (see module docstring).

    Returns:
        ``[..., step_q, step_k]`` float64.
    """
    if pool not in POOLS:
        raise StepflowError(f"pool must be one of {POOLS}, got {pool!r}")
    if x.shape[-1] != x.shape[-2] or x.shape[-1] != token_steps.shape[0]:
        raise StepflowError(
            f"expected x of shape [..., {token_steps.shape[0]}, {token_steps.shape[0]}] "
            f"to match token_steps, got {tuple(x.shape)}"
        )
    token_steps = token_steps.to(x.device)
    if n_steps is None:
        n_steps = int(token_steps.max()) + 1
    onehot = step_onehot(token_steps, n_steps)
    sums = block_sums(x, onehot, onehot)
    return normalise_blocks(sums, pair_counts(token_steps, n_steps, pool))
