"""Issue 16: tiled Step-Saliency is the exact pooled attention x gradient, and no
``T x T`` tensor exists while it runs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import BACKENDS, apples_trace, loss_positions, rel_error
from reference import hf_attention_and_grads, pool_loop, reference_saliency
from stepflow_tl import StepflowError
from stepflow_tl.saliency.compute import step_saliency
from stepflow_tl.tl.attention import TileSpec, TiledAttentionScope, tiled_attention_heads, tiled_unsupported_reason
from stepflow_tl.tl.adapter import adapter
from stepflow_tl.tl.models import load_model, make_tiny_hf

@pytest.fixture(scope="module")
def trace(tokenizer):
    return apples_trace(tokenizer)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 16 tokens: a ~90-token trace then has diagonal, interior and skipped tiles."""
    monkeypatch.setattr(TiledAttentionScope, "BLOCK", 16)


def _dense_attention(q, k, v, scale, window, valid, sinks):
    """Plain softmax attention with every mask as a T x T matrix: the kernel's reference."""
    b, h, T, _ = q.shape
    g = h // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    t, key = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = key <= t
    if window is not None:
        allowed &= key > t - window
    allowed = allowed[None, None].expand(b, h, T, T)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -torch.inf)
    if sinks is not None:
        scores = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(b, -1, T, 1)], -1)
    pattern = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
    pattern = pattern[..., :T]
    return pattern, pattern @ v


@pytest.mark.parametrize(
    "n_pos, window, padded, with_sinks, block",
    [(n, w, p, s, b) for n, w, p, s, b in itertools.product([13, 40], [None, 5], [False, True], [False, True], [4, 64])],
)
def test_kernel_matches_dense_attention(n_pos, window, padded, with_sinks, block):
    """Output, gradients of q, k, v and sinks, and the per-tile |A * dL/dA|, to 1e-12 in float64."""
    g = torch.Generator().manual_seed(n_pos + block)
    shape = dict(dtype=torch.float64)
    q = torch.randn(2, 4, n_pos, 8, generator=g, **shape).requires_grad_()
    k = torch.randn(2, 2, n_pos, 8, generator=g, **shape).requires_grad_()
    v = torch.randn(2, 2, n_pos, 8, generator=g, **shape).requires_grad_()
    valid = None
    if padded:  # left padding of the second sequence
        valid = torch.ones(2, n_pos, dtype=torch.bool)
        valid[1, :3] = False
    sinks = torch.randn(4, generator=g, **shape).requires_grad_() if with_sinks else None
    seen = torch.zeros(4, 2, n_pos, n_pos, **shape)
    seen_grad = torch.zeros(4, 2, n_pos, n_pos, **shape)

    def on_tile(rows, cols, a, da):
        seen[:, :, rows, cols] += a * da
        seen_grad[:, :, rows, cols] += da

    z = tiled_attention_heads(q, k, v, TileSpec(0.3, window=window, block=block),
                              key_valid=valid, sinks=sinks, on_tile=on_tile)
    pattern, expected = _dense_attention(q, k, v, 0.3, window, valid, sinks)
    dz = torch.randn(expected.shape, generator=g, **shape)
    if padded:  # rows with no visible key: outputs 0 here, and nothing depends on them
        dz[1, :, :3] = 0
        assert torch.equal(z[1, :, :3], torch.zeros_like(z[1, :, :3]))
    inputs = [q, k, v] + ([sinks] if with_sinks else [])
    want = torch.autograd.grad((expected * dz).sum(), inputs + [pattern])
    got = torch.autograd.grad((z * dz).sum(), inputs)
    real = slice(3, None) if padded else slice(None)
    assert torch.allclose(z[0], expected[0], rtol=0, atol=1e-12)
    assert torch.allclose(z[1, :, real], expected[1, :, real], rtol=0, atol=1e-12)
    for a, b in zip(got, want[:-1]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.allclose(seen, (pattern * want[-1]).reshape(4, 2, n_pos, n_pos), rtol=0, atol=1e-12)
    # dL/dA on the pairs the attention may use; 0 on masked ones (future, window, padding)
    usable = (pattern > 0).reshape(4, 2, n_pos, n_pos)
    assert torch.allclose(seen_grad, (want[-1].reshape(4, 2, n_pos, n_pos) * usable), rtol=0, atol=1e-12)


class _LargestSquare(TorchDispatchMode):
    """Records every tensor an op creates whose last two dims are both in ``[n, 2n)``
    (``T x T``, with room for padding; not ``[T, vocab]``)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.found = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and all(self.n <= s < 2 * self.n for s in t.shape[-2:]):
                self.found.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("pool", ["mean", "causal_mean"])
@pytest.mark.parametrize("loss", ["sequence", "summary", "answer"])
def test_tiled_matches_brute_force_reference(tiny_model, trace, pool, loss, checkpoint):
    reference_hf = make_tiny_hf(n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=0)
    expected = reference_saliency(reference_hf, trace, pool, loss_positions(trace, loss))
    result = step_saliency(tiny_model, trace, loss=loss, pool=pool, mode="tiled", checkpoint=checkpoint)
    assert (result.meta["mode"], result.meta["checkpoint"]) == ("tiled", checkpoint)
    assert rel_error(result.maps, expected) < 1e-6
    assert all("forward" not in vars(b.attn) for b in tiny_model.blocks)


def test_no_square_tensor_is_created(tiny_model, trace):
    """Not the scores, the pattern, a mask nor a product: nothing ``[..., T, T]``."""
    n_pos = trace.token_ids.shape[0]
    for checkpoint in (True, False):
        with _LargestSquare(n_pos) as watch:
            step_saliency(tiny_model, trace, mode="tiled", checkpoint=checkpoint)
        assert watch.found == []
    with _LargestSquare(n_pos) as watch:
        step_saliency(tiny_model, trace, mode="bounded")
    assert watch.found  # the watcher sees the bounded mode's patterns


@pytest.fixture(scope="module", params=BACKENDS)
def tiny_float64(request, tokenizer):
    hf = make_tiny_hf(n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=0)
    return load_model("tiny-llama", backend=request.param, hf_model=hf, tokenizer=tokenizer,
                      device="cpu", dtype=torch.float64)


@pytest.mark.parametrize("pool, loss", [("mean", "sequence"), ("causal_mean", "answer")])
def test_float64_is_exact_to_1e10(tiny_float64, trace, pool, loss):
    """Bridge: against the float64 reference (the same transformers modules). Its dense
    mode is not that exact: the bridge's attention rounds the softmax to fp32 in every
    dtype. HookedTransformer: against its own dense mode, which is float64 throughout;
    its RMSNorm and rotary tables are float64 where transformers' are fp32, so it sits
    1.6e-7 from the transformers reference."""
    reference_hf = make_tiny_hf(n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=0).double()
    expected = reference_saliency(reference_hf, trace, pool, loss_positions(trace, loss))
    result = step_saliency(tiny_float64, trace, loss=loss, pool=pool, mode="tiled")
    dense = step_saliency(tiny_float64, trace, loss=loss, pool=pool, mode="dense")
    if adapter(tiny_float64).kind == "bridge":
        assert rel_error(result.maps, expected) < 1e-10
        assert rel_error(result.maps, dense.maps) < 1e-6
    else:
        assert rel_error(result.maps, dense.maps) < 1e-10
        assert rel_error(result.maps, expected) < 1e-6


def test_per_head_and_layer_subset(tiny_model, trace):
    reference_hf = make_tiny_hf(n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=0)
    per_head = torch.stack([
        pool_loop((a * g).abs(), trace.token_steps, trace.n_steps, "mean")
        for a, g in hf_attention_and_grads(reference_hf, trace.token_ids)
    ])
    result = step_saliency(tiny_model, trace, per_head=True, mode="tiled")
    assert result.head_maps.shape == (3, 4, trace.n_steps, trace.n_steps)
    assert rel_error(result.head_maps, per_head) < 1e-6
    part = step_saliency(tiny_model, trace, layers=[2, 1], mode="tiled")
    assert part.layers == [1, 2]
    assert rel_error(part.maps, result.maps[1:]) < 1e-7
    assert all(p.grad is None for p in tiny_model.parameters())


def test_auto_runs_tiled_and_checkpoints_only_where_the_activations_do_not_fit(tiny_model, trace, monkeypatch):
    import stepflow_tl.saliency.compute as saliency

    result = step_saliency(tiny_model, trace, mode="auto")
    assert (result.meta["mode"], result.meta["requested_mode"], result.meta["checkpoint"]) == ("tiled", "auto", False)
    monkeypatch.setattr(saliency, "available_memory", lambda device: 1 << 20)  # the activations would not fit
    result = step_saliency(tiny_model, trace, mode="auto")
    assert (result.meta["mode"], result.meta["checkpoint"]) == ("tiled", True)
    assert step_saliency(tiny_model, trace, mode="tiled").meta["checkpoint"] is True  # tiled's default
    assert step_saliency(tiny_model, trace, mode="auto", checkpoint=True).meta["checkpoint"] is True
    with pytest.raises(StepflowError, match="checkpoint= chooses whether tiled mode"):
        step_saliency(tiny_model, trace, mode="bounded", checkpoint=False)


def test_the_result_says_which_tile_side_ran_and_any_side_gives_the_same_map(tiny_model, trace, monkeypatch):
    import stepflow_tl.saliency.compute as saliency

    default = step_saliency(tiny_model, trace, mode="tiled")
    assert default.meta["block"] == 16  # TiledAttentionScope.BLOCK (16 in these tests), as on every CPU
    for side in (7, 40, 512):
        result = step_saliency(tiny_model, trace, mode="tiled", block=side)
        assert result.meta["block"] == side
        assert rel_error(result.maps, default.maps) < 1e-6
    assert "block" not in step_saliency(tiny_model, trace, mode="bounded").meta
    with pytest.raises(StepflowError, match="block"):
        step_saliency(tiny_model, trace, mode="tiled", block=0)
    # On a GPU the side grows with free memory (28 heads: a 1024-side tile's working set is
    # 0.66 GiB, a 4096-side one 10.5 GiB, against a quarter of the free memory), up to what
    # the trace needs.
    cuda = torch.device("cuda")
    for free_gib, n_tokens, side in ((4, 100_000, 1024), (80, 100_000, 4096), (80, 300, 512), (0, 9000, 16)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free_gib: (f << 30, 80 << 30))
        assert saliency.auto_tile_side(n_tokens, 28, cuda) == side, (free_gib, n_tokens)


def test_model_forward_under_tiled_attention_is_unchanged(tiny_model, tokenizer):
    """The model's own outputs, with left padding, and the O(T d) hooks still fire."""
    tokens = torch.tensor([[5, 9, 11, 300, 42, 7, 8, 1000, 17], [0, 0, 0, 300, 42, 7, 8, 1000, 17]])
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    bridge = adapter(tiny_model).kind == "bridge"
    extra = {"use_cache": False} if bridge else {}
    with torch.no_grad():
        expected = tiny_model(tokens, attention_mask=mask, **extra)
        fired = []
        hooks = [(f"blocks.1.attn.hook_{n}", lambda x, hook, n=n: fired.append(n)) for n in ("rot_q", "rot_k", "v", "z")]
        with TiledAttentionScope(tiny_model, lambda layer: None):
            got = tiny_model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks, **extra)
    assert torch.allclose(got[0], expected[0], rtol=0, atol=1e-5)
    assert torch.allclose(got[1, 3:], expected[1, 3:], rtol=0, atol=1e-5)
    assert sorted(fired) == ["rot_k", "rot_q", "v", "z"]
    if bridge:
        assert tiny_model.original_model.config._attn_implementation == "eager"


def test_refusals_are_clear(tiny_model, trace, monkeypatch):
    def pattern_hook(pattern, hook):
        return pattern

    tiny_model.blocks[1].attn.hook_pattern.add_hook(pattern_hook)
    try:
        with pytest.raises(StepflowError, match=r"blocks.1.attn.hook_pattern has hooks.*mode='bounded'"):
            step_saliency(tiny_model, trace, mode="tiled")
        assert tiled_unsupported_reason(tiny_model) is not None
    finally:
        tiny_model.reset_hooks()
    assert all("forward" not in vars(b.attn) for b in tiny_model.blocks)
    if adapter(tiny_model).kind == "hooked":
        monkeypatch.setattr(tiny_model.cfg, "attn_scores_soft_cap", 30.0)
    else:
        monkeypatch.setattr(tiny_model.blocks[0].attn.original_component, "attn_logit_softcapping", 30.0, raising=False)
    with pytest.raises(StepflowError, match="soft-capping exactly; use mode='bounded'"):
        step_saliency(tiny_model, trace, mode="tiled")
    assert step_saliency(tiny_model, trace, mode="auto").meta["mode"] == "dense"
    assert all("forward" not in vars(b.attn) for b in tiny_model.blocks)


def _tiny_bridge_of(hf, tokenizer):
    return load_model("tiny", backend="bridge", hf_model=hf.eval(), tokenizer=tokenizer, device="cpu")


def test_sliding_window_and_qkv_biases_on_qwen2(tokenizer, trace):
    """Layer 1 slides a 20-token window over the ~140-token trace (tiles before the
    window are skipped, the window's edge is masked inside tiles)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=20, max_window_layers=1,
        attn_implementation="eager",
    )
    model = _tiny_bridge_of(Qwen2ForCausalLM(config), tokenizer)
    assert [getattr(b.attn.original_component, "sliding_window", None) for b in model.blocks] == [None, 20]
    for pool in ("mean", "causal_mean"):
        dense = step_saliency(model, trace, pool=pool, mode="dense")
        assert rel_error(step_saliency(model, trace, pool=pool, mode="tiled").maps, dense.maps) < 1e-6


def test_attention_sinks_and_sliding_window_on_gpt_oss(tokenizer, trace):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=20,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="eager",
        architectures=["GptOssForCausalLM"],
    )
    hf = GptOssForCausalLM(config)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.sinks.normal_()  # zero at init; make every sink count
    model = _tiny_bridge_of(hf, tokenizer)
    dense = step_saliency(model, trace, mode="dense")
    assert rel_error(step_saliency(model, trace, mode="tiled").maps, dense.maps) < 1e-6


def test_gpu_benchmark_runs_on_cpu_with_a_tiny_config():
    """benchmarks/saliency_gpu_7b.py, with a 2-layer model of the same architecture."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "benchmarks/saliency_gpu_7b.py", "--tiny", "--device", "cpu", "--dtype", "float32",
         "--tokens", "300", "--block", "64"],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny Qwen2 (random weights), float32, cpu, T = 300" in out.stdout
    assert re.search(r"\|\s+300 \|\s+2 \|\s+[\d.]+ \|\s+- \|\s+- \|\s+True \|", out.stdout), out.stdout


@pytest.mark.smollm2
def test_tiled_matches_reference_on_smollm2(smollm2, trace):
    """Every built-in loss and both pools, against the transformers reference."""
    from stepflow_tl.tl.models import load_embedded_hf

    hf, _ = load_embedded_hf()
    for loss, pool in itertools.product(["sequence", "summary", "answer"], ["mean", "causal_mean"]):
        expected = reference_saliency(hf, trace, pool, loss_positions(trace, loss))
        assert rel_error(step_saliency(smollm2, trace, loss=loss, pool=pool, mode="tiled").maps, expected) < 1e-5, (loss, pool)


def test_qwen3_qk_norms(tokenizer, trace):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attn_implementation="eager", architectures=["Qwen3ForCausalLM"],
    )
    hf = Qwen3ForCausalLM(config)
    with torch.no_grad():  # ones at init would make the norms' weights invisible
        for layer in hf.model.layers:
            layer.self_attn.q_norm.weight.normal_(1, 0.3)
            layer.self_attn.k_norm.weight.normal_(1, 0.3)
    model = _tiny_bridge_of(hf, tokenizer)
    dense = step_saliency(model, trace, mode="dense")
    assert rel_error(step_saliency(model, trace, mode="tiled").maps, dense.maps) < 1e-6


@pytest.mark.smollm2
def test_exactness_benchmark_runs_and_reports_each_pair():
    """benchmarks/saliency_tiled_exactness.py on the shortest real trace with an answer."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "benchmarks/saliency_tiled_exactness.py", "--max-tokens", "500",
         "--losses", "answer", "--pools", "mean", "causal_mean"],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "record 63 of r1_traces.jsonl: T = 473" in out.stdout, out.stdout
    rel = [float(x) for x in re.findall(r"\|\s+answer \|\s+\w+ \|\s+\S+ \|\s+(\S+) \|", out.stdout)]
    assert len(rel) == 2 and max(rel) < 1e-5, out.stdout
