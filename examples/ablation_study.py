"""A paired ablation study: StepFlow, its parts and their matched random controls on
the same problems with the same seeds, graded, with intervals and an HTML report.

On this machine it runs the embedded SmolLM2-135M-Instruct on the built-in multi-step
word problems. On a GPU, with an R1-Distill model and a MATH-500 file:

    python examples/ablation_study.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \
        --device cuda --dtype bfloat16 --problems math500.jsonl --max-new-tokens 8192 \
        --format r1 --prompt-style r1 --batch-size 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stepflow_tl import DTYPES, builtin_suite, evaluate, load_model, load_problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--problems", default=None, help="a problem file; default: the built-in suite")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--format", default="auto")
    parser.add_argument("--prompt-style", default="chat")
    parser.add_argument("--out", default="out/ablation_study")
    parser.add_argument("--quick", action="store_true", help="3 problems, 2 conditions, 24 tokens (CI)")
    args = parser.parse_args()

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    problems = load_problems(args.problems) if args.problems else builtin_suite(n_per_level=4, levels=(1, 2, 3))
    conditions = ["baseline", "stepflow", "random_stepflow", "oeb", "smi", "matched_noise", "random_momentum"]
    if args.quick:
        problems, conditions, args.max_new_tokens = problems[:3], conditions[:2], 24
    out = Path(args.out)
    study = evaluate(
        model, problems, conditions=conditions, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, results_path=out / "results.jsonl",  # resumable: re-run to continue
        format=args.format, prompt_style=args.prompt_style,
    )
    columns = ["condition", "accuracy", "acc_low", "acc_high", "diff", "diff_low", "diff_high",
               "mcnemar_p", "mean_tokens", "time_ratio"]
    summary = study.summary()
    print(summary[[c for c in columns if c in summary.columns]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"report: {study.save_html(out / 'report.html')}")


if __name__ == "__main__":
    main()
