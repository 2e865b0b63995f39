"""Benchmark 4: tiled Step-Saliency memory and time from 4k to 32k tokens.

A 4-layer Llama of SmolLM2-135M's width (d_model 576, 9 heads, 3 key/value heads,
d_head 64, MLP 1536, vocabulary 49152) with random weights (seed 0) and a context of
32768, wrapped as a ``TransformerBridge``, maps real-text traces of each length with
``step_saliency(..., mode="tiled")``, one fresh process per length. Printed per length:
peak RSS of the call, peak above the RSS at its start, that per token (flat if memory
grows linearly in T), and the time.

Run::

    .venv/bin/python benchmarks/saliency_tiled_scaling.py                      # 4k, 8k, 16k, 32k
    .venv/bin/python benchmarks/saliency_tiled_scaling.py --tokens 1024 2048 --layers 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SMOLLM2_WIDTH = dict(d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536, vocab_size=49152)


def build_model(n_layers: int, n_ctx: int, width: dict, dtype, device):
    """A random-weight Llama of the given width as a TransformerBridge (embedded tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stepflow_tl.tl.models import load_embedded_tokenizer, load_model

    config = LlamaConfig(
        vocab_size=width["vocab_size"], hidden_size=width["d_model"], intermediate_size=width["d_mlp"],
        num_hidden_layers=n_layers, num_attention_heads=width["n_heads"],
        num_key_value_heads=width["n_kv_heads"], max_position_embeddings=n_ctx,
        rope_theta=width.get("rope_theta", 10000.0), tie_word_embeddings=width.get("tied", True),
        attention_bias=width.get("qkv_bias", False), rms_norm_eps=1e-5, attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).to(dtype=dtype).eval()
    return load_model("random-llama", backend="bridge", hf_model=hf, tokenizer=load_embedded_tokenizer(),
                      device=device, dtype=dtype)


def worker(args) -> None:
    import torch

    from stepflow_tl import step_saliency

    C.set_threads()
    model = build_model(args.layers, args.n_ctx, SMOLLM2_WIDTH, torch.float32, "cpu")
    trace = C.long_trace(model, args.tokens[0])
    with torch.no_grad():
        model(trace.token_ids[None, :64], use_cache=False)
    base = C.rss()
    C.reset_peak_rss()
    start = time.perf_counter()
    result = step_saliency(model, trace, mode="tiled")
    seconds = time.perf_counter() - start
    C.emit({"seconds": seconds, "peak_rss": C.peak_rss(), "base_rss": base, "n_steps": trace.n_steps,
            "finite": bool(result.maps.isfinite().all()), "max": float(result.maps.max())})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n-ctx", type=int, default=32768)
    parser.add_argument("--cap-gib", type=float, default=20.0, help="peak RSS cap per run (GiB)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    rows = []
    for n_tokens in args.tokens:
        result = C.run_worker(
            [__file__, "--worker", "--tokens", n_tokens, "--layers", args.layers, "--n-ctx", args.n_ctx],
            timeout=6 * 3600, mem_cap=int(args.cap_gib * C.GiB),
        )
        if not result["ok"]:
            rows.append([n_tokens, "-", C.gib(result.get("peak_rss_seen")), "-", "-", "-", result["error"]])
            print(f"  T={n_tokens}: {result['error']}", file=sys.stderr, flush=True)
            break
        above = result["peak_rss"] - result["base_rss"]
        rows.append([n_tokens, result["n_steps"], C.gib(result["peak_rss"]), C.gib(above),
                     f"{above / n_tokens / 1024:.1f}", f"{result['seconds']:.0f}", "ok"])
        print(f"  T={n_tokens}: {result['seconds']:.0f} s, peak {C.gib(result['peak_rss'])} GiB",
              file=sys.stderr, flush=True)
    print(f"Tiled Step-Saliency, random {args.layers}-layer Llama of SmolLM2-135M's width, "
          f"n_ctx {args.n_ctx}, fp32, CPU, {C.n_threads()} threads, one process per length")
    print(C.table(["T", "steps", "peak RSS GiB", "above start GiB", "above start KiB/token", "time s", "status"], rows))


if __name__ == "__main__":
    main()
