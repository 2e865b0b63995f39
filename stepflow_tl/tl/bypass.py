"""Bridge components that nothing watches run as the transformers modules they wrap.

A TL 4.x `TransformerBridge` puts a bridge component in place of every submodule of the
transformers model (blocks, norms, MLPs, linear maps, embeddings); each fires its hook
points around the module it wraps. With no hook on them they compute what the wrapped
module computes, at ~1,700 module calls per decoding step of SmolLM2 against ~360 in
transformers: in KV-cached decoding, where a step is a few milliseconds of matrix
products, that Python overhead is a quarter of the step.

`bypass_idle_bridges` puts the wrapped module back in its parent for one forward, where
nothing could tell the difference: no hook on any hook point below the component, no torch
hook on and no replaced ``forward`` of any bridge component below it. Hooks on the
transformers modules themselves (a user's, or transformers' own output-capturing hooks,
which stay on a model once anything asked it for hidden states) fire either way: those
modules run in both cases. The choice is made at the
start of every forward of the model, from the hooks present then, so a hook added with
``run_with_hooks`` / ``run_with_cache`` / ``model.hooks`` fires as it always does: its
component stays a bridge. Attention components always run their bridge's ``forward`` (the
plugin's fused or explicit attention, `tl.attention.fused_attention`, with the bridge's
mask); one with no torch hook of its own, whose module Accelerate does not offload, is
called without TL's call wrapper, which only brings offloaded weights in. A block whose
own hook points are watched stays a bridge and only its idle norms and MLP are bypassed.
Nothing is bypassed under ``stop_at_layer`` / ``start_at_layer``, in compatibility mode
(processed weights make a bridge compute other than its wrapped module) or while a global
torch module hook is installed.
"""

from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

import torch
from torch.utils.hooks import RemovableHandle

from .adapter import TLModel, adapter

# Bridge components that, with no hook on them, run exactly their wrapped module (TL 4.x
# `generalized_components`); any other kind always stays a bridge.
_PASS_THROUGH = ("BlockBridge", "LinearBridge", "NormalizationBridge", "RMSNormalizationBridge", "MLPBridge",
                 "GatedMLPBridge", "EmbeddingBridge", "UnembeddingBridge", "RotaryEmbeddingBridge")


@dataclass
class _Place:
    """A bridge component sitting at ``parent._modules[name]``, with what decides whether it
    is idle and the bridge components inside the module it wraps."""

    parent: torch.nn.Module
    name: str
    bridge: torch.nn.Module
    watched: List[torch.nn.Module]  # the bridge components and hook points below, attention's excluded
    inner: List["_Place"] = field(default_factory=list)

    @property
    def is_block(self) -> bool:
        return type(self.bridge).__name__ == "BlockBridge"


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class HookCensus:
    """Tells, in a few microseconds, whether the torch hooks and replaced ``forward``s of
    a fixed set of modules may have changed since the last look, so a decision taken from
    them (which bridges are idle) is taken again only then, not at every decoding step.

    torch numbers every hook handle from one process-wide counter
    (``RemovableHandle.next_id``): while it stands still no hook was added anywhere, and a
    removal shortens a hook dict. So the key (the counter, the number of hooks on the
    modules, which modules have a replaced ``forward``) is unchanged only if the hooks and
    forwards are the same.

    The hooks are counted only in the dicts that held hooks when the counter last moved:
    the others cannot have lost one without a hook being added first. A decoding step
    then touches a handful of dicts instead of four per module, which matters because
    after the step's matrix products they are all out of the CPU's caches.
    """

    def __init__(self, modules: Iterable[torch.nn.Module]):
        modules = list({id(m): m for m in modules}.values())
        self._hooks = [getattr(m, name) for m in modules for name in _HOOK_DICTS]
        self._dicts = [m.__dict__ for m in modules]
        self._counted_at: Optional[int] = None
        self._hooked: list = []

    def key(self) -> tuple:
        counter = RemovableHandle.next_id
        if counter != self._counted_at:
            self._hooked, self._counted_at = [hooks for hooks in self._hooks if hooks], counter
        return (counter, sum(map(len, self._hooked)),
                tuple(map(operator.contains, self._dicts, itertools.repeat("forward"))))


def watched(module: torch.nn.Module, ignore: frozenset = frozenset()) -> bool:
    """Whether anything besides ``module``'s own ``forward`` runs when it is called: a torch
    hook (other than those whose ids are in ``ignore``; TL's hook points keep their hooks
    there too) or a replaced ``forward``."""
    if "forward" in module.__dict__:
        return True
    for name in _HOOK_DICTS:
        hooks = getattr(module, name)
        if hooks and any(key not in ignore for key in hooks):
            return True
    return False


class _CallForward(torch.nn.Module):
    """Stands in a parent's slot for an attention bridge during a bypassed forward: calls
    the bridge's ``forward`` (whichever is installed) without TL's call wrapper."""

    def __init__(self, bridge: torch.nn.Module):
        super().__init__()
        vars(self)["bridge"] = bridge  # not a submodule: the bridge stays where it is

    def forward(self, *args, **kwargs):
        return self.bridge.forward(*args, **kwargs)


class bypass_idle_bridges:
    """For a ``with`` block, run each bridge component that no hook watches as the
    transformers module it wraps (decided at every forward; a no-op on TL 3.9's
    ``HookedTransformer``, whose hook points wrap no module).

    Example::

        with bypass_idle_bridges(model):
            logits = model(tokens)           # idle components run as transformers' own
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.hook_resid_post", f)])
                                             # block 3 stays a bridge: f fires
    """

    def __init__(self, model: TLModel):
        self.model = model
        self._hf = None

    def __enter__(self):
        if adapter(self.model).kind != "bridge":
            return self
        hf = getattr(self.model, "original_model", None)
        if hf is None or "forward" in vars(hf):
            return self  # something else already runs this forward its own way
        from transformer_lens.hook_points import HookPoint
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
        from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

        attention: List[Tuple[torch.nn.Module, str, torch.nn.Module]] = []

        def places(module: torch.nn.Module) -> List[_Place]:
            found = []
            for name, child in module._modules.items():
                if child is None:
                    continue
                if isinstance(child, AttentionBridge):
                    attention.append((module, name, child))
                elif not isinstance(child, GeneralizedComponent):
                    found.extend(places(child))
                elif type(child).__name__ in _PASS_THROUGH and child.original_component is not None:
                    below = [m for m in _below(child, AttentionBridge) if isinstance(m, (GeneralizedComponent, HookPoint))]
                    found.append(_Place(module, name, child, below, places(child.original_component)))
            return found

        self._places = places(hf)
        self._attention = attention
        self._blocks = [p.bridge for p in _walk(self._places) if p.is_block]
        census = HookCensus([m for p in _walk(self._places) for m in (p.bridge, *p.watched)]
                            + [bridge for _, _, bridge in attention])
        plan: dict = {"key": None, "swaps": []}
        self._hf = hf
        explicit = type(hf).forward

        @functools.wraps(explicit)  # keeps the signature, which callers inspect for the cache keyword
        def forward(*args, **kwargs):
            # (parent, name, bridge, what runs in its place)
            swaps: List[Tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]] = []
            try:
                if self._may_bypass():
                    key = census.key()
                    if key != plan["key"]:
                        plan["swaps"], plan["key"] = self._idle(self._places) + self._direct_attention(), key
                    swaps = plan["swaps"]
                    for parent, name, _, stand_in in swaps:
                        parent._modules[name] = stand_in
                return explicit(hf, *args, **kwargs)
            finally:
                for parent, name, bridge, _ in reversed(swaps):
                    parent._modules[name] = bridge

        vars(hf)["forward"] = forward
        return self

    def __exit__(self, *exc):
        if self._hf is not None:
            vars(self._hf).pop("forward", None)
            self._hf = None
        return False

    def _may_bypass(self) -> bool:
        from torch.nn.modules import module as torch_module

        if getattr(self.model, "compatibility_mode", False) or any(
                getattr(torch_module, name) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                         "_global_backward_hooks", "_global_backward_pre_hooks")):
            return False
        return not any(getattr(b, "_stop_at_layer_idx", None) is not None
                       or getattr(b, "_start_at_layer_idx", None) is not None for b in self._blocks)

    def _direct_attention(self) -> list:
        """``(parent, name, bridge, _CallForward)`` of every attention bridge whose call
        wrapper has nothing to do."""
        from accelerate.utils import has_offloaded_params

        return [(parent, name, bridge, _CallForward(bridge)) for parent, name, bridge in self._attention
                if not any(getattr(bridge, hooks) for hooks in _HOOK_DICTS)
                and not has_offloaded_params(bridge.original_component)]

    def _idle(self, places: List[_Place], inside_idle: bool = False) -> list:
        """``(parent, name, bridge, wrapped module)`` of every bridge component to bypass."""
        swaps = []
        for place in places:
            block_hooks = _capture_hook_ids(place.bridge) if place.is_block else frozenset()
            idle = inside_idle or not any(watched(m, block_hooks) for m in place.watched if _maybe_watched(m))
            if idle:
                swaps.append((place.parent, place.name, place.bridge, place.bridge.original_component))
                swaps.extend(self._idle(place.inner, inside_idle=True))
            elif place.is_block:
                # Inside a watched block, only children no hook touches at all (TL's own
                # capture hooks on the norms included) leave.
                swaps.extend(self._idle([p for p in place.inner if not watched(p.bridge)]))
        return swaps


def _maybe_watched(module: torch.nn.Module) -> bool:
    """`watched`'s quick pre-check (dictionary lookups only: it runs for every module of
    the model at every decoding step)."""
    d = module.__dict__
    return bool("forward" in d or d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"]
                or d["_backward_pre_hooks"])


def _below(bridge: torch.nn.Module, skip: type):
    """Every module under ``bridge`` (itself included), without attention components and
    what is under them."""
    stack = [bridge]
    seen = set()
    while stack:
        m = stack.pop()
        if id(m) in seen or isinstance(m, skip):
            continue
        seen.add(id(m))
        yield m
        stack.extend(c for c in m._modules.values() if c is not None)


def _walk(places: List[_Place]):
    for p in places:
        yield p
        yield from _walk(p.inner)


def _capture_hook_ids(block: torch.nn.Module) -> frozenset:
    """The ids of the hooks a TL block registers on its own norms (to feed attention's
    split-q/k/v inputs and ``hook_mlp_in``): they only serve hook points below the block,
    which are watched themselves."""
    return frozenset(h.id for h in getattr(block, "_capture_hook_handles", ()))
