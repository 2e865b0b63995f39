"""Step knockout with ordinary ``run_with_hooks``: how much does the answer depend on
each earlier step?

For every key step j, zero the attention all query steps send to step j (in every
layer) through the step hook point ``blocks.{l}.attn.hook_step_pattern``, and measure
the change in the log-probability of the summary tokens. On a GPU:

    python examples/step_knockout.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \
        --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

from stepflow_tl import DTYPES, Trace, attach_trace, load_model

QUESTION = "A shop sells pens at 3 dollars each. Mia buys 4 pens and pays with a 20 dollar note. How much change does she get?"
THINKING = (
    "Each pen costs 3 dollars and Mia buys 4 pens.\n\n"
    "So the pens cost 4 * 3 = 12 dollars.\n\n"
    "She pays with 20 dollars, so the change is 20 - 12 = 8 dollars.\n\n"
    "Check: 12 + 8 = 20, which matches the note."
)
SUMMARY = "Mia gets 8 dollars in change.\n\nAnswer: 8"


def summary_logprob(model, trace, fwd_hooks=()) -> float:
    """Sum of log p(token) over the summary tokens, teacher-forced."""
    ids = trace.token_ids[None].to(model.cfg.device)
    with torch.no_grad():
        logits = model.run_with_hooks(ids, fwd_hooks=list(fwd_hooks))
    logp = torch.log_softmax(logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    in_summary = torch.isin(trace.token_steps[1:], torch.tensor(trace.summary_steps)).to(logp.device)
    return float(logp[torch.arange(targets.shape[0]), targets][in_summary].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--quick", action="store_true", help="knock out the question step only (CI)")
    args = parser.parse_args()

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    trace = Trace.from_parts(model, question=QUESTION, thinking=THINKING, summary=SUMMARY)
    base = summary_logprob(model, trace)
    print(f"{trace.n_steps} steps; summary log-prob with nothing knocked out: {base:.3f}")
    key_steps = [0] if args.quick else [s.index for s in trace.steps if s.kind != "summary"]
    with attach_trace(model, trace):
        for j in key_steps:
            def knock_out(pattern, hook, j=j):
                pattern[:, :, :, j] = 0  # no query step attends to step j

            hooks = [(f"blocks.{l}.attn.hook_step_pattern", knock_out) for l in range(model.cfg.n_layers)]
            delta = summary_logprob(model, trace, hooks) - base
            print(f"  knock out {trace.step_labels[j]!r:42} change in summary log-prob {delta:+.3f}")


if __name__ == "__main__":
    main()
