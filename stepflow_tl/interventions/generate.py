"""KV-cached generation on both TL backends, with StepFlow interventions.

`generate` runs a batch of prompts (left-padded) token by token through
``adapter(model).prefill/decode``, tracks the step structure of every row online
with a `StepTracker`, hands it to the interventions as a `StepState` (device
tensors, one column appended per token) and returns one `Generation` per prompt.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import pandas as pd
import torch

from ..checks import check_int, check_real
from ..errors import StepflowError
from ..tl.adapter import TLModel, Tokenizer, adapter, pad_token_ids, tokenizer_of
from ..tl.attention import fused_attention
from ..tl.bypass import bypass_idle_bridges
from ..traces.formats import QUESTION_TYPE, conversation, decode, find_question, render_prompt, resolve_format, resolve_split
from ..traces.trace import Trace, TraceWarning
from .base import InterventionEvent, apply_interventions
from .state import RowTracker, StepState


@dataclass
class Generation:
    """One generated row.

    Attributes:
        prompt: the rendered prompt text the model saw.
        text: the generated text (stop string and EOS excluded).
        trace: `Trace` of exactly ``prompt_ids + output_ids`` (``Trace.from_ids``: the
            ids are decoded, never re-tokenised), so its positions are the positions the
            model ran and ``events`` refer to. Its text is ``prompt`` plus the decoded
            output ids, including the EOS (markup, no step) or the stop string's tokens.
        prompt_ids: the prompt's token ids (without padding).
        output_ids: generated token ids (including the EOS / the tokens of a stop
            string, which ended generation).
        events: what each intervention did (`InterventionEvent`; ``position`` indexes
            ``prompt_ids + output_ids``).
        stop_reason: ``"eos"``, ``"stop"`` (a stop string) or ``"length"``.
        seed: the row's seed (from the call's seed and the prompt index).
        prefill_s: wall time of the prefill the row's prompt ran in (with the prompts
            that joined the batch with it).
        decode_s: wall time from the end of that prefill to the row's last token.
        tokens_per_s: this row's output tokens / decode_s.
        format, split: how the trace was segmented (``"auto"`` resolved).
    """

    prompt: str
    text: str
    trace: object
    prompt_ids: List[int]
    output_ids: List[int]
    events: List[InterventionEvent]
    stop_reason: str
    seed: int
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    format: str = "plain"
    split: object = "blank_lines"
    interventions: List[str] = field(default_factory=list)

    def to_dataframe(self):
        """The event log as a pandas DataFrame (one row per layer x query that fired)."""
        cols = list(InterventionEvent.__dataclass_fields__)
        return pd.DataFrame([asdict(e) for e in self.events], columns=cols)

    def to_dict(self) -> dict:
        """JSON-safe summary (the trace as ``Trace.to_dict()``)."""
        return {
            "prompt": self.prompt,
            "text": self.text,
            "prompt_ids": list(self.prompt_ids),
            "output_ids": list(self.output_ids),
            "stop_reason": self.stop_reason,
            "seed": self.seed,
            "format": self.format,
            "split": self.split if isinstance(self.split, str) else getattr(self.split, "__name__", "callable"),
            "interventions": list(self.interventions),
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "tokens_per_s": self.tokens_per_s,
            "n_events": len(self.events),
            "events": [asdict(e) for e in self.events],
            "trace": self.trace.to_dict() if hasattr(self.trace, "to_dict") else None,
        }


# The row seed formula; the seed scale is odd, hence invertible modulo 2**62, which
# `seed_for_rows` relies on.
_SEED_SCALE, _INDEX_SCALE, _SEED_OFFSET, _SEED_MODULUS = 1_000_003, 7_919, 12_345, 2 ** 62


def row_seed(seed: int, index: int) -> int:
    """Seed of prompt ``index`` in a call with ``seed``: depends on nothing else, so a
    row replays exactly whatever batch it is in."""
    return (int(seed) * _SEED_SCALE + int(index) * _INDEX_SCALE + _SEED_OFFSET) % _SEED_MODULUS


def seed_for_rows(seed: int, first_index: int) -> int:
    """The ``seed`` for `generate` that gives its row j the seed of row ``first_index + j``
    of a call with ``seed``, so a run of consecutive items can start at any index
    (``row_seeds=`` gives any items their own seeds directly)."""
    inverse = pow(_SEED_SCALE, -1, _SEED_MODULUS)
    return ((int(seed) * _SEED_SCALE + int(first_index) * _INDEX_SCALE) * inverse) % _SEED_MODULUS


def _prompt_list(prompts) -> list:
    """``prompts`` as a list of prompts: a single string or conversation becomes a list
    of one."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(m, dict) for m in prompts)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise StepflowError(f"prompts must be {QUESTION_TYPE}, or a list of them; got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, list, tuple)):
            raise StepflowError(f"prompts[{i}] must be {QUESTION_TYPE}, got {type(p).__name__}")
    return list(prompts)


def _question_in(tokenizer, prompt_text: str, question: Optional[str]) -> str:
    """The question text to locate in a rendered prompt: the given one, else the last
    user message found through the chat template, else the whole prompt."""
    if question is not None:
        return question
    try:
        q0, q1 = find_question(tokenizer, prompt_text, None)
        return prompt_text[q0:q1]
    except StepflowError:
        return prompt_text


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token id from ``logits`` ``[vocab]`` (fp32), nucleus-filtered."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        filtered = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
        probs = filtered / filtered.sum()
    return torch.multinomial(probs, 1, generator=generator)[0]


@dataclass
class PromptBatch:
    """The prompts of one generation call as both engines run them: rendered texts,
    question texts, token ids, token budgets, row seeds, and the resolved format/split."""

    texts: List[str]
    questions: List[str]
    ids: List[List[int]]
    budgets: List[int]
    seeds: List[int]
    stop: List[str]
    format: str
    split: object


Prompts = Union[str, Sequence[dict], Sequence[Union[str, Sequence[dict]]]]


def prepare_prompts(tok: Tokenizer, prompts: Prompts, *, max_new_tokens: Union[int, Sequence[int]], seed: int,
                    temperature: float, top_p: float, stop: Sequence[str], format: str, chat: bool,
                    system: Optional[str], split: Union[str, Callable],
                    questions: Optional[Sequence[str]], row_seeds: Optional[Sequence[int]] = None,
                    reasoning_effort: Optional[str] = None) -> PromptBatch:
    """Check the arguments `generate` shares with the vLLM engine and render, tokenise
    and seed the prompts (arguments as in `generate`)."""
    prompts = _prompt_list(prompts)
    if not prompts:
        raise StepflowError("no prompts given")
    seed = check_int("seed", seed)
    check_real("temperature", temperature, low=0.0, low_open=True)
    check_real("top_p", top_p, low=0.0, high=1.0, low_open=True)
    if isinstance(stop, str):
        stop = [stop]
    if not all(isinstance(x, str) and x for x in stop):
        raise StepflowError(f"stop must be a list of non-empty strings, got {stop!r}")
    texts = [render_prompt(tok, p, system, chat=chat, reasoning_effort=reasoning_effort) for p in prompts]
    fmt = resolve_format(tok, texts[0], format)
    split = resolve_split(split, fmt)
    if questions is not None and len(questions) != len(prompts):
        raise StepflowError(f"got {len(questions)} questions for {len(prompts)} prompts")
    qtexts = [conversation(p, system)[1] if chat else
              _question_in(tok, t, questions[i] if questions is not None else None)
              for i, (p, t) in enumerate(zip(prompts, texts))]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    if any(len(x) == 0 for x in ids):
        raise StepflowError("an empty prompt cannot be generated from")
    if isinstance(max_new_tokens, (list, tuple)):
        if len(max_new_tokens) != len(ids):
            raise StepflowError(f"got {len(max_new_tokens)} max_new_tokens for {len(ids)} prompts")
        budgets = [check_int(f"max_new_tokens[{i}]", n, low=1) for i, n in enumerate(max_new_tokens)]
    else:
        budgets = [check_int("max_new_tokens", max_new_tokens, low=1)] * len(ids)
    if row_seeds is None:
        seeds = [row_seed(seed, i) for i in range(len(ids))]
    elif len(row_seeds) != len(ids):
        raise StepflowError(f"got {len(row_seeds)} row_seeds for {len(ids)} prompts")
    else:
        seeds = [check_int(f"row_seeds[{i}]", x) for i, x in enumerate(row_seeds)]
    return PromptBatch(texts=texts, questions=qtexts, ids=ids, budgets=budgets, seeds=seeds, stop=list(stop),
                       format=fmt, split=split)


@torch.no_grad()
def generate(
    model: TLModel,
    prompts: Prompts,
    *,
    max_new_tokens: Union[int, Sequence[int]] = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    interventions: Sequence = (),
    stop: Sequence[str] = (),
    format: str = "auto",
    chat: bool = True,
    system: Optional[str] = None,
    split: str = "auto",
    questions: Optional[Sequence[str]] = None,
    batch_size: Optional[int] = None,
    static_batch: bool = False,
    split_summary: bool = False,
    reasoning_effort: Optional[str] = None,
    row_seeds: Optional[Sequence[int]] = None,
    on_finish: Optional[Callable[[int, "Generation"], None]] = None,
) -> List[Generation]:
    """Generate from a batch of prompts with KV caching, optionally with interventions.

    Args:
        model: a TL model (``TransformerBridge`` or ``HookedTransformer``).
        prompts: one prompt or a list. With ``chat=True`` a prompt is a question string
            or an HF chat conversation (``[{"role": "system", "content": ...},
            {"role": "user", "content": ...}]``, ending with a user message: the
            question), rendered through the chat template with the generation prompt;
            a conversation gives the same generation as its question string with the
            same ``system``. With ``chat=False``, pre-rendered prompt texts.
        max_new_tokens: token budget per row, or one per prompt.
        do_sample, temperature, top_p: greedy (default) or nucleus sampling; each row
            has its own ``torch.Generator`` seeded with ``row_seed(seed, index)``.
        interventions: `Intervention` objects (e.g. ``[StepFlow()]``), composed in order.
        stop: stop strings (generation also stops at the tokenizer's EOS).
        format: how thinking and summary are delimited: ``"r1"`` (``<think>``),
            ``"plain"`` (thinking until a summary marker such as "Answer:"),
            ``"harmony"`` or ``"auto"`` (from the chat template).
        chat, system: prompt rendering.
        split: how thinking is split into steps: ``"blank_lines"``, ``"lines"``,
            ``"sentences"``, ``"sentences_min15"`` (short sentences joined to the next,
            docs/traces.md), or ``"auto"`` (``"lines"`` for the plain format, whose
            models write one step per line, else ``"blank_lines"``; see
            ``traces.formats.AUTO_SPLIT``). ``Generation.split`` says which was used.
        questions: with ``chat=False``, the question text inside each prompt (the
            question segment, OEB's bridge while thinking); by default the last user
            message found through the chat template, else the whole prompt.
        batch_size: rows decoded at once (default: every prompt). A row that finishes
            leaves the batch at once (its KV-cache rows and step state are dropped) and
            the next waiting prompt joins (prefilled, then left-padded into the batch),
            so the batch stays full and no finished row is computed. Every row's tokens
            depend only on its prompt and its seed ``row_seed(seed, index)``, whatever
            batch it shares. Without interventions, rows with the same prompt share one
            prefill (its KV-cache row is copied, and kept while more waiting rows have
            that prompt): N samples of one prompt prefill it once.
        static_batch: keep finished rows running until every row of the batch has
            finished, then start the next ``batch_size`` prompts (the behaviour before
            batches shrank; for comparison, and for KV caches rows cannot leave).
        reasoning_effort: harmony's reasoning effort in the prompt (``"low"``, ``"medium"``,
            ``"high"``; GPT-OSS, `render_prompt`).
        split_summary: also split the summary into steps with ``split`` (the authors'
            convention: their analysis cuts the summary at blank lines), online and in
            each `Generation.trace`.
        row_seeds: each prompt's own seed (default ``row_seed(seed, index)``), e.g. a
            study's item seeds, so an item replays whatever call and batch it runs in.
        on_finish: called as ``on_finish(index, generation)`` as soon as a row has
            finished and left the batch (rows finish out of order), e.g. to store it. It
            runs while generation's hooks are installed: it must not run the model.

    Returns:
        One `Generation` per prompt, in order.
    """
    a = adapter(model)
    tok = tokenizer_of(model)
    device = a.device
    batch = prepare_prompts(tok, prompts, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                            top_p=top_p, stop=stop, format=format, chat=chat, system=system, split=split,
                            questions=questions, row_seeds=row_seeds, reasoning_effort=reasoning_effort)
    texts, qtexts, ids, budgets, seeds, stop = batch.texts, batch.questions, batch.ids, batch.budgets, batch.seeds, batch.stop
    fmt, split = batch.format, batch.split
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if a.n_ctx:
        # Checked before generating: a budget past the context would otherwise run to the
        # end of the context (minutes on a large model) and only then fail.
        over = [i for i in range(len(ids)) if len(ids[i]) + budgets[i] > a.n_ctx]
        if over:
            i = over[0]
            raise StepflowError(
                f"prompt {i} has {len(ids[i])} tokens and max_new_tokens={budgets[i]}: {len(ids[i]) + budgets[i]} "
                f"tokens, more than the model's context of {a.n_ctx}"
                f"{f' ({len(over)} prompts are over)' if len(over) > 1 else ''}; lower max_new_tokens to at most "
                f"{max(a.n_ctx - len(ids[i]), 0)} or shorten the prompt")
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    longest_stop = max((len(x) for x in stop), default=0)
    interventions = list(interventions)
    width = len(ids) if batch_size is None else check_int("batch_size", batch_size, low=1)
    reshape = not static_batch

    active: List[int] = []  # the prompt index of each batch row
    waiting = deque(range(len(ids)))
    trackers, generators = {}, {}
    outputs: List[List[int]] = [[] for _ in ids]
    done = [False] * len(ids)
    reasons = ["length"] * len(ids)
    cut: List[Optional[int]] = [None] * len(ids)
    prefill_s, started, finished = [0.0] * len(ids), [0.0] * len(ids), [0.0] * len(ids)
    row_events: Dict[int, List[InterventionEvent]] = {i: [] for i in range(len(ids))}
    results: List[Optional[Generation]] = [None] * len(ids)
    names = [repr(iv) for iv in interventions]

    def take_events(run, rows) -> None:
        for e in run.take_events(rows):
            row_events[e.row].append(e)

    def finish(i: int) -> None:
        """Build row ``i``'s `Generation` once it has left the batch (its events are taken)."""
        out = outputs[i]
        text = decode(tok, out[:-1] if reasons[i] == "eos" else out)
        if cut[i] is not None:
            text = text[: cut[i]]
        # The last output token is never run for the row (nothing reads what follows it),
        # so events there exist only where a static batch ran it on; they are dropped.
        stop_at = len(ids[i]) + len(out) - 1
        decode_s = finished[i] - started[i]
        with warnings.catch_warnings():
            # An output cut by the budget has no summary; Trace says so in `complete`.
            warnings.simplefilter("ignore", TraceWarning)
            trace = Trace.from_ids(tok, ids[i], out, format=fmt, question=qtexts[i], split=split,
                                   split_summary=split_summary, allow_no_thinking=True,
                                   max_tokens=a.n_ctx or None)
        results[i] = Generation(
            prompt=texts[i], text=text, trace=trace, prompt_ids=list(ids[i]), output_ids=out,
            events=[e for e in row_events.pop(i) if e.position < stop_at],
            stop_reason=reasons[i], seed=seeds[i], prefill_s=prefill_s[i], decode_s=decode_s,
            tokens_per_s=len(out) / decode_s if decode_s > 0 else float("nan"),
            format=fmt, split=split, interventions=names,
        )
        if on_finish is not None:
            on_finish(i, results[i])

    def state_of(rows) -> StepState:
        return StepState.from_rows([trackers[i].row for i in rows], device=device,
                                   row_seeds=[seeds[i] for i in rows],
                                   prefill_lengths=[len(ids[i]) for i in rows])

    def next_group() -> List[int]:
        """The waiting prompts that fill the batch, with their trackers and generators."""
        group = [waiting.popleft() for _ in range(min(len(waiting), width - len(active)))]
        for i in group:
            generators[i] = torch.Generator(device=device)
            generators[i].manual_seed(seeds[i])
            if interventions:
                trackers[i] = RowTracker(tok, fmt, split, texts[i], qtexts[i], split_summary)
                if trackers[i].prompt_ids != ids[i]:
                    raise StepflowError("the tracker tokenised the prompt differently from generate")
        return group

    def prefill_state(group) -> Optional[StepState]:
        if not interventions:
            return None
        state = state_of(group)
        state.phase = "prefill"
        return state

    # Without interventions (nothing watches a prefill), rows with the same prompt share
    # one prefill: its KV-cache row is copied to each of them, and kept while more waiting
    # rows have that prompt (N continuations of one prefix, as in resampling, prefill it
    # once instead of N times). With interventions every row runs its own prefill, whose
    # events are the row's own.
    share = not interventions
    unadmitted = Counter(tuple(x) for x in ids)
    kept: Dict[tuple, tuple] = {}  # prompt ids -> (one-row DecodeState, last logits [1, vocab], prefill_s)

    def admit(runs, group, dstate, last):
        """Prefill ``group`` as a left-padded batch of its own (each distinct prompt once
        where rows share prefills) and join it to the running batch."""
        key = {i: tuple(ids[i]) for i in group}
        reuse = list(dict.fromkeys(key[i] for i in group if key[i] in kept)) if share else []
        # rows of prompts to prefill first, then those of kept prompts, by prompt (the
        # batch's row order is free: each row carries its own prompt index, seed, generator)
        group = [i for i in group if key[i] not in reuse] + [i for k in reuse for i in group if key[i] == k]
        fresh = list(dict.fromkeys(key[i] for i in group if key[i] not in reuse)) if share else []
        if share:
            for i in group:
                unadmitted[key[i]] -= 1
        parked = []
        for run in runs:
            take_events(run, active)
            parked.append(run.park())
            run.state = prefill_state(group)
        parts = []  # (DecodeState, last logits, prefill_s per row), in the order of group
        n_fresh = len(group) - sum(key[i] in reuse for i in group)
        if n_fresh:
            prompts_run = [list(k) for k in fresh] if share else [ids[i] for i in group]
            tokens, mask = pad_token_ids(prompts_run, pad_id)
            t0 = time.perf_counter()
            logits, fresh_state = a.prefill(tokens.to(device), mask.to(device), last_only=True)
            fresh_last = logits[:, -1].float()
            _sync(device)
            took = time.perf_counter() - t0
            if share:
                where = {k: u for u, k in enumerate(fresh)}
                for k in fresh:
                    if unadmitted[k] > 0:
                        kept[k] = (a.copy_rows(fresh_state, [where[k]]), fresh_last[where[k]:where[k] + 1], took)
                rows = [where[key[i]] for i in group[:n_fresh]]
                fresh_state, fresh_last = a.keep_rows(fresh_state, rows), fresh_last[rows]
            parts.append((fresh_state, fresh_last, [took] * n_fresh))
        for k in reuse:
            kept_state, kept_last, took = kept[k]
            n = sum(key[i] == k for i in group)
            parts.append((a.copy_rows(kept_state, [0] * n), kept_last.expand(n, -1), [took] * n))
            if unadmitted[k] == 0:
                del kept[k]
        t1 = time.perf_counter()
        for i, took in zip(group, [t for p in parts for t in p[2]]):
            prefill_s[i], started[i] = took, t1
        for run, held in zip(runs, parked):
            take_events(run, group)
            run.join(held)
        active.extend(group)
        for group_state, group_last, _ in parts:
            if dstate is None:
                dstate, last = group_state, group_last
            else:
                dstate, last = a.join(dstate, group_state), torch.cat([last, group_last])
        return dstate, last

    first = next_group()
    # Layers whose pattern no hook reads run the fused kernel, and bridge components no
    # hook watches run as the transformers modules they wrap (both decided per forward).
    with fused_attention(model), bypass_idle_bridges(model), apply_interventions(interventions, model, prefill_state(first)) as runs:
        dstate, last = admit(runs, first, None, None)
        while True:
            if do_sample:
                nxt = torch.stack([_sample(last[b], temperature, top_p, generators[i])
                                   for b, i in enumerate(active)])
            else:
                nxt = last.argmax(dim=-1)
            nxt_list = nxt.tolist()
            for b, i in enumerate(active):
                if done[i]:
                    continue
                outputs[i].append(nxt_list[b])
                if nxt_list[b] in eos:
                    done[i], reasons[i] = True, "eos"
                elif stop:
                    # Only the end of the text can complete a stop string.
                    tail = decode(tok, outputs[i][-(longest_stop + 8):])
                    if any(x in tail for x in stop):
                        text = decode(tok, outputs[i])
                        done[i], reasons[i] = True, "stop"
                        cut[i] = min(text.find(x) for x in stop if x in text)
                done[i] = done[i] or len(outputs[i]) == budgets[i]
                if done[i]:
                    _sync(device)
                    finished[i] = time.perf_counter()
            # A finished row leaves at once; with static_batch, rows leave together
            # when the last one finishes (the others keep running, their tokens ignored).
            all_done = all(done[i] for i in active)
            leaving = all_done or (reshape and any(done[i] for i in active))
            changed = False
            if leaving:
                keep = [b for b, i in enumerate(active) if not done[i]]
                for run in runs:
                    take_events(run, active)
                left = [i for i in active if done[i]]
                for i in left:
                    trackers.pop(i, None)
                    generators.pop(i, None)
                active[:] = [active[b] for b in keep]
                nxt_list = [nxt_list[b] for b in keep]
                width_before = dstate.attention_mask.shape[1]
                if keep:
                    dstate = a.keep_rows(dstate, keep)
                    nxt, last = nxt[keep], last[keep]
                for run in runs:
                    run.keep_rows(keep, width_before - dstate.attention_mask.shape[1])
                for i in left:
                    finish(i)
                changed = True
            if not active:
                if not waiting:
                    break
                dstate, last = admit(runs, next_group(), None, None)
                continue
            if interventions:
                rebuilt = [trackers[i].push(t) for i, t in zip(active, nxt_list)]
                # (a prefill state is that of the rows just prefilled, maybe not the whole batch)
                if changed or any(rebuilt) or runs[0].state.phase == "prefill":
                    state = state_of(active)
                else:
                    code, sid, cur, new = zip(*[trackers[i].column() for i in active])
                    state = runs[0].state.appended(torch.tensor(code), torch.tensor(sid), torch.tensor(cur),
                                                   torch.tensor(new))
                for run in runs:
                    run.state = state
            logits, dstate = a.decode(dstate, nxt[:, None])
            last = logits[:, -1].float()
            if reshape and waiting and len(active) < width:
                dstate, last = admit(runs, next_group(), dstate, last)
        for run in runs:
            take_events(run, active)
    return results


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so the timings are wall times of finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
