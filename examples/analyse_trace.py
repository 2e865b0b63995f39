"""Analyse one reasoning trace with Step-Saliency: step maps, diagnostics, a report.

On this machine (CPU) it reads a real DeepSeek-R1-Distill-Qwen-7B trace with the
embedded SmolLM2-135M-Instruct (teacher forcing: the small model reads another
model's reasoning). On a GPU, point it at the model that wrote the traces:

    python examples/analyse_trace.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \
        --device cuda --dtype bfloat16 --record 29

Prints the diagnostics and writes an HTML report and a PNG of one layer's map.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stepflow_tl import DTYPES, Trace, load_model, step_saliency
from stepflow_tl.viz import plot_step_map

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "r1_traces.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--traces", default=str(DATA))
    parser.add_argument("--record", type=int, default=33, help="index of the trace in the JSONL file")
    parser.add_argument("--out", default="out/analyse_trace")
    parser.add_argument("--quick", action="store_true", help="a few layers only (CI)")
    args = parser.parse_args()

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    with open(args.traces) as lines:
        record = json.loads(lines.readlines()[args.record])
    trace = Trace.from_record(model, record)
    print(f"trace {args.record}: {trace.meta.get('model')}, correct={trace.meta.get('correct')}, "
          f"{trace.n_tokens} tokens, {trace.n_steps} steps ({len(trace.thinking_steps)} thinking)")

    n_layers = model.cfg.n_layers
    layers = [0, n_layers // 2, n_layers - 1] if args.quick else None
    result = step_saliency(model, trace, mode="bounded", layers=layers)
    diagnostics = result.diagnose()
    print(diagnostics)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    html = result.save_html(out / "report.html", diagnostics=diagnostics)
    deep = result.layers[-1]
    figure = plot_step_map(result.layer(deep).numpy(), result.step_labels, title=f"Step-Saliency, layer {deep}")
    figure.savefig(out / f"step_map_layer{deep}.png", dpi=110, bbox_inches="tight")
    print(f"report: {html}\npicture: {out / f'step_map_layer{deep}.png'}")


if __name__ == "__main__":
    main()
