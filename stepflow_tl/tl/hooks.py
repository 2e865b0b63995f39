"""Every way this plugin attaches code to a TransformerLens model, in one place.

- `PermanentHooks`: forward hooks on existing hook points, installed as *permanent*
  so a user's ``reset_hooks()`` / ``run_with_hooks`` cannot strip them mid-analysis
  (Step-Saliency, step hook points);
- `temporary_hooks`: TL's own ``model.hooks(...)``, for hooks that live exactly as long
  as a ``with`` block (the interventions during generation);
- `shadow_forward`: replace one module's ``forward`` for the duration (activation
  checkpointing of blocks, the block-wise loss inside the unembedding);
- `add_hook_point` / `remove_hook_point`: new named ``HookPoint`` modules that
  ``run_with_hooks`` and ``run_with_cache`` accept (the step hook points).

All are context managers or paired calls that undo exactly what they did, on every exit
path. The backend differences they need (TL 3.9's ``add_hook`` returning None, the
bridge's explicit ``_hook_registry``, HookedTransformer's ``setup()``) stay here.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint
from transformer_lens.hook_points import HookPoint

from ..errors import UnsupportedModelError
from .adapter import TLModel, adapter


def layer_of(hook: HookPoint) -> int:
    """The layer index of a ``blocks.{layer}.*`` hook point (TL's ``HookPoint.layer``)."""
    return hook.layer()


def add_permanent_hook(hook_point: HookPoint, fn: Callable[..., Any], dir: str = "fwd"):
    """Add ``fn`` to a HookPoint as a permanent hook and return its handle.

    Permanent, so a user's ``reset_hooks()`` or ``run_with_hooks`` cannot strip the
    plugin's internal hooks mid-analysis. TL 3.9's ``add_hook`` returns None, so the
    handle is read back from the hook point's list (appended last).
    """
    hook_point.add_hook(fn, dir=dir, is_permanent=True)
    return (hook_point.fwd_hooks if dir == "fwd" else hook_point.bwd_hooks)[-1]


def remove_hook(hook_point: HookPoint, handle: Any, dir: str = "fwd") -> None:
    """Remove one hook added by `add_permanent_hook`, leaving all others alone."""
    handle.hook.remove()
    handles = hook_point.fwd_hooks if dir == "fwd" else hook_point.bwd_hooks
    if handle in handles:
        handles.remove(handle)


class PermanentHooks:
    """Context manager: install ``[(hook_name, fn), ...]`` as permanent forward hooks,
    and remove exactly those on exit, whatever the exit path."""

    def __init__(self, model: TLModel, fwd_hooks: Sequence[Tuple[str, Callable[..., Any]]]):
        self.model = model
        self.fwd_hooks = list(fwd_hooks)
        self._installed: list = []

    def __enter__(self):
        hook_dict = self.model.hook_dict
        try:
            for name, fn in self.fwd_hooks:
                if name not in hook_dict:
                    raise UnsupportedModelError(f"this model has no hook point {name!r}")
                point = hook_dict[name]
                self._installed.append((point, add_permanent_hook(point, fn)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        while self._installed:
            point, handle = self._installed.pop()
            remove_hook(point, handle)
        return False


def temporary_hooks(model: TLModel, fwd_hooks: Sequence[Tuple[str, Callable[..., Any]]]) -> contextlib.AbstractContextManager:
    """``with temporary_hooks(model, [(name, fn), ...]):`` TL's ``model.hooks``, which
    removes exactly the hooks it added on exit."""
    return model.hooks(fwd_hooks=list(fwd_hooks))


@contextlib.contextmanager
def shadow_forward(module: torch.nn.Module, forward: Callable) -> Iterator[None]:
    """Make ``module(...)`` call ``forward`` for the duration of the block.

    The replacement goes into the instance ``__dict__`` and is deleted on exit, so the
    module is unchanged afterwards. (Plain ``setattr`` is not used: bridge components
    forward attribute writes to the wrapped HF module.)
    """
    vars(module)["forward"] = forward
    try:
        yield
    finally:
        vars(module).pop("forward", None)


@contextlib.contextmanager
def checkpointed_blocks(model: TLModel, first: int) -> Iterator[None]:
    """Run blocks ``first..`` under non-reentrant activation checkpointing, by shadowing
    each block's ``forward`` (`shadow_forward`) for the duration.

    On CPU, the C heap's free pages are handed back to the OS after each block's
    forward and when each block's output gradient arrives (`release_free_heap`): the
    blocks' short-lived activations are freed, but glibc keeps their pages. A tiled
    2,048-token SmolLM2 map peaked 1.05 GiB above its start without this and 0.35 GiB
    with it, for the same 0.16 GiB of live tensors after the forward (docs/performance.md).
    """
    with contextlib.ExitStack() as stack:
        for block in list(model.blocks)[first:]:
            original = block.forward

            def forward(*args, _original=original, **kwargs):
                out = checkpoint(_original, *args, use_reentrant=False, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(hidden, torch.Tensor) and hidden.device.type == "cpu":
                    release_free_heap()
                    if hidden.requires_grad:
                        hidden.register_hook(_release_before_backward)
                return out

            stack.enter_context(shadow_forward(block, forward))
        yield


def _release_before_backward(grad):
    release_free_heap()


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to hand back
        return None


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    torch's CPU tensors live in the C heap. glibc serves allocations below its mmap
    threshold (which grows to 32 MiB as large blocks are freed) from the heap and keeps
    freed pages mapped for reuse; in a loop over layers whose temporaries differ in
    size, the resident set then grows well past the live tensors. Trimming changes no
    allocator setting; measured here, ~9 ms per call (60 calls, 0.55 s of a 30 s map).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def add_hook_point(model: TLModel, parent: torch.nn.Module, attr: str, name: str) -> HookPoint:
    """A new ``HookPoint`` at ``parent.attr`` that the model knows as ``name``.

    Call `refresh_hook_dict` once after adding (or removing) a batch of them.
    """
    point = HookPoint()
    setattr(parent, attr, point)
    point.name = name
    registry = getattr(model, "_hook_registry", None)
    if registry is not None:  # TransformerBridge keeps an explicit name -> HookPoint map
        registry[name] = point
    return point


def remove_hook_point(model: TLModel, parent: torch.nn.Module, attr: str, name: str, point: HookPoint) -> None:
    """Undo `add_hook_point` (and drop every hook on the point)."""
    point.remove_hooks("both", including_permanent=True)
    if getattr(parent, attr, None) is point:
        delattr(parent, attr)
    registry = getattr(model, "_hook_registry", None)
    if registry is not None and registry.get(name) is point:
        del registry[name]


def refresh_hook_dict(model: TLModel) -> None:
    """Make ``model.hook_dict`` list the hook points that exist now."""
    if adapter(model).kind == "hooked":  # HookedTransformer rebuilds hook_dict from modules
        model.setup()
