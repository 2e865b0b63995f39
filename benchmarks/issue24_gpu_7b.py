"""Benchmark 8 (GPU): issue 24's ratios at DeepSeek-R1-Distill-Qwen-7B's shape (random
weights, bf16), one command, for the day a GPU is lent.

The model is `saliency_gpu_7b.build`'s (the 7B's ``config.json`` shape, weights drawn on
the device, seed 0); the texts are real thinking text (``r1_traces.jsonl``) tokenised with
the embedded SmolLM2 tokenizer (valid ids of the larger vocabulary). Measured, at each
``--tokens`` length (default 4,096 and 16,384):

- generation (greedy, ``--new-tokens`` after a prompt of that many tokens, batch
  ``--batch``): transformers' ``generate`` with SDPA attention, ``stepflow_tl.generate``
  plain, and with ``StepFlow()``; tokens/s and the ratios to transformers (targets: plain
  >= 0.95x, StepFlow >= 0.85x);
- Step-Saliency of a trace of that length (``loss="sequence"``, all layers): the authors'
  way (transformers eager, ``output_attentions=True``, ``retain_grad()`` on every layer's
  attention, one ``loss.backward()``, then the pooling), skipped where its attentions
  alone would not fit in the free device memory (printed as such); the floor (one
  transformers forward + backward of the same loss with SDPA attention and no hooks, the
  gradient taken at the input embeddings); and ``step_saliency(mode="auto")`` (the mode
  and tile it chose are printed). Time and peak device memory above the weights, ratios
  of auto to the authors' way (targets <= 1.0) and to the floor (target <= 1.5).

One process per variant (model built once per process; each measurement then resets the
device's peak-memory counter and synchronises around the timed call, after a warm-up
call at the shortest length). A measurement that runs out of device memory is printed as
``OOM``. Variants run one after another; ``--budget-s`` stops starting new ones when the
command would otherwise pass it (default 450 s, so the command stays under 8 minutes).

Run on a GPU::

    python benchmarks/issue24_gpu_7b.py
    python benchmarks/issue24_gpu_7b.py --tokens 4096 --batch 1 --new-tokens 16

and on a CPU, as the tests do, with a tiny model of the same architecture::

    python benchmarks/issue24_gpu_7b.py --tiny --device cpu --dtype float32 --tokens 128 --batch 1 2 --new-tokens 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from saliency_gpu_7b import DTYPES, R1_DISTILL_QWEN_7B, TINY, build  # noqa: E402

GENERATION = ("transformers", "plain", "stepflow")
SALIENCY = ("authors", "floor", "auto")


def _hf(config_dict: dict, device: str, dtype, attn: str):
    """The same random model as `build` (seed 0), as a plain transformers model."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = {k: v for k, v in config_dict.items() if k != "architectures"}
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM._from_config(Qwen2Config(**fields, attn_implementation=attn), dtype=dtype).eval()


class _Device:
    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self):
        self.sync()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.base = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def stop(self):
        self.sync()
        seconds = time.perf_counter() - self.t0
        peak = (self.torch.cuda.max_memory_allocated() - self.base) if self.cuda else None
        return seconds, peak

    def free(self):
        return self.torch.cuda.mem_get_info()[0] if self.cuda else float("inf")


def _oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


def worker(args) -> None:
    import torch

    from stepflow_tl import StepFlow, generate, step_saliency
    from stepflow_tl.saliency.losses import loss_target_positions
    from stepflow_tl.tl.models import load_embedded_tokenizer
    from stepflow_tl.traces.pooling import block_sums, normalise_blocks, pair_counts, step_onehot

    dtype = getattr(torch, DTYPES[args.dtype])
    shape = TINY if args.tiny else R1_DISTILL_QWEN_7B
    dev = _Device(args.device)
    tok = load_embedded_tokenizer()
    traces = {n: C.long_trace(tok, n) for n in args.tokens}
    out = []
    v = args.variant
    if v in ("transformers", "authors", "floor"):
        model = _hf(shape, args.device, dtype, "eager" if v == "authors" else "sdpa")
    else:
        model = build(shape, args.device, dtype)
    if v in GENERATION:
        # The random model's vocabulary is the 7B's (152,064 ids), so it would also pick ids
        # the SmolLM2 tokenizer (49,152) cannot decode. The same hook on the transformers
        # unembedding in every variant (it fires whether or not the bridge is bypassed)
        # keeps greedy decoding inside the tokenizer's ids, at the same cost for all.
        head = model.lm_head if v == "transformers" else model.original_model.lm_head.original_component
        n_ids = len(tok)
        head.register_forward_hook(lambda module, args_, logits: logits[..., n_ids:].fill_(float("-inf")))

    def gen_once(n_tokens, batch, new_tokens):
        ids = traces[n_tokens].token_ids.tolist()
        if v == "transformers":
            x = torch.tensor([ids] * batch, device=args.device)
            with torch.no_grad():
                res = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            return (res.shape[1] - x.shape[1]) * batch
        text = tok.decode(ids)  # a pre-rendered prompt of (about) n_tokens tokens
        gens = generate(model, [text] * batch, chat=False, max_new_tokens=new_tokens,
                        interventions=[StepFlow()] if v == "stepflow" else ())
        return sum(len(g.output_ids) for g in gens)

    def saliency_once(n_tokens):
        trace = traces[n_tokens]
        if v == "auto":
            result = step_saliency(model, trace, mode="auto")
            return {"mode": result.meta["mode"], "block": result.meta.get("block")}
        ids = trace.token_ids[None].to(args.device)
        positions = loss_target_positions("sequence", trace).to(args.device)
        if v == "floor":
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, use_cache=False).logits[0, positions - 1]
            loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, positions])
            torch.autograd.grad(loss, [embeds])
            return {}
        out_ = model(ids, output_attentions=True, use_cache=False)
        for a in out_.attentions:
            a.retain_grad()
        loss = torch.nn.functional.cross_entropy(out_.logits[0, positions - 1].float(), ids[0, positions])
        loss.backward()
        steps = trace.token_steps.to(args.device)
        onehot = step_onehot(steps, trace.n_steps)
        counts = pair_counts(steps, trace.n_steps, "mean").to(args.device)
        for a in out_.attentions:
            normalise_blocks(block_sums((a[0].float() * a.grad[0].float()).abs(), onehot, onehot), counts)
        model.zero_grad(set_to_none=True)
        return {}

    def fits(n_tokens):
        """The authors' way holds every layer's attention and its gradient."""
        need = 2 * shape["num_hidden_layers"] * shape["num_attention_heads"] * n_tokens ** 2 * dtype.itemsize
        return v != "authors" or need < dev.free()

    if v in GENERATION:
        gen_once(min(args.tokens), 1, 2)  # warm-up
        for n in args.tokens:
            for b in args.batch:
                try:
                    dev.start()
                    n_new = gen_once(n, b, args.new_tokens)
                    s, peak = dev.stop()
                    out.append({"kind": "generation", "T": n, "batch": b, "tok_s": n_new / s, "seconds": s,
                                "peak": peak})
                except torch.cuda.OutOfMemoryError as e:
                    out.append({"kind": "generation", "T": n, "batch": b, "error": "OOM" if _oom(e) else str(e)})
                    torch.cuda.empty_cache()
    else:
        # The authors' script calls loss.backward() on a model whose weights take gradients;
        # the floor and auto take the gradient of the activations only.
        model.requires_grad_(v == "authors")
        for n in args.tokens:
            if not fits(n):
                out.append({"kind": "saliency", "T": n, "error": "skipped: would not fit"})
                continue
            try:
                dev.start()
                info = saliency_once(n)
                s, peak = dev.stop()
                out.append({"kind": "saliency", "T": n, "seconds": s, "peak": peak, **info})
            except torch.cuda.OutOfMemoryError as e:
                out.append({"kind": "saliency", "T": n, "error": "OOM" if _oom(e) else str(e)})
                torch.cuda.empty_cache()
    C.emit({"rows": out})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same architecture")
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--variants", nargs="+", default=[*GENERATION, *SALIENCY], choices=[*GENERATION, *SALIENCY])
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; run with --tiny --device cpu to check the script")

    start, got = time.perf_counter(), {}
    for variant in args.variants:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            print(f"  {variant}: not run (the {args.budget_s:.0f} s budget is spent)", file=sys.stderr, flush=True)
            continue
        cmd = [__file__, "--worker", "--variant", variant, "--device", args.device, "--dtype", args.dtype,
               "--new-tokens", args.new_tokens, "--tokens", *args.tokens, "--batch", *args.batch]
        res = C.run_worker(cmd + (["--tiny"] if args.tiny else []), timeout=left)
        print(f"  {variant}: {'ok' if res['ok'] else res['error']} ({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        got[variant] = {(r["T"], r.get("batch")): r for r in res.get("rows", [])}

    def cell(variant, key, field):
        r = got.get(variant, {}).get(key)
        if r is None:
            return None, "not run"
        return (r[field], None) if field in r else (None, r.get("error", "-"))

    def ratio(a, b, invert=False):
        if a is None or b is None:
            return "-"
        return f"{(b / a if invert else a / b):.2f}"

    name = "tiny Qwen2" if args.tiny else "R1-Distill-Qwen-7B shape"
    print(f"Issue 24 on a {name} (random weights), {args.dtype}, {args.device}; one process per variant")
    rows = []
    for n in args.tokens:
        for b in args.batch:
            speed = {v: cell(v, (n, b), "tok_s") for v in GENERATION}
            base = speed["transformers"][0]
            rows.append([n, b] + [f"{s:.1f}" if s else e for s, e in speed.values()]
                        + [ratio(speed["plain"][0], base), ratio(speed["stepflow"][0], base)])
    print(C.table(["T", "batch", "transformers tok/s", "plain tok/s", "stepflow tok/s", "plain x tf (>= 0.95)",
                   "stepflow x tf (>= 0.85)"], rows))
    rows = []
    for n in args.tokens:
        t = {v: cell(v, (n, None), "seconds") for v in SALIENCY}
        m = {v: cell(v, (n, None), "peak") for v in SALIENCY}
        auto = got.get("auto", {}).get((n, None), {})
        rows.append([n] + [f"{s:.1f}" if s is not None else e for s, e in t.values()]
                    + [C.gib(m[v][0]) for v in SALIENCY]
                    + [f"{auto.get('mode', '-')}" + (f" ({auto['block']})" if auto.get("block") else ""),
                       ratio(t["auto"][0], t["authors"][0]), ratio(m["auto"][0], m["authors"][0]),
                       ratio(t["auto"][0], t["floor"][0])])
    print(C.table(["T", "authors s", "floor s", "auto s", "authors GiB", "floor GiB", "auto GiB", "auto ran",
                   "time auto/authors (<= 1)", "memory auto/authors (<= 1)", "time auto/floor (<= 1.5)"], rows))


if __name__ == "__main__":
    main()
