"""Benchmark 5 (GPU): one tiled Step-Saliency map of a 32k-token trace at
DeepSeek-R1-Distill-Qwen-7B's shape, random weights, bf16.

The model is built in memory from the configuration written out below (the shape of
``deepseek-ai/DeepSeek-R1-Distill-Qwen-7B``'s ``config.json``: Qwen2, 28 layers, 28
query and 4 key/value heads of 128, MLP 18944, vocabulary 152064, q/k/v biases), with
random weights drawn directly on the device (seed 0), and wrapped as a
``TransformerBridge``. The trace is real thinking text tokenised with the embedded
SmolLM2 tokenizer (its ids are valid ids of the larger vocabulary; the weights are
random, so the map's values mean nothing, only its cost does).

Printed: the time of ``step_saliency(model, trace, mode="tiled")`` (all layers, the
sequence loss), the peak device memory it allocated above the model's weights, and
whether the map is finite.

Run on a GPU::

    python benchmarks/saliency_gpu_7b.py                         # T = 32768, cuda, bf16
    python benchmarks/saliency_gpu_7b.py --tokens 8192 --block 512

and on a CPU, as the tests do, with a tiny configuration of the same architecture::

    python benchmarks/saliency_gpu_7b.py --tiny --device cpu --dtype float32 --tokens 300
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

R1_DISTILL_QWEN_7B = dict(
    architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    max_position_embeddings=131072, max_window_layers=28, rms_norm_eps=1e-6,
    rope_theta=10000.0, sliding_window=4096, use_sliding_window=False,
    tie_word_embeddings=False, vocab_size=152064, hidden_act="silu",
    bos_token_id=151646, eos_token_id=151643,
)
TINY = dict(R1_DISTILL_QWEN_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "float32": "float32"}


def build(config_dict: dict, device: str, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stepflow_tl.tl.models import load_embedded_tokenizer, load_model

    fields = {k: v for k, v in config_dict.items() if k != "architectures"}
    config = Qwen2Config(**fields, attn_implementation="eager")
    torch.manual_seed(0)
    with torch.device(device):  # draw the 7B weights on the device, never in host memory
        hf = Qwen2ForCausalLM._from_config(config, dtype=dtype).eval()
    return load_model("r1-distill-qwen-7b-shape", backend="bridge", hf_model=hf,
                      tokenizer=load_embedded_tokenizer(), device=device, dtype=dtype)


def main(argv=None) -> None:
    import torch

    from stepflow_tl import step_saliency
    from stepflow_tl.tl.attention import TiledAttentionScope

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--block", type=int, default=1024, help="tile side in tokens")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same architecture")
    args = parser.parse_args(argv)
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --tiny --device cpu to check the script")
    model = build(TINY if args.tiny else R1_DISTILL_QWEN_7B, args.device, dtype)
    trace = C.long_trace(model, args.tokens)
    TiledAttentionScope.BLOCK = args.block
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = step_saliency(model, trace, mode="tiled")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = "tiny Qwen2" if args.tiny else "R1-Distill-Qwen-7B shape"
    print(f"Tiled Step-Saliency, {name} (random weights), {args.dtype}, {args.device}, "
          f"T = {args.tokens}, {trace.n_steps} steps, tile {args.block}")
    peak = f"{(torch.cuda.max_memory_allocated() - weights) / C.GiB:.2f}" if cuda else "-"
    weights_gib = f"{weights / C.GiB:.2f}" if cuda else "-"
    print(C.table(
        ["T", "layers", "time s", "weights GiB", "peak above weights GiB", "map finite"],
        [[args.tokens, len(result.layers), f"{seconds:.1f}", weights_gib, peak,
          bool(result.maps.isfinite().all())]],
    ))


if __name__ == "__main__":
    main()
