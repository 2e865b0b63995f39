"""Issue 2: loading real models offline on both backends, and the backend layer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import HAS_HOOKED, needs_hooked

from stepflow_tl import ModelLoadError, UnsupportedModelError, load_model
from stepflow_tl.tl.adapter import adapter
from stepflow_tl.tl.models import load_embedded_hf, make_tiny_hf

TEXT = "Question: what is 12 + 30?\n\nFirst, 12 + 30 = 42.\n\nAnswer: 42"


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(ids).float(), -1)


@pytest.mark.smollm2
def test_bridge_matches_transformers_on_smollm2(smollm2):
    hf, tokenizer = load_embedded_hf()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = torch.log_softmax(hf(ids).logits, -1)
    assert (_logprobs(smollm2, ids) - reference).abs().max() < 1e-4


@pytest.mark.smollm2
@needs_hooked
def test_hooked_matches_bridge_and_transformers_on_smollm2(smollm2, smollm2_hooked):
    hf, tokenizer = load_embedded_hf()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = torch.log_softmax(hf(ids).logits, -1)
    hooked = _logprobs(smollm2_hooked, ids)
    assert (hooked - reference).abs().max() < 1e-4
    assert (hooked - _logprobs(smollm2, ids)).abs().max() < 1e-4


def test_adapter_reports_grouped_query_shapes(tiny_model):
    a = adapter(tiny_model)
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.d_model, a.d_head) == (3, 4, 2, 64, 16)
    assert a.W_O(1).shape == (4, 16, 64)
    with pytest.raises(ValueError, match="outside the model"):
        a.check_layers([0, 3])


def test_w_o_reproduces_the_attention_output(tiny_model):
    """adapter.W_O is the real projection: z @ W_O equals hook_attn_out (no bias)."""
    ids = torch.arange(10, 30)[None]
    _, cache = tiny_model.run_with_cache(ids)
    z = cache["blocks.1.attn.hook_z"]
    projected = torch.einsum("bphd,hdm->bpm", z, adapter(tiny_model).W_O(1))
    assert torch.allclose(projected, cache["blocks.1.hook_attn_out"], atol=1e-5)


def test_kv_cached_decoding_matches_full_forward_with_left_padding(tiny_model):
    a = adapter(tiny_model)
    long, short = torch.arange(100, 112), torch.arange(200, 205)
    pad = long.shape[0] - short.shape[0]
    tokens = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(tokens)
    mask[1, :pad] = 0
    with torch.no_grad():
        logits, state = a.prefill(tokens, mask)
        steps = [logits[:, -1]]
        nxt = torch.tensor([[7], [9]])
        generated = [nxt]
        for _ in range(3):
            logits, state = a.decode(state, nxt)
            steps.append(logits[:, -1])
            nxt = logits[:, -1:].argmax(-1)
            generated.append(nxt)
        for row, prompt in enumerate((long, short)):
            full = torch.cat([prompt] + [g[row] for g in generated[:-1]])
            alone = tiny_model(full[None])[0]
            # the last len(steps) positions of the unpadded run
            expected = alone[-len(steps):]
            got = torch.stack([s[row] for s in steps])
            assert (got - expected).abs().max() < 1e-4, row


def test_prefill_of_the_last_position_only(tiny_model):
    """``last_only``: the last position's logits (the bridge unembeds that position only)
    and the same cache, so decoding goes on identically."""
    a = adapter(tiny_model)
    tokens = torch.stack([torch.arange(100, 112), torch.arange(200, 212)])
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    with torch.no_grad():
        full, state = a.prefill(tokens, mask)
        last, state_last = a.prefill(tokens, mask, last_only=True)
        assert last.shape == (2, 1, full.shape[-1])
        torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
        nxt = torch.tensor([[7], [9]])
        assert torch.equal(a.decode(state, nxt)[0], a.decode(state_last, nxt)[0])


@needs_hooked
def test_tiny_backends_agree(tiny_bridge, tiny_hooked):
    ids = torch.arange(50, 80)[None]
    assert (_logprobs(tiny_bridge, ids) - _logprobs(tiny_hooked, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["bridge", "hooked"] if HAS_HOOKED else ["bridge"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_and_device_are_applied_to_a_given_hf_model(tokenizer, backend, dtype):
    """boot_transformers(hf_model=...) only records dtype/device; load_model applies them."""
    hf = make_tiny_hf(n_layers=1, n_heads=2, n_kv_heads=1, d_model=32, seed=1)
    model = load_model("tiny-llama", backend=backend, hf_model=hf, tokenizer=tokenizer,
                       device="cpu", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with torch.no_grad():
        assert model(torch.arange(5, 12)[None]).dtype == dtype


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


def test_unknown_model_offline_is_a_clear_error():
    code = (
        "from stepflow_tl import load_model\n"
        "try:\n"
        "    load_model('no-such-org/no-such-model-xyz')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.startswith("ModelLoadError could not load model 'no-such-org/no-such-model-xyz'"), out.stdout + out.stderr
    assert "HF_HUB_OFFLINE" in out.stdout


@pytest.mark.skipif(HAS_HOOKED, reason="on TL 3.9 backend='hooked' exists")
def test_hooked_backend_on_tl4_is_a_clear_error(tiny_hf, tokenizer):
    with pytest.raises(ModelLoadError, match="TransformerLens 3.9"):
        load_model("tiny", backend="hooked", hf_model=tiny_hf, tokenizer=tokenizer)


def test_model_whose_attention_hooks_fire_too_late_is_refused(tokenizer):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=64, window_size=16,
        eos_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(0)
    neo = load_model("tiny-neo", hf_model=GPTNeoForCausalLM(config).eval(), tokenizer=tokenizer, device="cpu")
    with pytest.raises(UnsupportedModelError, match="silently discarded"):
        adapter(neo).check_attention_editable()


def test_llama_attention_is_editable(tiny_model):
    adapter(tiny_model).check_attention_editable()


def test_not_a_tl_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="TransformerLens model"):
        adapter(make_tiny_hf())


def test_publish_folder_is_all_or_nothing(tmp_path):
    """A cache folder appears whole (renamed from its staging folder) or not at all."""
    from stepflow_tl.tl.models import publish_folder

    def fail(staging):
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        publish_folder(tmp_path / "cache" / "model", fail)
    assert list((tmp_path / "cache").iterdir()) == []
    target = publish_folder(tmp_path / "cache" / "model", lambda staging: (staging / "a.txt").write_text("1"))
    assert (target / "a.txt").read_text() == "1"
    # A second writer racing the first: its copy is dropped, the first one stays.
    publish_folder(target, lambda staging: (staging / "b.txt").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model"]
