"""Brute-force references, written independently of the package's pooling code:
attention probabilities and their gradients from a plain transformers
forward/backward, pooled in float64 with explicit loops over steps."""

from __future__ import annotations

import torch


def hf_attention_and_grads(hf_model, token_ids, loss_positions=None):
    """Per layer ``(A, dL/dA)`` as float64 ``[head, q, k]`` from an eager HF model.

    The loss is the mean next-token cross-entropy over ``loss_positions`` (targets;
    default every token after the first: then it is transformers' own ``labels=`` loss).
    """
    ids = token_ids[None]
    if loss_positions is None:
        out = hf_model(ids, labels=ids, output_attentions=True, use_cache=False)
        loss = out.loss
    else:
        out = hf_model(ids, output_attentions=True, use_cache=False)
        loss_positions = loss_positions[loss_positions > 0]
        loss = torch.nn.functional.cross_entropy(
            out.logits[0, loss_positions - 1].float(), token_ids[loss_positions]
        )
    attentions = out.attentions
    grads = torch.autograd.grad(loss, attentions)
    return [(a[0].detach().double(), g[0].double()) for a, g in zip(attentions, grads)]


def pool_loop(values, token_steps, n_steps, pool):
    """``values [head, q, k]`` -> ``[head, step, step]`` with plain loops (float64)."""
    values = values.double()
    out = torch.zeros(values.shape[0], n_steps, n_steps, dtype=torch.float64)
    for i in range(n_steps):
        q = (token_steps == i).nonzero()[:, 0]
        for j in range(n_steps):
            k = (token_steps == j).nonzero()[:, 0]
            block = values[:, q][:, :, k]
            if pool == "mean":
                n = len(q) * len(k)
                out[:, i, j] = block.sum((-1, -2)) / n if n else 0
            elif pool == "mass":
                out[:, i, j] = block.sum((-1, -2)) / len(q) if len(q) else 0
            elif pool == "causal_mean":
                causal = (k[None, :] <= q[:, None]).double()
                n = causal.sum()
                out[:, i, j] = (block * causal).sum((-1, -2)) / n if n else 0
    return out


def reference_saliency(hf_model, trace, pool="mean", loss_positions=None):
    """``[layer, step, step]`` float64: mean over heads of pooled |A * dL/dA|."""
    maps = []
    for a, g in hf_attention_and_grads(hf_model, trace.token_ids, loss_positions):
        maps.append(pool_loop((a * g).abs(), trace.token_steps, trace.n_steps, pool).mean(0))
    return torch.stack(maps)
