"""vLLM as a generation engine for StepFlow, exact to the TransformerLens path.

The only module of the package that imports vLLM (tests/test_layout.py checks it); it
reaches into vLLM's model runner, so it checks vLLM's version against the locked range.

How it works (docs/vllm.md). vLLM runs the model in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager mode), and PyTorch hooks on its modules
apply the same `Intervention` objects as the TL path, through their backend-free edits
(``AttentionIntervention.edit_scores``, ``StepMomentum.edit_z``):

- a forward pre-hook on the model reads which requests the flattened batch holds (the
  runner's request order and ``query_start_loc``, the positions), feeds each request's
  new tokens to its `RowTracker` and builds the `StepState` of the forward: one for
  all requests that decode one token (left-padded, as TL's batch), one per request
  that runs several (a prefill chunk, or a recompute after preemption, which re-runs
  tokens the tracker already has);
- on the layers an attention intervention edits, the layer's ``Attention`` module runs
  our ``forward`` instead of vLLM's for the call (`_ForwardSwap`): it keeps the rotated
  keys and values per request in our own store and computes the attention from the
  store with the edit applied to the scores, so vLLM's kernel does not run there (its
  kernels expose no scores and no per-key bias, so nothing here depends on a kernel:
  the same code runs on CPU and GPU);
- on the layers SMI edits, the same ``forward`` keeps the values and then runs vLLM's,
  and a forward pre-hook on ``o_proj`` adds the injection to its input (the per-head
  attention output ``z``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import StepflowError
from ..interventions.base import InterventionEvent, InterventionRun, PerStateCache, layer_indices
from ..interventions.bridge import AttentionIntervention
from ..interventions.generate import Generation, Prompts, prepare_prompts
from ..interventions.momentum import StepMomentum
from ..interventions.state import RowTracker, StepState
from ..interventions.stepflow import StepFlow
from ..tl.adapter import Tokenizer
from ..tl.models import embedded_hf_dir, load_tokenizer, publish_folder
from ..traces.formats import decode
from ..traces.trace import Trace, TraceWarning

# The vLLM releases whose model runner this module was written against (the lock's).
VLLM_MIN, VLLM_BELOW = (0, 32, 0), (0, 33, 0)
# Architectures whose attention block is qkv_proj -> rotary -> Attention -> o_proj with
# plain causal softmax attention (no sliding window, soft cap or ALiBi), checked per layer.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
EMBEDDED_ALIASES = (None, "smollm2", "embedded", "HuggingFaceTB/SmolLM2-135M-Instruct")
LANE_HINT = ("the vLLM engine needs vLLM: set up its lane with `make .venv-vllm/.stepflow-installed` and "
             "run .venv-vllm/bin/stepflow-tl (or .venv-vllm/bin/python)")


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def check_vllm():
    """Import vLLM or say how to get it; refuse a version outside the locked range."""
    try:
        import vllm
    except ImportError as err:
        raise StepflowError(LANE_HINT) from err
    found = _version_tuple(vllm.__version__)
    if not VLLM_MIN <= found < VLLM_BELOW:
        raise StepflowError(
            f"vLLM {vllm.__version__} is outside the range this engine supports "
            f"(>={'.'.join(map(str, VLLM_MIN))},<{'.'.join(map(str, VLLM_BELOW))}); "
            "install the locked one (requirements/vllm.lock)")
    return vllm


# --------------------------------------------------------------------------- model folders
def save_for_vllm(hf_model: torch.nn.Module, tokenizer: Tokenizer, folder: Union[str, Path]) -> Path:
    """Write a transformers model and its tokenizer as a folder vLLM loads.

    vLLM needs ``architectures`` in config.json, and it reads a tied embedding only
    under ``model.embed_tokens.weight`` (with only ``lm_head.weight`` it generates
    token 0), so the tied matrix is stored under that name alone.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_model.config.to_dict()
    config["architectures"] = [type(hf_model).__name__]
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str), encoding="utf-8")
    weights = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        weights[name] = tensor.detach().contiguous().clone()
    save_file(weights, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(str(folder))
    return folder


def embedded_model_dir() -> Path:
    """A folder vLLM loads with the embedded SmolLM2-135M-Instruct: the converted copy
    of the GGUF (``tl.models.embedded_hf_dir``) with config and tied embedding as vLLM
    reads them (`save_for_vllm`), made once next to it."""
    source = embedded_hf_dir()
    target = source.parent / (source.name + "-vllm")
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import load_file, save_file

    def write(staging: Path) -> None:
        for item in source.iterdir():
            if item.name not in ("config.json", "model.safetensors"):
                shutil.copy(item, staging / item.name)
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        config["architectures"] = ["LlamaForCausalLM"]
        (staging / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        weights = load_file(str(source / "model.safetensors"))
        if "model.embed_tokens.weight" not in weights:
            weights["model.embed_tokens.weight"] = weights.pop("lm_head.weight")
        save_file(weights, str(staging / "model.safetensors"))

    return publish_folder(target, write)


# --------------------------------------------------------------------------- the store
class _Store:
    """Per-request keys or values of one layer, ``[slot, kv_head, position, d_head]``
    (a request's positions contiguous per head, as the attention reads them), grown by
    doubling (positions and slots)."""

    def __init__(self):
        self.buf: Optional[torch.Tensor] = None

    def write(self, slots: torch.Tensor, positions: torch.Tensor, values: torch.Tensor,
              n_slots: int, n_pos: int) -> None:
        """``values`` ``[token, kv_head, d_head]`` of the flattened batch at ``(slots, positions)``."""
        buf = self.buf
        if buf is None or buf.shape[0] < n_slots or buf.shape[2] < n_pos:
            shape = (max(n_slots, 2 * buf.shape[0] if buf is not None else n_slots), values.shape[1],
                     max(n_pos, 2 * buf.shape[2] if buf is not None else 256), values.shape[2])
            grown = values.new_zeros(shape)
            if buf is not None:
                grown[:buf.shape[0], :, :buf.shape[2]] = buf
            self.buf = buf = grown
        buf[slots, :, positions] = values

    def rows(self, group: "_Group") -> torch.Tensor:
        """``[row, kv_head, width, d_head]`` of the group's rows at their own positions
        (column ``j`` is position ``j``; columns past a row's end hold stale values,
        which the attention gives no weight)."""
        return self.buf[:, :, :group.width].index_select(0, group.slot_index)

    def gather(self, group: "_Group") -> torch.Tensor:
        """``[row, width, kv_head, d_head]`` of the group's rows, left-padded like its state
        (padding columns hold some row's values; the masks give them no weight)."""
        return self.buf[group.slot_index[:, None], :, group.key_index]


@dataclass
class _Request:
    """One prompt of a call: its tokens so far, tracker, store slot and timings."""

    index: int
    prompt_ids: List[int]
    seed: int
    tracker: Optional[RowTracker]
    tokens: List[int] = field(default_factory=list)
    slot: int = -1
    scheduled: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    arrays: Optional[Dict[str, np.ndarray]] = None
    synced: int = 0
    rerun: int = 0

    def feed(self, start: int, tokens: Sequence[int]) -> None:
        """The tokens vLLM runs at positions ``start...``: known ones (a prefill of the
        prompt, a recompute after preemption) must match, new ones go to the tracker."""
        for offset, token in enumerate(tokens):
            pos = start + offset
            if pos < len(self.tokens):
                self.rerun += pos >= len(self.prompt_ids)  # a preempted request recomputing its output
                if self.tokens[pos] != token:
                    raise StepflowError(f"vLLM ran token {token} at position {pos} of prompt {self.index}, "
                                        f"which holds {self.tokens[pos]}; the step state would be wrong")
                continue
            if pos != len(self.tokens):
                raise StepflowError(f"vLLM skipped positions {len(self.tokens)}..{pos - 1} of prompt {self.index} "
                                    "(prefix caching?); the step state needs every token")
            self.tokens.append(int(token))
            if self.tracker is not None and self.tracker.push(int(token)):
                self.synced = 0  # earlier positions were re-labelled

    def columns(self) -> Dict[str, np.ndarray]:
        """The tracker's row as numpy arrays (only what changed is copied), so a batch
        state is a few slice copies and one transfer per tensor, not Python lists."""
        row = self.tracker.row
        n = len(row.step_id)
        if self.arrays is None or self.arrays["step_id"].shape[0] < n:
            cap = max(2 * n, 256)
            old = self.arrays
            self.arrays = {k: np.zeros(cap, dtype=t) for k, t in _COLUMN_TYPES.items()}
            if old is not None:
                for k in self.arrays:
                    self.arrays[k][:self.synced] = old[k][:self.synced]
        if self.synced < n:
            for k in _COLUMN_TYPES:
                self.arrays[k][self.synced:n] = getattr(row, k)[self.synced:n]
            self.synced = n
        return self.arrays


_COLUMN_TYPES = {"segment_code": np.int8, "step_id": np.int32, "current_segment": np.int8, "new_step": np.bool_}


def _batch_state(requests: List[_Request], ends: List[int], device: torch.device) -> StepState:
    """The `StepState` of rows ``requests`` over their first ``ends`` positions,
    left-padded (what ``StepState.from_rows`` builds, from the rows' numpy columns)."""
    width, rows = max(ends), len(requests)
    out = {k: np.zeros((rows, width), dtype=t) for k, t in _COLUMN_TYPES.items()}
    out["step_id"].fill(-1)
    prefill = np.zeros((rows, width), dtype=np.bool_)
    for r, (req, end) in enumerate(zip(requests, ends)):
        cols = req.columns()
        for k in _COLUMN_TYPES:
            out[k][r, width - end:] = cols[k][:end]
        prefill[r, width - end: width - end + min(len(req.prompt_ids), end)] = True
    move = lambda a: torch.from_numpy(a).to(device)
    return StepState(
        segment_code=move(out["segment_code"]), step_id=move(out["step_id"]),
        current_segment=move(out["current_segment"]), new_step=move(out["new_step"]), prefill=move(prefill),
        pad=torch.tensor([width - end for end in ends], dtype=torch.int64, device=device),
        row_seed=torch.tensor([req.seed for req in requests], dtype=torch.int64, device=device),
        last_starts_step=bool(out["new_step"][:, -1].any()),
    )


@dataclass
class _Group:
    """Rows of one forward that share a `StepState`: every request decoding one token,
    or one request running several."""

    requests: List[_Request]
    token_index: torch.Tensor  # [row * query] indices into the flattened batch
    slot_index: torch.Tensor  # [row]
    key_index: torch.Tensor  # [row, width] store positions, left-padded
    q_len: int
    width: int
    state: StepState
    allowed: torch.Tensor  # [row, 1, query, width] causal mask of the left-padded scores
    # Left-padded column of each position ([row, 1, 1, width]; past a row's end: any
    # column) and where a position exists; None when no row is padded (one request).
    unpad_index: Optional[torch.Tensor] = None
    real: Optional[torch.Tensor] = None
    runs: Dict[int, InterventionRun] = field(default_factory=dict)
    caches: Dict[int, PerStateCache] = field(default_factory=dict)

    def run(self, k: int, iv) -> InterventionRun:
        if k not in self.runs:
            self.runs[k] = InterventionRun(iv.name, self.state)
            self.caches[k] = PerStateCache()
        return self.runs[k]


class _ForwardSwap:
    """``module.forward`` replaced by ``forward`` until `remove` (a hook handle's
    interface, so the call's ``finally`` restores it with the hooks): a hook that
    replaces a module's output rather than edits it, so the module's own work is
    skipped."""

    def __init__(self, module: torch.nn.Module, forward):
        if "forward" in module.__dict__:
            raise StepflowError(f"{type(module).__name__}.forward is already replaced (another generate call "
                                "running on this engine?); one generate call at a time per engine")
        self.module = module
        module.forward = forward

    def remove(self) -> None:
        if "forward" in self.module.__dict__:
            del self.module.forward


def _flatten(interventions) -> list:
    """The parts that act, in hook order: a `StepFlow` is its OEB then its SMI."""
    out = []
    for iv in interventions:
        if isinstance(iv, StepFlow):
            out.extend(_flatten(iv.parts()))
        elif isinstance(iv, (AttentionIntervention, StepMomentum)):
            out.append(iv)
        else:
            raise StepflowError(f"the vLLM engine cannot apply {type(iv).__name__}: it applies StepFlow, "
                                "OddsEqualBridge, StepMomentum and their controls; use engine='tl' for others")
    return out


class _Hooks:
    """The hooks of one `VLLMEngine.generate` call and the state they share."""

    def __init__(self, engine: "VLLMEngine", requests: Dict[str, _Request], interventions: list):
        self.engine = engine
        self.requests = requests
        self.interventions = interventions
        n_layers = engine.n_layers
        self.attn_edits: Dict[int, List[int]] = {}
        self.z_edits: Dict[int, List[int]] = {}
        for k, iv in enumerate(interventions):
            layers = layer_indices(iv.layers, n_layers)
            bad = [layer for layer in layers if not 0 <= layer < n_layers]
            if bad:
                raise StepflowError(f"layers {bad} are outside the model, which has {n_layers} layers "
                                    f"(0..{n_layers - 1}); choose layers in that range or a band name")
            target = self.attn_edits if isinstance(iv, AttentionIntervention) else self.z_edits
            for layer in layers:
                target.setdefault(layer, []).append(k)
        self.keys = {layer: _Store() for layer in self.attn_edits}
        self.values = {layer: _Store() for layer in set(self.attn_edits) | set(self.z_edits)}
        self.head_to_kv = torch.arange(engine.n_heads, device=engine.device) // (engine.n_heads // engine.n_kv_heads)
        self.groups: List[_Group] = []
        self.covered = 0  # tokens of this forward in a group
        self.n_tokens = 0
        self.token_slots = self.token_positions = None
        self.events: List[InterventionEvent] = []
        self.slots_used = 0
        self.free_slots: List[int] = []
        self.by_internal_id: Dict[str, _Request] = {}
        self.forwards = 0

    # ------------------------------------------------------------------ bookkeeping
    def request(self, internal_id: str) -> _Request:
        req = self.by_internal_id.get(internal_id)
        if req is None:
            # vLLM appends "-<random hex>" to the id a request was added with
            external = internal_id if internal_id in self.requests else internal_id.rsplit("-", 1)[0]
            if external not in self.requests:
                raise StepflowError(f"vLLM ran a request {internal_id!r} this call did not add; "
                                    "one generate call at a time per engine")
            req = self.by_internal_id[internal_id] = self.requests[external]
        return req

    def release(self, req: _Request) -> None:
        if req.slot >= 0:
            self.free_slots.append(req.slot)
            req.slot = -1

    def flush_events(self) -> None:
        for group in self.groups:
            for run in group.runs.values():
                self.events.extend(run.take_events([r.index for r in group.requests]))
        self.groups = []

    # ------------------------------------------------------------------ hooks
    def on_forward(self, module, args, kwargs):
        """Model pre-hook: which request each token of the flattened batch belongs to."""
        self.flush_events()
        self.covered = 0
        self.forwards += 1
        runner = self.engine.runner
        n = runner.input_batch.num_reqs
        req_ids = list(runner.input_batch.req_ids[:n])
        starts = runner.query_start_loc.np[:n + 1].tolist()
        total = int(starts[-1])
        self.n_tokens = total
        if not total:
            return None
        positions = kwargs["positions"][:total].tolist()
        token_ids = kwargs["input_ids"][:total].tolist()
        now = time.perf_counter()
        dev = self.engine.device
        decoding: List[tuple] = []
        slots, poss = [], []
        for r, internal in enumerate(req_ids):
            req = self.request(internal)
            s, e = starts[r], starts[r + 1]
            if req.slot < 0:
                req.slot = self.free_slots.pop() if self.free_slots else self.slots_used
                self.slots_used = max(self.slots_used, req.slot + 1)
                req.scheduled = req.scheduled or now
            req.feed(positions[s], token_ids[s:e])
            slots.extend([req.slot] * (e - s))
            poss.extend(positions[s:e])
            if req.tracker is None:
                continue
            if e - s == 1:
                decoding.append((req, s, positions[s] + 1))
            else:
                self.groups.append(self.group([req], list(range(s, e)), [positions[e - 1] + 1], e - s))
        if decoding:
            self.groups.append(self.group([d[0] for d in decoding], [d[1] for d in decoding],
                                          [d[2] for d in decoding], 1))
        self.token_slots = torch.tensor(slots, dtype=torch.long, device=dev)
        self.token_positions = torch.tensor(poss, dtype=torch.long, device=dev)
        self.n_pos = max(poss) + 1
        return None

    def group(self, requests: List[_Request], tokens: List[int], ends: List[int], q_len: int) -> _Group:
        """The rows' state and the index tensors their attention reuses at every layer."""
        dev = self.engine.device
        width = max(ends)
        state = _batch_state(requests, ends, dev)
        if q_len > 1 and ends[0] <= len(requests[0].prompt_ids):
            state.phase = "prefill"  # every query is a prompt token
        columns = torch.arange(width, device=dev)
        pads = state.pad
        query_columns = columns[width - q_len:]
        allowed = (columns[None, None, :] >= pads[:, None, None]) & (columns[None, None, :] <= query_columns[None, :, None])
        unpad_index = real = None
        if min(ends) != width:
            unpad_index = (columns[None, :] + pads[:, None]).clamp_max(width - 1)[:, None, None, :]
            real = (columns[None, :] < (width - pads)[:, None])[:, None, None, :]
        self.covered += len(requests) * q_len
        return _Group(
            requests=requests, token_index=torch.tensor(tokens, dtype=torch.long, device=dev),
            slot_index=torch.tensor([req.slot for req in requests], dtype=torch.long, device=dev),
            key_index=(columns[None, :] - pads[:, None]).clamp_min(0), q_len=q_len, width=width, state=state,
            allowed=allowed[:, None], unpad_index=unpad_index, real=real,
        )

    def on_attention(self, layer: int, forward):
        """The ``forward`` of layer ``layer``'s ``Attention`` module while the hooks are
        installed: keep the keys and values in the store; on a layer an attention
        intervention edits, compute the attention from the store (vLLM's kernel is not
        run, its KV cache for the layer not written: nothing reads it in this call,
        and a later call's requests are prefilled anew, prefix caching being off);
        elsewhere, vLLM's ``forward``."""
        engine = self.engine
        edits = self.attn_edits.get(layer)

        def attention(query, key, value, *args, **kwargs):
            total = self.n_tokens
            if not total:
                return forward(query, key, value, *args, **kwargs)
            if layer in self.keys:
                self.keys[layer].write(self.token_slots, self.token_positions,
                                       key[:total].reshape(total, engine.n_kv_heads, engine.head_dim),
                                       self.slots_used, self.n_pos)
            self.values[layer].write(self.token_slots, self.token_positions,
                                     value[:total].reshape(total, engine.n_kv_heads, engine.head_dim),
                                     self.slots_used, self.n_pos)
            if not edits:
                return forward(query, key, value, *args, **kwargs)
            if self.covered != total:
                raise StepflowError(f"the step state covers {self.covered} of the {total} tokens vLLM runs; "
                                    "every request of a call with interventions needs a tracker")
            output = query.new_zeros((query.shape[0], engine.n_heads * engine.head_dim))
            out = output.view(output.shape[0], engine.n_heads, engine.head_dim)
            queries = query[:total].reshape(total, engine.n_heads, engine.head_dim)
            for group in self.groups:
                out[group.token_index] = self.attend(layer, group, queries, edits)
            return output

        return attention

    def attend(self, layer: int, group: _Group, queries: torch.Tensor, edits: List[int]) -> torch.Tensor:
        """Attention of one group's queries from the store, with the scores edited:
        ``[row * query, head, d_head]``.

        Keys and values are read at their own positions (one copy each, no padding,
        grouped query heads not repeated); only the scores, ``d_head`` times smaller,
        go to the state's left-padded layout, where the edits read them, and the
        pattern comes back."""
        engine = self.engine
        rows, q_len, width = len(group.requests), group.q_len, group.width
        n_kv, share = engine.n_kv_heads, engine.n_heads // engine.n_kv_heads
        # [row, kv, share * query, d]: query heads that share a kv head side by side
        q = queries[group.token_index].view(rows, q_len, n_kv, share, engine.head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(rows, n_kv, share * q_len, engine.head_dim)
        k = self.keys[layer].rows(group)  # [row, kv, width, d]
        v = self.values[layer].rows(group)
        scores = (torch.matmul(q, k.transpose(-1, -2)) * engine.scale).view(rows, engine.n_heads, q_len, width)
        if group.unpad_index is not None:
            scores = scores.gather(-1, group.key_index[:, None, None, :].expand_as(scores))
        scores = scores.masked_fill(~group.allowed, float("-inf"))
        for k_iv in edits:
            iv = self.interventions[k_iv]
            scores = iv.edit_scores(group.run(k_iv, iv), layer, scores, group.caches[k_iv])
        pattern = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        if group.unpad_index is not None:
            pattern = pattern.gather(-1, group.unpad_index.expand_as(pattern)) * group.real
        z = torch.matmul(pattern.view(rows, n_kv, share * q_len, width), v)  # [row, kv, share * query, d]
        z = z.view(rows, n_kv, share, q_len, engine.head_dim).permute(0, 3, 1, 2, 4)
        return z.reshape(rows * q_len, engine.n_heads, engine.head_dim)

    def on_o_proj(self, layer: int):
        engine = self.engine
        edits = self.z_edits[layer]

        def hook(module, args):
            if not self.n_tokens or not self.groups:
                return None
            x = args[0]
            changed = False
            for group in self.groups:
                rows, q_len = len(group.requests), group.q_len
                z = x[group.token_index].view(rows, q_len, engine.n_heads, engine.head_dim)
                new = z
                for k_iv in edits:
                    iv = self.interventions[k_iv]
                    new = iv.edit_z(group.run(k_iv, iv), layer, new, lambda g=group: self.values[layer].gather(g),
                                    self.head_to_kv, group.caches[k_iv])
                if new is not z:
                    if not changed:
                        x, changed = x.clone(), True
                    x[group.token_index] = new.reshape(rows * q_len, -1)
            return (x,) + tuple(args[1:]) if changed else None

        return hook


class VLLMEngine:
    """A vLLM engine that generates with StepFlow's interventions.

    Args:
        model: a local model folder vLLM can load (one of `SUPPORTED_ARCHITECTURES`;
            `save_for_vllm` writes one from a transformers model), or ``None`` /
            ``"smollm2"`` for the embedded SmolLM2-135M-Instruct.
        dtype: ``"float32"`` (the exactness tests), ``"bfloat16"``, ...
        max_num_seqs: requests decoded at once (vLLM's continuous batch).
        max_model_len: longest prompt + output.
        seed: vLLM's seed (sampling seeds are per row anyway).
        **vllm_args: passed to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``); options
            the engine cannot apply exactly are refused: prefix caching (it would skip
            the tracker's tokens), speculative decoding, tensor or pipeline parallelism
            (hooks would see a shard of heads and of the state), CUDA graphs / compilation
            (hooks must run eagerly).

    One engine per process (vLLM's own limit in practice: it holds the weights and its
    KV cache); `close` frees it.
    """

    def __init__(self, model: Optional[str] = None, *, dtype: str = "float32", max_num_seqs: int = 64,
                 max_model_len: int = 4096, seed: int = 0, **vllm_args: Any):
        refused = {
            "enable_prefix_caching": "prefix caching skips prompt tokens vLLM has cached, which the step "
                                     "tracker and the key/value store need",
            "speculative_config": "speculative decoding runs draft tokens the step state does not follow",
            "tensor_parallel_size": "tensor parallelism splits the heads across workers, whose hooks this "
                                    "engine does not reach; run one engine per device (data parallel) instead",
            "pipeline_parallel_size": "pipeline parallelism runs layers in other workers, whose hooks this "
                                      "engine does not reach",
            "enforce_eager": "the hooks need eager execution (no CUDA graphs, no compilation)",
        }
        allowed = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "enforce_eager": True,
                   "enable_prefix_caching": False, "speculative_config": None}
        for key, why in refused.items():
            if key in vllm_args and vllm_args[key] not in (allowed[key],):
                raise StepflowError(f"{key}={vllm_args[key]!r} is not supported by the StepFlow vLLM engine: {why}")
            vllm_args.pop(key, None)
        vllm = check_vllm()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise StepflowError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (or unset): the hooks need the "
                                "model in this process")
        # vLLM reads these when the engine starts: the model in this process (hooks
        # reach it), and no pinning of OpenMP threads to cores, which on a shared
        # machine made decoding ~45x slower (set it to "auto" for vLLM's default).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if model in EMBEDDED_ALIASES:
            path = embedded_model_dir()
        else:
            path = Path(model)
            if not (path / "config.json").is_file():
                raise StepflowError(f"{model!r} is not a model folder (no config.json); give a local folder "
                                    "vLLM can load (stepflow_tl.engines.vllm.save_for_vllm writes one) or 'smollm2'")
            architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
            if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
                raise StepflowError(f"the vLLM engine supports {', '.join(SUPPORTED_ARCHITECTURES)}; {model!r} is "
                                    f"{architectures or 'of no declared architecture'} (config.json 'architectures')")
        self.path = path
        self.name = "SmolLM2-135M-Instruct" if model in EMBEDDED_ALIASES else path.name
        try:
            self.tokenizer = load_tokenizer(path)
            self.llm = vllm.LLM(model=str(path), dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                seed=seed, enforce_eager=True, enable_prefix_caching=False, **vllm_args)
        except (ValueError, TypeError, OSError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise StepflowError(f"vLLM could not load {str(path)!r}: {first[:300]} (check the folder's config.json "
                                "and weights, and the engine's options)") from err
        self._request_counter = 0
        try:
            self._inspect()
        except BaseException:
            self.close()
            raise

    def _inspect(self) -> None:
        core = self.llm.llm_engine.engine_core.engine_core
        self.runner = core.model_executor.driver_worker.worker.model_runner
        self.model = self.runner.model
        name = type(self.model).__name__
        if name not in SUPPORTED_ARCHITECTURES:
            raise StepflowError(f"the vLLM engine supports {', '.join(SUPPORTED_ARCHITECTURES)}, not {name}")
        self.layers = list(self.model.model.layers)
        attn = self.layers[0].self_attn.attn
        for i, layer in enumerate(self.layers):
            a = layer.self_attn.attn
            if a.sliding_window is not None or getattr(a.impl, "logits_soft_cap", None) or \
                    getattr(a.impl, "alibi_slopes", None) is not None:
                raise StepflowError(f"layer {i} uses sliding-window, soft-capped or ALiBi attention, which the "
                                    "vLLM engine does not reproduce; use engine='tl'")
        self.n_layers = len(self.layers)
        self.d_model = int(self.llm.llm_engine.model_config.get_hidden_size())
        self.n_heads, self.n_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_size
        self.scale = float(attn.impl.scale)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype

    @staticmethod
    def software() -> Dict[str, str]:
        """The version of vLLM (a study's config records it: other numerics)."""
        return {"vllm": check_vllm().__version__}

    def close(self) -> None:
        """Free the engine (weights and KV cache)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            core = llm.llm_engine.engine_core
            shutdown = getattr(core, "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm
            import gc

            gc.collect()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def generate(
        self,
        prompts: Prompts,
        *,
        max_new_tokens: Union[int, Sequence[int]] = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        interventions: Sequence = (),
        stop: Sequence[str] = (),
        format: str = "auto",
        chat: bool = True,
        system: Optional[str] = None,
        split: str = "auto",
        questions: Optional[Sequence[str]] = None,
    ) -> List[Generation]:
        """`stepflow_tl.generate` on vLLM: the same arguments (``batch_size`` is vLLM's
        ``max_num_seqs``, continuous batching), the same `Generation` objects.

        Greedy tokens are those of the TL teacher-forced forward with the same
        interventions (up to near-ties); sampled ones use vLLM's sampler seeded with the
        row seed, so they differ from the TL engine's draws.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if "llm" not in self.__dict__:
            raise StepflowError("this VLLMEngine was closed; make a new one")
        tok = self.tokenizer
        batch = prepare_prompts(tok, prompts, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                                top_p=top_p, stop=stop, format=format, chat=chat, system=system, split=split,
                                questions=questions)
        too_long = [i for i, (ids, n) in enumerate(zip(batch.ids, batch.budgets))
                    if len(ids) + n > self.llm.llm_engine.model_config.max_model_len]
        if too_long:
            raise StepflowError(f"prompts {too_long[:5]} with their token budget exceed the engine's "
                                f"max_model_len={self.llm.llm_engine.model_config.max_model_len}; make the "
                                "engine with a larger max_model_len or lower max_new_tokens")
        parts = _flatten(list(interventions))
        self._request_counter += 1
        tag = f"sf{self._request_counter}"
        requests: Dict[str, _Request] = {}
        for i, ids in enumerate(batch.ids):
            tracker = None
            if parts:
                tracker = RowTracker(tok, batch.format, batch.split, batch.texts[i], batch.questions[i])
                if tracker.prompt_ids != ids:
                    raise StepflowError("the tracker tokenised the prompt differently from generate")
            requests[f"{tag}-{i}"] = _Request(index=i, prompt_ids=list(ids), seed=batch.seeds[i], tracker=tracker,
                                              tokens=list(ids))
        hooks = _Hooks(self, requests, parts)
        handles = [self.model.register_forward_pre_hook(hooks.on_forward, with_kwargs=True)]
        outputs: Dict[int, object] = {}
        engine = self.llm.llm_engine
        try:
            for layer in hooks.values:
                attn = self.layers[layer].self_attn.attn
                handles.append(_ForwardSwap(attn, hooks.on_attention(layer, attn.forward)))
            for layer in hooks.z_edits:
                handles.append(self.layers[layer].self_attn.o_proj.register_forward_pre_hook(hooks.on_o_proj(layer)))
            for name, req in requests.items():
                params = SamplingParams(
                    max_tokens=batch.budgets[req.index], temperature=temperature if do_sample else 0.0,
                    top_p=top_p if do_sample else 1.0, seed=req.seed, stop=list(batch.stop) or None,
                    detokenize=bool(batch.stop),
                )
                engine.add_request(name, TokensPrompt(prompt_token_ids=req.prompt_ids), params)
            while engine.has_unfinished_requests():
                step_outputs = engine.step()
                now = time.perf_counter()
                for out in step_outputs:
                    req = requests.get(out.request_id) or hooks.request(out.request_id)
                    req.started = req.started or now
                    if out.finished:
                        req.finished = now
                        outputs[req.index] = out.outputs[0]
                        hooks.release(req)
            hooks.flush_events()
        finally:
            for handle in handles:
                handle.remove()
            if engine.has_unfinished_requests():  # an error mid-call: leave the engine idle
                engine.abort_request(list(requests))
        # What vLLM's scheduling did in this call (for tests and curiosity).
        self.last_call_stats = {"forwards": hooks.forwards, "recomputed_tokens": sum(r.rerun for r in requests.values()),
                                "store_slots": hooks.slots_used}
        names = [repr(iv) for iv in interventions]
        return [self._generation(batch, req, outputs[req.index], hooks.events, names) for req in requests.values()]

    def _generation(self, batch, req: _Request, out, events: List[InterventionEvent], names: List[str]) -> Generation:
        i = req.index
        ids = batch.ids[i]
        output_ids = [int(t) for t in out.token_ids]
        eos = self.tokenizer.eos_token_id
        if out.finish_reason == "length":
            reason = "length"
        elif out.stop_reason is None and output_ids and output_ids[-1] == eos:
            reason = "eos"
        else:
            reason = "stop"
        text = decode(self.tokenizer, output_ids[:-1] if reason == "eos" else output_ids)
        if reason == "stop":
            found = [text.find(x) for x in batch.stop if x in text]
            if found:
                text = text[: min(found)]
        with warnings.catch_warnings():
            # An output cut by the budget has no summary; Trace says so in `complete`.
            warnings.simplefilter("ignore", TraceWarning)
            trace = Trace.from_ids(self.tokenizer, ids, output_ids, format=batch.format, question=batch.questions[i],
                                   split=batch.split, allow_no_thinking=True)
        # Events name the step of the final labelling (the tracker may re-label earlier
        # tokens when a multi-token tag completes), as the TL path's do.
        steps = trace.token_steps.tolist()
        stop_at = len(ids) + len(output_ids) - 1
        # A preempted request recomputes its tokens and records their events again: keep one.
        latest = {(e.intervention, e.layer, e.position): e for e in events if e.row == i and e.position < stop_at}
        mine = list(latest.values())
        mine = [InterventionEvent(**{**e.__dict__, "step": int(steps[e.position])}) for e in mine]
        prefill_s = max(req.started - req.scheduled, 0.0)
        decode_s = max(req.finished - req.started, 0.0)
        return Generation(
            prompt=batch.texts[i], text=text, trace=trace, prompt_ids=list(ids), output_ids=output_ids,
            events=mine, stop_reason=reason, seed=req.seed, prefill_s=prefill_s, decode_s=decode_s,
            tokens_per_s=len(output_ids) / decode_s if decode_s > 0 else float("nan"),
            format=batch.format, split=batch.split, interventions=names,
        )
