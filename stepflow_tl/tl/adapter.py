"""The thin layer that hides what differs between ``TransformerBridge`` (TL 4.x) and
``HookedTransformer`` (TL 3.9): sizes, grouped-query shapes, W_O, the tokenizer, and
one KV-cached decoding step. Hook names are the same on both backends; the shapes
this plugin relies on are

- ``blocks.{l}.attn.hook_attn_scores``, ``hook_pattern``: ``[batch, head, q_pos, k_pos]``
- ``blocks.{l}.attn.hook_rot_q``: ``[batch, pos, head, d_head]``
- ``blocks.{l}.attn.hook_rot_k``, ``hook_v``: ``[batch, pos, kv_head, d_head]``
- ``blocks.{l}.attn.hook_z``: ``[batch, pos, head, d_head]``
- ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post``: ``[batch, pos, d_model]``
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch
from jaxtyping import Int

from ..checks import check_int
from ..errors import StepflowError, UnsupportedModelError


@runtime_checkable
class TLModel(Protocol):
    """What stepflow_tl asks of a model: a TransformerLens ``TransformerBridge`` (TL 4) or
    ``HookedTransformer`` (TL 3.9). Only `ModelAdapter` reads more than this, and it is the one
    place that knows which of the two it holds (``adapter(model).kind``)."""

    cfg: Any
    hook_dict: Mapping[str, Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class Tokenizer(Protocol):
    """A Hugging Face tokenizer, as far as stepflow_tl uses one (call, encode, decode)."""

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any: ...

    def decode(self, ids: Any, *args: Any, **kwargs: Any) -> str: ...


# Functions that only need a tokenizer accept the model too and take its ``.tokenizer``.
ModelOrTokenizer = Union[TLModel, Tokenizer]


def attn_hook(layer: int, name: str) -> str:
    """Full name of an attention hook point, e.g. ``attn_hook(3, "pattern")``."""
    return f"blocks.{layer}.attn.hook_{name}"


def block_hook(layer: int, name: str) -> str:
    """Full name of a block-level hook point, e.g. ``block_hook(3, "resid_post")``."""
    return f"blocks.{layer}.hook_{name}"


@dataclass
class DecodeState:
    """What one KV-cached decoding step needs from the previous one.

    ``attention_mask`` is ``[batch, pos_so_far]`` (1 = real token, 0 = left padding).
    ``cache`` is backend-specific: a HuggingFace cache for the bridge, a
    ``TransformerLensKeyValueCache`` for TL 3.9.
    """

    cache: Any
    attention_mask: torch.Tensor


class ModelAdapter:
    """Uniform access to a TransformerLens model of either backend."""

    def __init__(self, model: TLModel):
        self.model = model
        cfg = model.cfg
        self.kind = "hooked" if _is_hooked_transformer(model) else "bridge"
        self.n_layers: int = int(cfg.n_layers)
        self.n_heads: int = int(cfg.n_heads)
        n_kv = getattr(cfg, "n_key_value_heads", None)
        self.n_kv_heads: int = int(n_kv) if n_kv else self.n_heads
        self.d_model: int = int(cfg.d_model)
        self.d_head: int = int(cfg.d_head)
        self.n_ctx: int = int(getattr(cfg, "n_ctx", 0) or 0)
        self.tokenizer = model.tokenizer
        if self.tokenizer is None:
            raise UnsupportedModelError("the model has no tokenizer; pass one when loading it")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def layer_types(self) -> Optional[List[str]]:
        """The attention kind of each layer from the model's config, as transformers names
        them (``"full_attention"``, ``"sliding_attention"``: GPT-OSS, Qwen2 with windows,
        ...), or None where the config has no ``layer_types``. TL 3.9 configs say
        ``attn_types`` (``"global"`` / ``"local"``)."""
        if self.kind == "hooked":
            kinds = getattr(self.model.cfg, "attn_types", None)
            names = {"global": "full_attention", "local": "sliding_attention"}
            return None if not kinds else [names.get(k, str(k)) for k in kinds]
        config = getattr(getattr(self.model, "original_model", None), "config", None)
        kinds = getattr(config, "layer_types", None)
        return None if not kinds else [str(k) for k in kinds]

    def W_O(self, layer: int) -> torch.Tensor:
        """Output projection of ``layer`` as ``[head, d_head, d_model]``."""
        if self.kind == "hooked":
            return self.model.blocks[layer].attn.W_O
        weight = self.model.blocks[layer].attn.o.original_component.weight  # [d_model, head*d_head]
        return weight.T.reshape(self.n_heads, self.d_head, self.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """One full forward pass, ``tokens [batch, pos]`` -> logits ``[batch, pos, vocab]``,
        without a KV cache (the bridge would otherwise start one, and update it twice
        under activation checkpointing)."""
        if self.kind == "bridge":
            return self.model(tokens, use_cache=False)
        return self.model(tokens)

    def check_layers(self, layers: Sequence[int]) -> list:
        """Validate a list of layer indices against the model."""
        layers = [check_int("layer", l) for l in layers]
        bad = [l for l in layers if not 0 <= l < self.n_layers]
        if bad:
            raise StepflowError(f"layers {bad} are outside the model, which has {self.n_layers} layers "
                                f"(0..{self.n_layers - 1}); choose layers in that range or a band name")
        return layers

    # ------------------------------------------------------------------ decoding
    def prefill(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, *, last_only: bool = False
    ) -> Tuple[torch.Tensor, DecodeState]:
        """Run the prompt and start a KV cache.

        The cache object is created here and handed to the model, which extends it in
        place; it is never read back from the model's output, whose field name changes
        between transformers releases (``past_key_values`` became ``cache`` in 5.24).

        Args:
            tokens: ``[batch, pos]``, left-padded.
            attention_mask: ``[batch, pos]``, 0 on padding.
            last_only: return the last position's logits only, ``[batch, 1, vocab]``. On
                the bridge the unembedding then runs on that position only (transformers'
                ``logits_to_keep``, as its ``generate`` does), so a long prompt never
                holds ``[pos, vocab]`` logits and a hook on the unembedding sees that one
                position.

        Returns:
            logits ``[batch, pos, vocab]`` (``[batch, 1, vocab]`` with ``last_only``) and the
            state for `decode`.
        """
        if self.kind == "hooked":
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

            cache = TransformerLensKeyValueCache.init_cache(
                self.model.cfg, self.device, tokens.shape[0]
            )
            logits = self.model(tokens, attention_mask=attention_mask, past_kv_cache=cache)
        else:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.original_model.config)
            keep = {"logits_to_keep": 1} if last_only and "logits_to_keep" in self._forward_parameters() else {}
            with _attention_sees_cache(self.model):
                logits = self.model(tokens, attention_mask=attention_mask, **self._cache_kwargs(cache), **keep)
        if last_only:
            logits = logits[:, -1:]
        state = DecodeState(cache, attention_mask)
        self._check_cache(state)
        return logits, state

    def decode(
        self, state: DecodeState, next_tokens: torch.Tensor
    ) -> Tuple[torch.Tensor, DecodeState]:
        """One decoding step: ``next_tokens`` ``[batch, 1]`` -> logits ``[batch, 1, vocab]``.

        Raises `StepflowError` if the cache did not grow by this step's token: the new
        token's attention would then have seen fewer keys than the tokens so far.
        """
        ones = torch.ones_like(next_tokens, dtype=state.attention_mask.dtype)
        mask = torch.cat([state.attention_mask, ones], dim=1)
        if self.kind == "hooked":
            logits = self.model(next_tokens, attention_mask=ones, past_kv_cache=state.cache)
        else:
            with _attention_sees_cache(self.model):
                logits = self.model(next_tokens, attention_mask=mask, **self._cache_kwargs(state.cache))
        new_state = DecodeState(state.cache, mask)
        self._check_cache(new_state)
        return logits, new_state

    def keep_rows(self, state: DecodeState, rows: Sequence[int]) -> DecodeState:
        """The decoding state of batch rows ``rows`` only (in that order): the others'
        KV-cache rows are dropped, then the leading columns that are padding in every
        kept row. Positions come from the attention mask on both backends (TL 3.9's
        ``get_offset_position_ids``; the bridge derives ``position_ids`` from a
        left-padded mask), so dropping padding columns moves no row's positions."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=state.attention_mask.device)
        mask = state.attention_mask.index_select(0, index)
        real = mask.any(0).nonzero()
        start = int(real[0]) if real.numel() else 0
        tensors, dim = self._kv_tensors(state.cache)
        for owner, name in tensors:
            x = getattr(owner, name)
            x = x.index_select(0, index.to(x.device))
            setattr(owner, name, x.narrow(dim, start, x.shape[dim] - start))
        mask = mask[:, start:]
        if self.kind == "hooked":
            state.cache.previous_attention_mask = mask.to(state.cache.previous_attention_mask.device)
        new_state = DecodeState(state.cache, mask)
        self._check_cache(new_state)
        return new_state

    def copy_rows(self, state: DecodeState, rows: Sequence[int]) -> DecodeState:
        """`keep_rows` of a copy: a new decoding state of rows ``rows`` (repeats allowed)
        whose KV cache shares no tensor with ``state``'s, which stays usable."""
        return self.keep_rows(DecodeState(copy.deepcopy(state.cache), state.attention_mask), rows)

    def join(self, first: DecodeState, second: DecodeState) -> DecodeState:
        """One decoding state holding ``first``'s rows, then ``second``'s, the narrower
        one left-padded (mask 0) to the wider one's width; ``first``'s cache is reused."""
        width = max(first.attention_mask.shape[1], second.attention_mask.shape[1])

        def left_pad(x, dim):
            n = width - x.shape[dim]
            if n == 0:
                return x
            shape = list(x.shape)
            shape[dim] = n
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        (into, dim), (other, _) = self._kv_tensors(first.cache), self._kv_tensors(second.cache)
        for (owner, name), (source, _) in zip(into, other):
            setattr(owner, name, torch.cat([left_pad(getattr(owner, name), dim),
                                            left_pad(getattr(source, name), dim)], dim=0))
        mask = torch.cat([left_pad(first.attention_mask, 1), left_pad(second.attention_mask, 1)], dim=0)
        if self.kind == "hooked":
            first.cache.previous_attention_mask = mask.to(first.cache.previous_attention_mask.device)
        state = DecodeState(first.cache, mask)
        self._check_cache(state)
        return state

    def _kv_tensors(self, cache):
        """``([(owner, attribute name), ...], position dim)`` of every key and value tensor of
        the KV cache, for `keep_rows` and `join`."""
        if self.kind == "hooked":  # TransformerLensKeyValueCacheEntry: [batch, pos, kv_head, d_head]
            return [(e, name) for e in cache.entries for name in ("past_keys", "past_values")], 1
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
            raise StepflowError(
                f"rows cannot leave or join a batch with this {type(cache).__name__} (only transformers' "
                "DynamicCache of full-attention layers is supported); pass static_batch=True"
            )
        return [(layer, name) for layer in layers for name in ("keys", "values")], 2  # [batch, kv_head, pos, d]

    def _cache_kwargs(self, cache) -> dict:
        """How to hand ``cache`` to the wrapped transformers model: under the keyword its
        ``forward`` declares (``cache`` from transformers 5.24 on, ``past_key_values``
        before), so no release's deprecation path is relied on."""
        name = "cache" if "cache" in self._forward_parameters() else "past_key_values"
        return {name: cache, "use_cache": True}

    def _forward_parameters(self):
        """The parameter names of the wrapped transformers model's ``forward``."""
        if not hasattr(self, "_parameters_of_forward"):
            self._parameters_of_forward = inspect.signature(type(self.model.original_model).forward).parameters
        return self._parameters_of_forward

    def _check_cache(self, state: DecodeState) -> None:
        """The KV cache must hold one entry per position seen (padding included)."""
        if self.kind == "hooked":
            held = state.cache.entries[0].past_keys.shape[1]
        else:
            held = state.cache.get_seq_length()
        expected = state.attention_mask.shape[1]
        if held != expected:
            raise StepflowError(
                f"the KV cache holds {held} positions after {expected} tokens were run: the "
                f"model did not extend the cache it was given, so attention would silently see "
                f"only part of the sequence. This TransformerLens/transformers pair is not "
                f"supported for cached decoding; install the versions in the lock files "
                f"(see docs/installation.md)"
            )

    # ------------------------------------------------------------------ checks
    def check_attention_editable(self) -> None:
        """Refuse models whose attention hooks cannot change the computation.

        Some TL wrappers (e.g. GPT-Neo through the bridge) fire ``hook_pattern`` after
        the attention output is computed, so an edit there is silently discarded. We
        zero the pattern of layer 0 on a short input and check that ``hook_z`` moves.
        """
        names = set(self.model.hook_dict)
        for needed in (attn_hook(0, "attn_scores"), attn_hook(0, "pattern"), attn_hook(0, "z")):
            if needed not in names:
                raise UnsupportedModelError(
                    f"this model has no hook point {needed!r}; StepFlow needs attention "
                    "scores and patterns that hooks can edit"
                )
        tokens = torch.arange(1, 5, device=self.device).unsqueeze(0)
        seen = {}

        def capture(z, hook):
            seen.setdefault("z", []).append(z.detach().clone())

        def zero(pattern, hook):
            return torch.zeros_like(pattern)

        with torch.no_grad():
            for fwd_hooks in ([(attn_hook(0, "z"), capture)], [(attn_hook(0, "pattern"), zero), (attn_hook(0, "z"), capture)]):
                self.model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, stop_at_layer=1)
        before, after = seen["z"]
        if torch.equal(before, after):
            raise UnsupportedModelError(
                f"editing hook_pattern does not change this {type(self.model).__name__}'s "
                "attention output (the hooks fire after attention is computed); attention "
                "interventions would be silently discarded"
            )


@contextlib.contextmanager
def _attention_sees_cache(bridge):
    """Let the bridge's attention components find the KV cache under either keyword.

    From transformers 5.24 on, decoder layers hand the cache to their attention module
    as ``cache=``; TransformerLens 4.3's attention bridges, which replace those modules,
    read only ``past_key_values=`` and otherwise skip the cache update, so every decode
    step would attend to itself alone. A forward pre-hook adds the old keyword, except on
    attention whose replaced ``forward`` says it does that itself (``aliases_cache``: the
    plugin's fused attention, `tl.attention.fused_attention`), which so runs without
    hooks (hooks added and removed at every step would also defeat `tl.bypass.HookCensus`).
    """
    handles = [block.attn.register_forward_pre_hook(_alias_cache_keyword, with_kwargs=True)
               for block in bridge.blocks
               if not getattr(vars(block.attn).get("forward"), "aliases_cache", False)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def with_cache_alias(kwargs: dict) -> dict:
    """An attention layer's keyword arguments with the KV cache also under
    ``past_key_values`` where transformers passed it as ``cache`` (`_attention_sees_cache`)."""
    if kwargs.get("cache") is not None and "past_key_values" not in kwargs:
        return {**kwargs, "past_key_values": kwargs["cache"]}
    return kwargs


def _alias_cache_keyword(module, args, kwargs):
    aliased = with_cache_alias(kwargs)
    return None if aliased is kwargs else (args, aliased)


def pad_token_ids(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> Tuple[
    Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]
]:
    """Left-padded ``[batch, pos]`` token ids and attention mask (1 = real token) of a
    batch of token id sequences (lists or 1-D tensors), as `ModelAdapter.prefill` takes
    them: left padding keeps every row's next token in the last column."""
    width = max(len(x) for x in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, x in enumerate(sequences):
        n = len(x)
        tokens[i, width - n:] = torch.as_tensor(x, dtype=torch.long)
        mask[i, width - n:] = 1
    return tokens, mask


def _is_hooked_transformer(model) -> bool:
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        return False
    return isinstance(model, HookedTransformer)


def adapter(model: TLModel) -> ModelAdapter:
    """The `ModelAdapter` of a TL model. Cheap: it reads the config only."""
    if not hasattr(model, "cfg") or not hasattr(model, "hook_dict"):
        raise UnsupportedModelError(
            f"expected a TransformerLens model (TransformerBridge or HookedTransformer), "
            f"got {type(model).__name__}"
        )
    return ModelAdapter(model)


def tokenizer_of(model_or_tokenizer: ModelOrTokenizer) -> Any:
    """The tokenizer of a TL model, or the argument itself if it is a tokenizer."""
    tokenizer = getattr(model_or_tokenizer, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    if hasattr(model_or_tokenizer, "encode") and hasattr(model_or_tokenizer, "decode"):
        return model_or_tokenizer
    raise TypeError(
        f"expected a TransformerLens model or a Hugging Face tokenizer, "
        f"got {type(model_or_tokenizer).__name__}"
    )
