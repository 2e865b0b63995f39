"""Issue 7: the memory-bounding code paths give exactly the unchunked results.

These are correctness tests of the chunked pooling and the bounded saliency mode's
memory discipline; the speed and memory numbers themselves are in benchmarks/ and
docs/performance.md, not asserted here (the machine is shared and noisy).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS
from reference import pool_loop, reference_saliency

from stepflow_tl import StepflowError
from stepflow_tl.saliency.compute import _LayerPooler, step_saliency
from stepflow_tl.saliency.losses import LossInUnembedding as _loss_in_unembedding
from stepflow_tl.tl.adapter import adapter
from stepflow_tl.tl.models import load_model, make_tiny_hf
from stepflow_tl.traces.pooling import block_sums, pair_counts, pool_to_steps, step_onehot
from stepflow_tl.traces.trace import Trace

THINKING = (
    "Tom has 3 boxes with 4 pens each.\n\nThat is 3 * 4 = 12 pens.\n\n"
    "He loses 2 pens, so 12 - 2 = 10.\n\nCheck: 10 + 2 = 12, right."
)


@pytest.fixture(scope="module")
def trace(tokenizer):
    return Trace.from_parts(
        tokenizer, question="Tom has 3 boxes of 4 pens and loses 2. How many pens are left?",
        thinking=THINKING, summary="He has 10 pens.\n\nAnswer: \\boxed{10}",
    )


def _random_steps(n_pos: int, n_steps: int, seed: int) -> torch.Tensor:
    """Contiguous steps with some markup (-1) tokens, like a real trace."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(n_pos - 1, generator=g)[: n_steps - 1] + 1).values
    steps = torch.zeros(n_pos, dtype=torch.long)
    for cut in cuts:
        steps[cut:] += 1
    steps[torch.rand(n_pos, generator=g) < 0.1] = -1
    return steps


@pytest.mark.parametrize("max_elements", [1, 7, 40, 150, 1 << 24])
def test_block_sums_chunking_is_exact(max_elements):
    """Slicing rows and leading entries (any budget, even 1 element) changes nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 13, 13, generator=g)
    steps = _random_steps(13, 4, seed=1)
    onehot = step_onehot(steps, 4)
    got = block_sums(x, onehot, onehot, max_elements=max_elements)
    expected = torch.stack([pool_loop(x[b], steps, 4, "mean") for b in range(2)]) * pair_counts(steps, 4, "mean")
    assert got.shape == (2, 3, 4, 4)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_block_sums_rectangular_query_slice():
    """A block of query rows against all keys, as the row-chunked product uses it."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 17, 17, generator=g)
    steps = _random_steps(17, 5, seed=3)
    onehot = step_onehot(steps, 5)
    parts = sum(
        block_sums(x[:, r : r + 4], onehot[r : r + 4], onehot, max_elements=5) for r in range(0, 17, 4)
    )
    assert torch.allclose(parts, block_sums(x, onehot, onehot), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", ["mean", "causal_mean", "mass"])
def test_pool_to_steps_matches_loops(pool):
    g = torch.Generator().manual_seed(4)
    x = torch.tril(torch.rand(4, 19, 19, generator=g))
    steps = _random_steps(19, 6, seed=5)
    assert torch.allclose(pool_to_steps(x, steps, 6, pool), pool_loop(x, steps, 6, pool), rtol=1e-12)


@pytest.mark.parametrize("budget", [1, 50, 1 << 24])
def test_row_chunked_product_equals_whole_product(trace, monkeypatch, budget):
    g = torch.Generator().manual_seed(6)
    n_pos = trace.token_ids.shape[0]
    pattern = torch.rand(1, 4, n_pos, n_pos, generator=g)
    grad = torch.randn(1, 4, n_pos, n_pos, generator=g)
    whole = _LayerPooler(trace, [0], 4, "mean", torch.device("cpu"))
    whole.add(0, (pattern * grad).abs())
    monkeypatch.setattr(_LayerPooler, "PRODUCT_ELEMENTS", budget)
    chunked = _LayerPooler(trace, [0], 4, "mean", torch.device("cpu"))
    chunked.add_product(0, pattern, grad)
    assert torch.allclose(chunked.head_maps, whole.head_maps, rtol=1e-12, atol=0)


def test_row_chunked_product_rejects_non_finite(trace, monkeypatch):
    monkeypatch.setattr(_LayerPooler, "PRODUCT_ELEMENTS", 64)
    n_pos = trace.token_ids.shape[0]
    pattern = torch.full((1, 2, n_pos, n_pos), 0.5)
    grad = torch.ones_like(pattern)
    grad[0, 1, n_pos - 1, 0] = float("nan")  # only in the last row chunk
    pooler = _LayerPooler(trace, [3], 2, "mean", torch.device("cpu"))
    with pytest.raises(StepflowError, match="layer 3: non-finite"):
        pooler.add_product(3, pattern, grad)


@pytest.mark.parametrize("pool", ["mean", "causal_mean"])
def test_bounded_with_tiny_chunks_matches_reference(tiny_model, trace, monkeypatch, pool):
    """The bounded mode with one query row per chunk is still the exact Step-Saliency."""
    reference_hf = make_tiny_hf(n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=0)
    expected = reference_saliency(reference_hf, trace, pool)
    monkeypatch.setattr(_LayerPooler, "PRODUCT_ELEMENTS", 1)
    bounded = step_saliency(tiny_model, trace, pool=pool, mode="bounded")
    dense = step_saliency(tiny_model, trace, pool=pool, mode="dense")
    assert float((bounded.maps - expected).abs().max() / expected.abs().max()) < 1e-6
    assert torch.allclose(bounded.maps, dense.maps, rtol=1e-12, atol=0)


@pytest.fixture(scope="module", params=BACKENDS)
def tiny_float64(request, tokenizer):
    """The tiny model in float64: the block-wise loss's bookkeeping is then checked to
    1e-12, far below fp32 rounding, which differs between matrix shapes."""
    hf = make_tiny_hf(n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=0)
    return load_model("tiny-llama", backend=request.param, hf_model=hf, tokenizer=tokenizer,
                      device="cpu", dtype=torch.float64)


@pytest.mark.parametrize("loss", ["sequence", "summary", "answer"])
@pytest.mark.parametrize("block", [1, 3, 1 << 20])
def test_blockwise_loss_equals_whole_logits_loss(tiny_float64, trace, monkeypatch, loss, block):
    """Bounded mode computes built-in losses inside the unembedding, ``block`` positions
    at a time; loss and maps are those of the dense mode's whole-sequence logits."""
    dense = step_saliency(tiny_float64, trace, loss=loss, mode="dense")
    monkeypatch.setattr(_loss_in_unembedding, "LOGIT_ELEMENTS", block * tiny_float64.cfg.d_vocab_out)
    bounded = step_saliency(tiny_float64, trace, loss=loss, mode="bounded")
    assert bounded.maps.abs().max() > 0
    assert bounded.meta["loss_value"] == pytest.approx(dense.meta["loss_value"], rel=1e-12)
    assert torch.allclose(bounded.maps, dense.maps, rtol=1e-12, atol=0)
    assert "forward" not in vars(tiny_float64.unembed)


def test_blockwise_loss_is_exact_in_fp32(tiny_model, trace):
    """With the default budget the blocks are runs of consecutive positions, so fp32 maps
    are the dense mode's bit for bit even when the loss scores three tokens."""
    for loss in ("sequence", "answer"):
        dense = step_saliency(tiny_model, trace, loss=loss, mode="dense")
        bounded = step_saliency(tiny_model, trace, loss=loss, mode="bounded")
        assert torch.equal(bounded.maps, dense.maps), loss


@pytest.mark.parametrize("mode", ["bounded", "tiled"])
def test_free_heap_is_released_after_each_block_and_before_its_backward(tiny_model, trace, monkeypatch, mode):
    """On CPU the checkpointed blocks hand glibc's free pages back twice per block (after
    its first forward, and when its output gradient arrives), and the maps do not change."""
    import stepflow_tl.tl.hooks as hooks

    calls = []
    monkeypatch.setattr(hooks, "_malloc_trim", lambda: calls.append)
    trimmed = step_saliency(tiny_model, trace, mode=mode)
    assert calls == [0] * (2 * tiny_model.cfg.n_layers)
    monkeypatch.setattr(hooks, "_malloc_trim", lambda: None)
    untrimmed = step_saliency(tiny_model, trace, mode=mode)
    assert torch.equal(trimmed.maps, untrimmed.maps)


def test_free_heap_release_finds_glibc_and_is_a_no_op_without_it(monkeypatch):
    import platform

    import stepflow_tl.tl.hooks as hooks

    if platform.libc_ver()[0] == "glibc":
        assert callable(hooks._malloc_trim())
    monkeypatch.setattr(hooks, "_malloc_trim", lambda: None)
    assert hooks.release_free_heap() is None


def test_blockwise_loss_refuses_transformed_logits(tiny_model, tiny_hf, trace, monkeypatch):
    """A model that changes its logits after the unembedding (soft-capping, a logit
    scale) would make the block-wise loss wrong: bounded mode says so, dense still works,
    a callable loss (which gets the real logits) works in bounded mode too, and tiled
    mode without checkpointing (what ``auto`` runs) sees the change before its forward
    and takes the whole logits."""
    if adapter(tiny_model).kind == "hooked":
        monkeypatch.setattr(tiny_model.cfg, "output_logits_soft_cap", 5.0)
        handle = None
    else:  # a transformers-level change after lm_head, as Gemma-2's soft-cap is

        def scale(module, args, output):
            output.logits = output.logits * 0.5
            return output

        handle = tiny_hf.register_forward_hook(scale)
    try:
        with pytest.raises(StepflowError, match="transforms its logits after the unembedding"):
            step_saliency(tiny_model, trace, mode="bounded")
        assert "forward" not in vars(tiny_model.unembed)
        dense = step_saliency(tiny_model, trace, mode="dense")
        with_callable = step_saliency(
            tiny_model, trace, mode="bounded",
            loss=lambda logits, tr: torch.nn.functional.cross_entropy(logits[0, :-1], tr.token_ids[1:]),
        )
        assert torch.allclose(with_callable.maps, dense.maps, rtol=1e-5, atol=0)
        auto = step_saliency(tiny_model, trace, mode="auto")
        assert (auto.meta["mode"], auto.meta["checkpoint"]) == ("tiled", False)
        assert auto.meta["loss_value"] == pytest.approx(dense.meta["loss_value"], rel=1e-6)
        assert torch.allclose(auto.maps, dense.maps, rtol=1e-4, atol=0)
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("loss", ["sequence", "logit"])
def test_tiled_mode_without_checkpointing_takes_the_loss_block_wise(tiny_model, trace, monkeypatch, loss):
    """Without checkpointing, tiled mode computes a built-in loss inside the unembedding,
    a block of positions at a time with each block's gradient taken at once: whole logits
    never exist, no block is unembedded twice, and maps and loss are the checkpointed
    run's bit for bit."""
    monkeypatch.setattr(_loss_in_unembedding, "LOGIT_ELEMENTS", 7 * tiny_model.cfg.d_vocab_out)
    rows = []
    unembed = type(tiny_model.unembed)
    forward = unembed.forward
    monkeypatch.setattr(unembed, "forward",
                        lambda self, x, *a, **k: rows.append(x.shape[1]) or forward(self, x, *a, **k))
    eager = step_saliency(tiny_model, trace, loss=loss, mode="tiled", checkpoint=False)
    assert rows and max(rows) <= 7 and sum(rows) <= trace.token_ids.shape[0]
    checkpointed = step_saliency(tiny_model, trace, loss=loss, mode="tiled", checkpoint=True)
    assert torch.equal(eager.maps, checkpointed.maps) and eager.maps.abs().max() > 0
    assert eager.meta["loss_value"] == checkpointed.meta["loss_value"]


def test_long_trace_helper_builds_exact_lengths(tokenizer):
    """The benchmarks' trace builder: real text, the requested length, many steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _common

    for n_tokens in (300, 700):
        long = _common.long_trace(tokenizer, n_tokens)
        assert long.token_ids.shape[0] == n_tokens
        assert long.n_steps >= 5
        assert long.step_kinds[0] == "question"


def test_generation_benchmark_runs_on_a_given_model():
    """Benchmark 3 with ``--model`` (here the tiny model): one short run prints its table."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "benchmarks/generation_throughput.py", "--model", "tiny", "--batch", "1",
         "--new-tokens", "4", "--repeats", "1"],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Generation, tiny (bridge), fp32, CPU, 1 threads, greedy, max_new_tokens=4" in out.stdout
    row = re.search(r"\|\s+1 \|\s+(\d+) \|\s+(\d+) \|\s+([\d.]+) \|\s+([\d.]+) \|\s+([\d.]+) \|", out.stdout)
    assert row, out.stdout
    assert 1 <= int(row.group(1)) <= 4 and 1 <= int(row.group(2)) <= 4
    assert float(row.group(3)) > 0 and float(row.group(4)) > 0


def test_issue24_gpu_benchmark_runs_on_cpu_with_a_tiny_config():
    """benchmarks/issue24_gpu_7b.py with a 2-layer model of the 7B's architecture (and its
    152,064-id vocabulary, which greedy decoding must not leave the tokenizer's ids for):
    StepFlow generation and saliency's auto mode run and print their rows."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "benchmarks/issue24_gpu_7b.py", "--tiny", "--device", "cpu", "--dtype", "float32",
         "--tokens", "128", "--batch", "1", "--new-tokens", "4", "--variants", "stepflow", "auto"],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stepflow: ok" in out.stderr and "auto: ok" in out.stderr, out.stderr[-3000:]
    assert re.search(r"\|\s+128 \|\s+1 \|\s+not run \|\s+not run \|\s+[\d.]+ \|", out.stdout), out.stdout
    assert re.search(r"\|\s+128 \|\s+not run \|\s+not run \|\s+[\d.]+ \|.*\| tiled \(\d+\)", out.stdout), out.stdout


# ---------------------------------------------------------------------- fused attention (issue 24)
FUSED_PROMPTS = ["What is 2+3?", "Compute the sum of the first ten prime numbers and explain each step.",
                 "Name a colour."]


def _explicit_everywhere(model):
    """A do-nothing hook on every layer's pattern: every layer then runs the explicit path."""
    n = adapter(model).n_layers
    return model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", lambda x, hook: None) for layer in range(n)])


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused kernel's calls (the explicit paths never call it)."""
    import stepflow_tl.tl.attention as attention

    calls = []
    kernel = attention._fused_heads
    monkeypatch.setattr(attention, "_fused_heads", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    return calls


def _stepflow_all_layers():
    from stepflow_tl.interventions.bridge import OddsEqualBridge
    from stepflow_tl.interventions.momentum import StepMomentum
    from stepflow_tl.interventions.stepflow import StepFlow

    return [StepFlow(oeb=OddsEqualBridge(layers=[0]), smi=StepMomentum(layers="all", alpha=0.5))]


@pytest.mark.parametrize("with_stepflow", [False, True], ids=["plain", "stepflow"])
def test_fused_generation_gives_the_explicit_paths_tokens(tiny_model, fused_calls, with_stepflow):
    from stepflow_tl.interventions.generate import generate

    ivs = _stepflow_all_layers if with_stepflow else list
    fused = generate(tiny_model, FUSED_PROMPTS, max_new_tokens=12, interventions=ivs())
    n_fused = len(fused_calls)
    with _explicit_everywhere(tiny_model):
        explicit = generate(tiny_model, FUSED_PROMPTS, max_new_tokens=12, interventions=ivs())
    assert len(fused_calls) == n_fused  # the hooks really forced the explicit path
    # 1 prefill + 11 decoding forwards; OEB's layer 0 keeps the explicit path (its
    # install check runs layer 0 once with a hook on hook_z only: one fused call)
    layers = adapter(tiny_model).n_layers - (1 if with_stepflow else 0)
    assert n_fused == 12 * layers + (1 if with_stepflow else 0)
    for f, e in zip(fused, explicit):
        assert f.output_ids == e.output_ids
        strip = lambda evs: [(x.intervention, x.layer, x.position, x.n_heads) for x in evs]
        assert strip(f.events) == strip(e.events)


def test_fused_layers_give_the_explicit_logits_and_fire_their_hooks(tiny_model, fused_calls):
    """Prefill and decoding of a left-padded batch, layer by layer: fused and explicit
    attention agree to rounding, and hook_rot_q / hook_z fire and edit on fused layers."""
    from stepflow_tl.tl.attention import fused_attention
    from stepflow_tl.tl.adapter import pad_token_ids

    a = adapter(tiny_model)
    tok = tiny_model.tokenizer
    tokens, mask = pad_token_ids([tok(p, add_special_tokens=False)["input_ids"] for p in FUSED_PROMPTS])
    seen = []

    def halve_z(z, hook):
        seen.append(hook.name)
        return z * 0.5

    def run():
        with torch.no_grad(), tiny_model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", halve_z)]):
            logits, state = a.prefill(tokens, mask)
            step, _ = a.decode(state, logits[:, -1:].argmax(-1))
        return logits, step

    with fused_attention(tiny_model):
        fused = run()
    assert fused_calls and len(seen) == 2  # prefill and one decoding step
    with _explicit_everywhere(tiny_model):
        explicit = run()
    real = mask.bool()
    torch.testing.assert_close(fused[0][real], explicit[0][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], explicit[1], rtol=1e-5, atol=1e-5)


def test_a_pattern_hook_added_inside_the_fused_block_fires(tiny_model, fused_calls):
    """The choice is per call: hooks added with run_with_hooks while fused attention is
    on make their layer explicit for that call only, and they fire."""
    from stepflow_tl.tl.attention import fused_attention

    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    fired = []
    with fused_attention(tiny_model), torch.no_grad():
        tiny_model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_attn_scores",
                                                      lambda x, hook: fired.append(x.shape))])
        n_layers = adapter(tiny_model).n_layers
        assert fired == [(1, 4, 5, 5)] and len(fused_calls) == n_layers - 1
        adapter(tiny_model).forward(tokens)
        assert len(fused_calls) == 2 * n_layers - 1
    assert all("forward" not in vars(block.attn) for block in tiny_model.blocks)



# ---------------------------------------------------------------------- idle bridges bypassed (issue 24)
def _decode_two(model, fwd_hooks=()):
    """Prefill of a left-padded batch and one decoding step, with ``fwd_hooks``."""
    from stepflow_tl.tl.adapter import pad_token_ids

    a = adapter(model)
    tokens, mask = pad_token_ids([model.tokenizer(p, add_special_tokens=False)["input_ids"] for p in FUSED_PROMPTS])
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        logits, state = a.prefill(tokens, mask)
        step, _ = a.decode(state, logits[:, -1:].argmax(-1))
    return logits[mask.bool()], step


@pytest.fixture
def block_calls(monkeypatch):
    """Counts the calls of the bridge blocks' own forward (a bypassed block is not called)."""
    from transformer_lens.model_bridge.generalized_components.block import BlockBridge

    calls = []
    forward = BlockBridge.forward
    monkeypatch.setattr(BlockBridge, "forward", lambda self, *a, **k: calls.append(self.name) or forward(self, *a, **k))
    return calls


def _bridge_places(model):
    hf = model.original_model
    return [(parent, name, child) for parent in hf.modules() for name, child in parent._modules.items()
            if type(child).__module__.startswith("transformer_lens.model_bridge")]


def test_bypassed_bridges_give_the_bridges_logits_exactly(tiny_bridge, block_calls):
    from stepflow_tl.tl.bypass import bypass_idle_bridges

    places = _bridge_places(tiny_bridge)
    bridged = _decode_two(tiny_bridge)
    assert len(block_calls) == 2 * adapter(tiny_bridge).n_layers
    # A hook on a wrapped transformers module (as transformers' own output-capturing hooks,
    # which stay once anything asked for hidden states) runs either way: it keeps no bridge.
    fired = []
    handle = tiny_bridge.blocks[0].original_component.register_forward_hook(lambda m, i, o: fired.append(1))
    try:
        with bypass_idle_bridges(tiny_bridge):
            bypassed = _decode_two(tiny_bridge)
    finally:
        handle.remove()
    assert len(block_calls) == 2 * adapter(tiny_bridge).n_layers and len(fired) == 2  # no block ran as a bridge
    assert torch.equal(bypassed[0], bridged[0]) and torch.equal(bypassed[1], bridged[1])
    assert "forward" not in vars(tiny_bridge.original_model)
    assert _bridge_places(tiny_bridge) == places  # every bridge is back in its place


@pytest.mark.parametrize("point", ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
                                   "blocks.1.hook_mlp_out", "blocks.0.ln2.hook_normalized", "blocks.1.mlp.hook_pre",
                                   "blocks.1.attn.hook_z", "ln_final.hook_normalized", "hook_embed", "unembed.hook_out"])
def test_a_hook_inside_the_bypass_fires_and_edits(tiny_bridge, point):
    """A hook on any hook point keeps its component a bridge for that forward: it fires
    as often, and edits the same way, as without the bypass."""
    from stepflow_tl.tl.bypass import bypass_idle_bridges

    if point not in tiny_bridge.hook_dict:
        pytest.skip(f"{point} is not a hook point of this bridge")
    fired = []

    def edit(x, hook):
        fired.append(hook.name)
        return x * 0.75

    bridged = _decode_two(tiny_bridge, [(point, edit)])
    n = len(fired)
    with bypass_idle_bridges(tiny_bridge):
        bypassed = _decode_two(tiny_bridge, [(point, edit)])
    assert n > 0 and len(fired) == 2 * n
    assert torch.equal(bypassed[0], bridged[0]) and torch.equal(bypassed[1], bridged[1])


def test_torch_hooks_on_bridges_and_their_modules_fire_in_the_bypass(tiny_bridge):
    from stepflow_tl.tl.attention import fused_attention
    from stepflow_tl.tl.bypass import bypass_idle_bridges

    block = tiny_bridge.blocks[1]
    fired = []
    handles = [block.mlp.register_forward_hook(lambda m, i, o: fired.append("bridge")),
               block.mlp.original_component.register_forward_hook(lambda m, i, o: fired.append("module")),
               block.ln1.original_component.register_forward_pre_hook(lambda m, i: fired.append("pre")),
               block.attn.register_forward_hook(lambda m, i, o: fired.append("attention"))]
    try:
        with fused_attention(tiny_bridge), bypass_idle_bridges(tiny_bridge):
            _decode_two(tiny_bridge)
    finally:
        for h in handles:
            h.remove()
    assert sorted(fired) == sorted(["bridge", "module", "pre", "attention"] * 2)


def test_attention_without_hooks_skips_only_the_bridges_call_wrapper(tiny_bridge, monkeypatch):
    """In the bypass (with fused attention, as in `generate`) an attention bridge with no
    torch hook runs its ``forward`` without TL's call wrapper (which only brings in
    offloaded weights): the same logits, and the wrapper runs for no attention layer,
    except one Accelerate offloads."""
    import accelerate.utils
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    from stepflow_tl.tl.attention import fused_attention
    from stepflow_tl.tl.bypass import bypass_idle_bridges

    wrapped = []
    call = GeneralizedComponent.__call__
    monkeypatch.setattr(GeneralizedComponent, "__call__",
                        lambda self, *a, **k: wrapped.append(type(self).__name__) or call(self, *a, **k))
    attention = type(tiny_bridge.blocks[0].attn).__name__
    with fused_attention(tiny_bridge):
        bridged = _decode_two(tiny_bridge)
        assert wrapped.count(attention) == 2 * adapter(tiny_bridge).n_layers
        wrapped.clear()
        with bypass_idle_bridges(tiny_bridge):
            bypassed = _decode_two(tiny_bridge)
        assert not wrapped
        assert torch.equal(bypassed[0], bridged[0]) and torch.equal(bypassed[1], bridged[1])
        offloaded = tiny_bridge.blocks[0].attn.original_component
        monkeypatch.setattr(accelerate.utils, "has_offloaded_params", lambda module: module is offloaded)
        with bypass_idle_bridges(tiny_bridge):
            _decode_two(tiny_bridge)
    assert wrapped == [attention] * 2


def test_the_bypass_restores_the_bridges_after_an_error(tiny_bridge):
    from stepflow_tl.tl.bypass import bypass_idle_bridges

    places = _bridge_places(tiny_bridge)

    def fail(x, hook):
        raise RuntimeError("boom")

    with bypass_idle_bridges(tiny_bridge), pytest.raises(RuntimeError, match="boom"):
        _decode_two(tiny_bridge, [("blocks.1.hook_resid_post", fail)])
    assert _bridge_places(tiny_bridge) == places and "forward" not in vars(tiny_bridge.original_model)


def test_stop_at_layer_and_global_hooks_turn_the_bypass_off(tiny_bridge, block_calls):
    from stepflow_tl.tl.bypass import bypass_idle_bridges

    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        bridged = tiny_bridge(tokens, stop_at_layer=1)
        with bypass_idle_bridges(tiny_bridge):
            assert torch.equal(tiny_bridge(tokens, stop_at_layer=1), bridged)
            handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
            try:
                n = len(block_calls)
                adapter(tiny_bridge).forward(tokens)
                assert len(block_calls) == n + adapter(tiny_bridge).n_layers  # global hook: no bypass
            finally:
                handle.remove()


@pytest.mark.parametrize("with_stepflow", [False, True], ids=["plain", "stepflow"])
def test_generate_with_the_bypass_gives_the_bridges_tokens(tiny_model, with_stepflow):
    """`generate` (which bypasses idle bridges) against the same call with a global torch
    hook, which turns the bypass off: same tokens and events."""
    from stepflow_tl.interventions.generate import generate

    ivs = _stepflow_all_layers if with_stepflow else list
    fast = generate(tiny_model, FUSED_PROMPTS, max_new_tokens=12, interventions=ivs())
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        slow = generate(tiny_model, FUSED_PROMPTS, max_new_tokens=12, interventions=ivs())
    finally:
        handle.remove()
    strip = lambda evs: [(x.intervention, x.layer, x.position, x.n_heads, x.lambda_b, x.injected_norm) for x in evs]
    for f, s in zip(fast, slow):
        assert f.output_ids == s.output_ids and strip(f.events) == strip(s.events)


def test_watched_layers_inside_fused_attention_give_the_bridges_own_attention(tiny_model, fused_calls):
    """A layer whose scores a hook edits runs the plugin's explicit path inside
    `fused_attention` (TL 4.x; the tiny model shares each KV head between two query heads):
    the bridge's own forward to rounding, and the hooks fire as often."""
    from stepflow_tl.tl.attention import fused_attention

    fired = []

    def edit(scores, hook):
        fired.append(hook.name)
        return scores + 0.25 * torch.arange(scores.shape[-1], dtype=scores.dtype) / scores.shape[-1]

    def look(pattern, hook):
        fired.append(hook.name)

    n_layers = adapter(tiny_model).n_layers
    hooks = [("blocks.0.attn.hook_attn_scores", edit)] + [
        (f"blocks.{layer}.attn.hook_pattern", look) for layer in range(n_layers)]  # no layer fused
    own = _decode_two(tiny_model, hooks)
    n = len(fired)
    with fused_attention(tiny_model):
        inside = _decode_two(tiny_model, hooks)
    assert n == 2 * (n_layers + 1) and len(fired) == 2 * n and not fused_calls
    torch.testing.assert_close(inside[0], own[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inside[1], own[1], rtol=1e-5, atol=1e-6)


def _attention_points(model):
    return [name for name in model.hook_dict if name.startswith("blocks.1.attn.") and "pattern" not in name
            and "attn_scores" not in name]


def test_every_attention_hook_point_fires_and_edits_in_the_fused_layers(tiny_bridge, fused_calls):
    """Under `fused_attention` and the bypass (as in `generate`), a hook on any hook point
    of a fused layer's attention (projections' inputs and outputs, rotary cos/sin and
    rotated q/k, hook_z, hook_out) fires as often and edits as the bridge's own forward."""
    from stepflow_tl.tl.attention import fused_attention
    from stepflow_tl.tl.bypass import bypass_idle_bridges

    tested = []
    for point in _attention_points(tiny_bridge):
        fired = []

        def edit(x, hook):
            fired.append(hook.name)
            return x * 0.75

        try:
            own = _decode_two(tiny_bridge, [(point, edit)])
        except ValueError:
            continue  # (a hook point TL gates behind a setting, e.g. hook_result)
        n = len(fired)
        if not n:
            continue  # (an alias the bridge's own forward does not fire either)
        with fused_attention(tiny_bridge), bypass_idle_bridges(tiny_bridge):
            fast = _decode_two(tiny_bridge, [(point, edit)])
        assert len(fired) == 2 * n, point
        tested.append(point)
        torch.testing.assert_close(fast[0], own[0], rtol=1e-5, atol=1e-5, msg=point)
        torch.testing.assert_close(fast[1], own[1], rtol=1e-5, atol=1e-5, msg=point)
    assert len(tested) >= 10 and {"blocks.1.attn.hook_cos", "blocks.1.attn.hook_rot_k", "blocks.1.attn.hook_out"} <= set(tested), tested
    assert fused_calls  # the layers ran the fused kernel


def test_hooks_added_and_removed_between_forwards_are_seen(tiny_bridge):
    """The choices `fused_attention` and the bypass cache per layer are made again when a
    hook is added or removed between two forwards of one ``with`` block."""
    from stepflow_tl.tl.attention import fused_attention
    from stepflow_tl.tl.bypass import bypass_idle_bridges

    fired = []

    def edit(x, hook):
        fired.append(hook.name)
        return x * 0.5

    with fused_attention(tiny_bridge), bypass_idle_bridges(tiny_bridge):
        plain = _decode_two(tiny_bridge)
        for point in ("blocks.1.attn.hook_rot_q", "blocks.1.hook_resid_mid", "blocks.0.attn.hook_attn_scores"):
            fired.clear()
            hooked = _decode_two(tiny_bridge, [(point, edit)])
            assert fired, point
            assert not torch.equal(hooked[1], plain[1]), point
            assert torch.equal(_decode_two(tiny_bridge)[1], plain[1]), point


def test_hook_census_key_changes_with_every_hook_and_forward_change():
    """`HookCensus`'s key moves with every hook added or removed on its modules (also on
    a module that held no hook when it last counted, and for hooks present before it was
    made) and with every replaced ``forward``, and stands still otherwise."""
    from stepflow_tl.tl.bypass import HookCensus

    a, b, outside = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    early = a.register_forward_hook(lambda *args: None)
    census = HookCensus([a, b, a])
    keys = [census.key()]

    def moved() -> bool:
        keys.append(census.key())
        return keys[-1] != keys[-2]

    assert not moved()
    early.remove()
    assert moved()
    pre = b.register_forward_pre_hook(lambda *args: None)
    assert moved()
    assert not moved()
    pre.remove()
    assert moved()
    outside.register_forward_hook(lambda *args: None)  # the counter moves, the hooks do not
    keys.append(census.key())
    assert not moved()
    backward = a.register_full_backward_hook(lambda *args: None)
    assert moved()
    backward.remove()
    assert moved()
    vars(b)["forward"] = lambda x: x
    assert moved()
    del vars(b)["forward"]
    assert moved()
