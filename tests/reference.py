"""Brute-force references, written independently of the package's pooling code:
attention probabilities and their gradients from a plain transformers
forward/backward, pooled in float64 with explicit loops over steps.

transformers' eager attention rounds its softmax to fp32 even in a float64 model, so
for float64 models the reference runs `_float64_attention` instead: the same eager
attention with the softmax in float64 (a causal LM without padding, so the mask is the
causal triangle)."""

from __future__ import annotations

import torch
from transformers import AttentionInterface

FLOAT64_ATTENTION = "stepflow_reference_float64"


def _float64_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(2, 3) * scaling
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    weights = torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(FLOAT64_ATTENTION, _float64_attention)


def hf_attention_and_grads(hf_model, token_ids, loss_positions=None, logit=None):
    """Per layer ``(A, dL/dA)`` as float64 ``[head, q, k]`` from an eager HF model.

    The loss is the mean next-token cross-entropy over ``loss_positions`` (targets;
    default every token after the first: then it is transformers' own ``labels=`` loss);
    with ``logit=(position, token_id)`` the scalar is that logit instead (the authors'
    ``mode="logit"``: ``logits[0, target_pos, target_token_id]``).
    """
    if next(hf_model.parameters()).dtype == torch.float64:
        before = hf_model.config._attn_implementation
        hf_model.set_attn_implementation(FLOAT64_ATTENTION)
        try:
            return _attention_and_grads(hf_model, token_ids, loss_positions, logit)
        finally:
            hf_model.set_attn_implementation(before)
    return _attention_and_grads(hf_model, token_ids, loss_positions, logit)


def _attention_and_grads(hf_model, token_ids, loss_positions, logit=None):
    ids = token_ids[None]
    float64 = next(hf_model.parameters()).dtype == torch.float64
    if logit is not None:
        out = hf_model(ids, output_attentions=True, use_cache=False)
        loss = out.logits[0, logit[0], logit[1]]
    elif loss_positions is None and not float64:
        out = hf_model(ids, labels=ids, output_attentions=True, use_cache=False)
        loss = out.loss
    else:  # transformers' labels= loss casts float64 logits to fp32
        out = hf_model(ids, output_attentions=True, use_cache=False)
        if loss_positions is None:
            loss_positions = torch.arange(1, token_ids.shape[0])
        loss_positions = loss_positions[loss_positions > 0]
        logits = out.logits[0, loss_positions - 1]
        loss = torch.nn.functional.cross_entropy(
            logits if float64 else logits.float(), token_ids[loss_positions]
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


def rule_values(rule, a, g):
    """The authors' three rules, written out: ``ag`` |A g|, ``ag_signed`` A g, ``g`` |g|
    (here on the pairs with A > 0: the gradient of a masked entry is not attention)."""
    if rule == "abs":
        return (a * g).abs()
    if rule == "signed":
        return a * g
    if rule == "grad":
        return torch.where(a > 0, g.abs(), torch.zeros_like(g))
    raise AssertionError(rule)


def reference_saliency(hf_model, trace, pool="mean", loss_positions=None, rule="abs", logit=None, per_head=False):
    """``[layer, step, step]`` float64: mean over heads of the pooled rule value (default
    |A * dL/dA|); ``per_head``: ``[layer, head, step, step]``."""
    maps = []
    for a, g in hf_attention_and_grads(hf_model, trace.token_ids, loss_positions, logit):
        pooled = pool_loop(rule_values(rule, a, g), trace.token_steps, trace.n_steps, pool)
        maps.append(pooled if per_head else pooled.mean(0))
    return torch.stack(maps)
