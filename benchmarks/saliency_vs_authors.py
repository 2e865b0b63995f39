"""Benchmark 9: Step-Saliency against the authors' way and against the floor, on SmolLM2-135M.

At each trace length (real thinking text, ``loss="sequence"``, all 30 layers, fp32, CPU):

- ``authors``: transformers eager attention, ``output_attentions=True``, ``retain_grad()``
  on every layer's attention, one ``loss.backward()`` (the weights take gradients, as in
  the authors' script), then ``|A * dL/dA|`` pooled into step maps;
- ``floor``: one transformers forward + backward of the same loss with SDPA attention and
  no hooks (the gradient taken at the input embeddings): what any attention-gradient
  method pays at least;
- ``auto`` and any of ``dense``, ``bounded``, ``tiled`` (``--modes``): ``step_saliency``
  in that mode (``auto`` prints the mode, tile side and checkpointing it chose).

One fresh process per measurement, variants interleaved, best time of ``--repeats``;
memory is the call's peak resident set (counter reset after the model is loaded).
The authors' way is skipped where its attentions and their gradients alone
(2 x 30 x 9 x T^2 x 4 bytes) would pass ``--authors-cap-gib`` (default 16), and said so.
Printed: time and memory, and the ratios auto/authors (targets <= 1.0) and auto/floor
(target <= 1.5). On a shared machine run the long ones under a lock, e.g.
``flock /work/wt/suite.lock``.

Run::

    .venv/bin/python benchmarks/saliency_vs_authors.py                              # T = 512 .. 4096
    .venv/bin/python benchmarks/saliency_vs_authors.py --tokens 512 --repeats 1 --modes dense
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODES = ("dense", "bounded", "tiled")


def worker(args) -> None:
    import torch

    from stepflow_tl import load_model, step_saliency
    from stepflow_tl.saliency.losses import loss_target_positions
    from stepflow_tl.tl.models import load_embedded_hf, load_embedded_tokenizer
    from stepflow_tl.traces.pooling import block_sums, normalise_blocks, pair_counts, step_onehot

    C.set_threads()
    v = args.variant
    if v in ("authors", "floor"):
        model, _ = load_embedded_hf()
        if v == "floor":
            model.set_attn_implementation("sdpa")
        model.requires_grad_(v == "authors")
        trace = C.long_trace(load_embedded_tokenizer(), args.tokens)
    else:
        model = load_model(device="cpu")
        trace = C.long_trace(model, args.tokens)
    ids = trace.token_ids[None]
    with torch.no_grad():  # page in the weights and warm the allocator before measuring
        model(ids[:, :64], use_cache=False)
    positions = loss_target_positions("sequence", trace)
    C.reset_peak_rss()
    start = time.perf_counter()
    info = {}
    if v == "floor":
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, positions - 1]
        torch.autograd.grad(torch.nn.functional.cross_entropy(logits, ids[0, positions]), [embeds])
    elif v == "authors":
        out = model(ids, output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        torch.nn.functional.cross_entropy(out.logits[0, positions - 1], ids[0, positions]).backward()
        onehot = step_onehot(trace.token_steps, trace.n_steps)
        counts = pair_counts(trace.token_steps, trace.n_steps, "mean")
        maps = [normalise_blocks(block_sums((a[0] * a.grad[0]).abs(), onehot, onehot), counts).mean(0)
                for a in out.attentions]
        info["finite"] = bool(torch.stack(maps).isfinite().all())
    else:
        result = step_saliency(model, trace, mode=v)
        info = {"mode": result.meta["mode"], "block": result.meta.get("block"),
                "checkpoint": result.meta.get("checkpoint")}
    seconds = time.perf_counter() - start
    C.emit({"seconds": seconds, "peak_rss": C.peak_rss(), **info})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--modes", nargs="*", default=[], choices=MODES, help="modes to time beside auto")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--authors-cap-gib", type=float, default=16.0)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.tokens = args.tokens[0]
        return worker(args)

    variants = ["authors", "floor", "auto", *args.modes]
    rows = []
    for n in args.tokens:
        best = {}
        authors_need = 2 * 30 * 9 * n * n * 4
        for rep in range(args.repeats):
            for v in variants if rep % 2 == 0 else variants[::-1]:
                if v == "authors" and authors_need > args.authors_cap_gib * C.GiB:
                    best[v] = {"skipped": f"skipped: needs > {authors_need / C.GiB:.0f} GiB"}
                    continue
                res = C.run_worker([__file__, "--worker", "--variant", v, "--tokens", n])
                label = f"{res['seconds']:.1f} s, {C.gib(res['peak_rss'])} GiB" if res["ok"] else res["error"]
                print(f"  T={n} {v}: {label}", file=sys.stderr, flush=True)
                if res["ok"] and res["seconds"] < best.get(v, {}).get("seconds", float("inf")):
                    best[v] = res
        t = {v: best.get(v, {}).get("seconds") for v in variants}
        m = {v: best.get(v, {}).get("peak_rss") for v in variants}
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
        auto = best.get("auto", {})
        ran = f"{auto.get('mode', '-')}" + (f" ({auto['block']}" + (", checkpointed" if auto.get("checkpoint") else "")
                                             + ")" if auto.get("block") else "")
        rows.append([n] + [f"{t[v]:.1f}" if t[v] else best.get(v, {}).get("skipped", "-") for v in variants]
                    + [C.gib(m[v]) for v in variants]
                    + [ran, ratio(t["auto"], t["authors"]), ratio(m["auto"], m["authors"]), ratio(t["auto"], t["floor"])])
    print(f"Step-Saliency vs the authors' way, SmolLM2-135M fp32, CPU, {C.n_threads()} thread(s), loss=sequence, "
          f"30 layers, best of {args.repeats}, one process per measurement")
    print(C.table(["T"] + [f"{v} s" for v in variants] + [f"{v} GiB" for v in variants]
                  + ["auto ran", "time auto/authors (<= 1)", "memory auto/authors (<= 1)", "time auto/floor (<= 1.5)"],
                  rows))


if __name__ == "__main__":
    main()
