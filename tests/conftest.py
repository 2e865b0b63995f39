"""Shared fixtures: tiny random models on both backends, and the embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepflow_tl.tl.models import load_embedded_tokenizer, load_model, make_tiny_hf


def _has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


HAS_HOOKED = _has_hooked_transformer()


def pytest_report_header(config):
    """Which lane this is: the versions that decide whether the suite passes."""
    from importlib.metadata import version

    return "lane: " + ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "transformer-lens"))
# The real traces live in shared/, beside the repository (CI clones main next to it).
R1_TRACES = next(
    (p for p in (Path(__file__).resolve().parents[2] / "shared" / "data" / "r1_traces.jsonl",
                 Path("/work/shared/data/r1_traces.jsonl")) if p.is_file()),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "r1_traces.jsonl",
)
BACKENDS = ["bridge", "hooked"] if HAS_HOOKED else ["bridge"]
needs_hooked = pytest.mark.skipif(
    not HAS_HOOKED, reason="HookedTransformer exists only in TransformerLens 3.9 (the tl39 lane)"
)


@pytest.fixture(scope="session")
def tokenizer():
    return load_embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_hf():
    """The random transformers model behind every tiny TL model (fp32, eager)."""
    return make_tiny_hf(n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=0)


def _tiny(backend, tiny_hf, tokenizer):
    return load_model("tiny-llama", backend=backend, hf_model=tiny_hf, tokenizer=tokenizer, device="cpu")


@pytest.fixture(scope="session")
def tiny_bridge(tiny_hf, tokenizer):
    return _tiny("bridge", tiny_hf, tokenizer)


@pytest.fixture(scope="session")
def tiny_hooked(tiny_hf, tokenizer):
    if not HAS_HOOKED:
        pytest.skip("HookedTransformer exists only in TransformerLens 3.9 (the tl39 lane)")
    return _tiny("hooked", tiny_hf, tokenizer)


@pytest.fixture(params=BACKENDS)
def tiny_model(request, tiny_hf, tokenizer):
    """A tiny model on each backend this TransformerLens version has."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def smollm2():
    return load_model(backend="bridge", device="cpu")


@pytest.fixture(scope="session")
def smollm2_hooked():
    if not HAS_HOOKED:
        pytest.skip("HookedTransformer exists only in TransformerLens 3.9 (the tl39 lane)")
    return load_model(backend="hooked", device="cpu")


@pytest.fixture(autouse=True)
def _no_leaked_grad_mode():
    """Every test starts with grad enabled and leaves it that way."""
    assert torch.is_grad_enabled()
    yield
    assert torch.is_grad_enabled(), "a test left torch.no_grad() active"
