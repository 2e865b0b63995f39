"""GPU benchmark of the vLLM engine: R1-Distill-Qwen-7B's shape, random weights, bf16,
64 prompts x 4,096 new tokens, plain vLLM against vLLM with StepFlow (for the day a GPU
is lent; it was not run on this project's machines, which have no GPU).

The model is ``Qwen2ForCausalLM`` with DeepSeek-R1-Distill-Qwen-7B's sizes (28 layers,
hidden 3,584, 28 query and 4 key/value heads, MLP 18,944) and random weights
(``load_format="dummy"``: nothing is downloaded), with SmolLM2's tokenizer and
vocabulary (49,152) so that the step tracker has a real tokenizer offline. Random
weights write no blank lines, so SMI almost never fires; OEB fires on every decoded
token (the text is thinking from the first token), which is the costly part. Every
row runs its full budget (``ignore_eos`` is not needed: a random model rarely writes
the EOS token, and a row that does just ends early, in both variants alike).

One process per variant (``--variant plain|stepflow``); the parent runs both in turn
and prints tokens/s and the ratio. Needs vLLM's CUDA build in the range the engine
checks (``pip install vllm==0.32.0`` in a venv with this package installed ``--no-deps``
plus its dependencies), about 40 GiB of GPU memory for the KV cache and our key/value
store (7 OEB layers' keys and values and 7 SMI layers' values of 64 x 4,200 positions:
~5.8 GiB bf16), and under 8 minutes on one H100::

    python benchmarks/vllm_gpu_7b.py                       # both variants, 64 x 4096
    python benchmarks/vllm_gpu_7b.py --prompts 8 --new-tokens 256   # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=False, hidden_act="silu", model_type="qwen2", architectures=["Qwen2ForCausalLM"],
               torch_dtype="bfloat16", use_sliding_window=False)


def model_folder(root: Path) -> Path:
    """config.json of the 7B shape (random weights come from vLLM's dummy loader) and
    SmolLM2's tokenizer files."""
    from stepflow_tl.tl.models import load_embedded_tokenizer

    tok = load_embedded_tokenizer()
    tok.save_pretrained(str(root))
    config = dict(QWEN_7B, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    (root / "config.json").write_text(json.dumps(config, indent=1))
    return root


def worker(args) -> None:
    from stepflow_tl import StepFlow
    from stepflow_tl.engines.vllm import VLLMEngine
    from stepflow_tl.study import builtin_suite
    from stepflow_tl.study.problems import prompt_for

    prompts = [prompt_for(p, style="chat") for p in builtin_suite(n_per_level=(args.prompts + 3) // 4)][: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(Path(tmp))
        engine = VLLMEngine(str(folder), dtype="bfloat16", max_num_seqs=args.prompts,
                            max_model_len=args.new_tokens + 256, load_format="dummy",
                            gpu_memory_utilization=0.85)
        ivs = [StepFlow()] if args.variant == "stepflow" else []
        engine.generate(prompts[:2], max_new_tokens=16, interventions=ivs)  # warm-up
        start = time.perf_counter()
        gens = engine.generate(prompts, max_new_tokens=args.new_tokens, interventions=ivs)
        seconds = time.perf_counter() - start
        tokens = sum(len(g.output_ids) for g in gens)
        C.emit({"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
                "events": sum(len(g.events) for g in gens)})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=4096)
    parser.add_argument("--variant", choices=("plain", "stepflow"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    results = {}
    for variant in ("plain", "stepflow"):
        res = C.run_worker([__file__, "--worker", "--variant", variant, "--prompts", args.prompts,
                            "--new-tokens", args.new_tokens], timeout=450)
        if not res["ok"]:
            print(f"{variant}: {res['error']}", file=sys.stderr)
            continue
        results[variant] = res
        print(f"{variant:9s} {res['tok_s']:.0f} tok/s ({res['tokens']} tokens, {res['seconds']:.0f} s, "
              f"{res['events']} events)", flush=True)
    if len(results) == 2:
        print(f"stepflow / plain: {results['stepflow']['tok_s'] / results['plain']['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
