"""Pooling the tiles of tiled attention into step-to-step Step-Saliency sums.

`stepflow_tl.tl.attention.TiledAttention` recomputes each tile of a layer's attention
during backward and hands its ``A`` and ``dL/dA`` to a callback; `TilePooler` is that
callback for one layer: it forms the rule's value (`rules.attribution`, e.g. ``|A * dL/dA|``)
tile by tile. It reuses `pooling`'s step one-hots and float64 block sums,
so tiled maps are pooled by the same code, with the same pair counts, as the other
modes (``causal_mean`` included).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..traces.pooling import block_sums
from .rules import attribution


class TilePooler:
    """Pools the ``rule`` value of each tile of one layer into ``[head or 1, step, step]`` sums.

    Each tile is reduced over heads first (unless per-head maps are wanted), in the
    tile's dtype, then summed to blocks in float64 with `pooling.block_sums` on the
    columns of the steps the tile touches.
    """

    def __init__(self, token_steps: torch.Tensor, onehot: torch.Tensor, n_heads: int, per_head: bool,
                 rule: str = "abs"):
        self.onehot = onehot
        self.rule = rule
        self.per_head = per_head
        steps = token_steps.to(onehot.device).long()
        self.steps = steps
        n = onehot.shape[1]
        self.sums = torch.zeros(n_heads if per_head else 1, n, n, dtype=torch.float64, device=onehot.device)
        # step columns [lo, hi) present in each block of positions (markup -1 ignored)
        self._ranges: dict = {}
        self.seen = False  # a gradient reached this layer

    def _range(self, span: slice) -> Optional[tuple]:
        key = (span.start, span.stop)
        if key not in self._ranges:
            inside = self.steps[span]
            inside = inside[inside >= 0]
            self._ranges[key] = None if inside.numel() == 0 else (int(inside.min()), int(inside.max()) + 1)
        return self._ranges[key]

    def __call__(self, rows: slice, cols: slice, pattern: torch.Tensor, grad: torch.Tensor) -> None:
        self.seen = True
        rq, rk = self._range(rows), self._range(cols)
        if rq is None or rk is None:
            return
        values = attribution(self.rule, pattern, grad)
        values = values.reshape(-1, *values.shape[-2:])  # [head, q, k] (batch 1)
        if not self.per_head:
            values = values.sum(0, keepdim=True)
        part = block_sums(values, self.onehot[rows, rq[0]:rq[1]], self.onehot[cols, rk[0]:rk[1]])
        self.sums[:, rq[0]:rq[1], rk[0]:rk[1]] += part
