"""Reasoning traces: the rendered text, its tokens, and the steps they belong to.

A trace has three segments -- question, thinking, summary -- and each segment is cut
into steps. Template markup (role headers, ``<think>`` tags, harmony channel markers,
special tokens) belongs to no step. Tokens are mapped to steps through the character
offsets of ONE tokenisation of the full text; pieces are never re-tokenised.

Ownership rule (see docs/traces.md for worked examples): a token belongs to the step
that holds its first non-whitespace character; a token made only of whitespace belongs
to the step whose *extended span* (from its first non-whitespace character to the next
step of the same segment, or the segment end, minus markup) holds it, i.e. to the step
before it, and to no step (-1) before a segment's first step; markup belongs to no step.
A step that ends up with no token is merged into the preceding step of its segment
(or the following one when it is the first), with a :class:`TraceWarning`.

The rules are those of the rule engine `stepflow_tl.traces.formats.StepParser`: a
trace is that parser run over its finished output, and
`stepflow_tl.traces.tracker.StepTracker` is the same parser fed token by token, so
both give the same steps by construction.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Int

from ..checks import check_int
from ..errors import StepflowError, TraceError
from ..tl.adapter import ModelOrTokenizer, Tokenizer, tokenizer_of
from .formats import (
    FORMAT_CHOICES,
    SUMMARY_MARKERS,
    THINK_CLOSE,
    THINK_OPEN,
    Question,
    SplitSpec,
    StepParser,
    _find_question,
    _render_prompt,
    conversation,
    decode_with_offsets,
    detect_format,
    format_for_parts,
    incomplete_warning,
    prompt_for_output,
    question_labels,
    render_output,
    resolve_split,
    special_strings,
    token_labels,
    token_starts,
)
from .pooling import check_token_steps
from .records import read_json_records

_FINGERPRINT_PROBE = f"Hello world!\n\n{THINK_OPEN} 12345 \u00e9t\u00e9 \u4e16\u754c \u2211 \U0001F600"


class TraceWarning(UserWarning):
    """A trace was segmented with a fallback (cut-off thinking, merged empty step)."""


@dataclass(frozen=True)
class Step:
    """One step. ``char_span`` indexes ``Trace.text``; ``token_span`` is the half-open
    hull of the step's tokens in ``Trace.token_ids``."""

    index: int
    kind: str
    text: str
    char_span: Tuple[int, int]
    token_span: Tuple[int, int]


def tokenizer_fingerprint(model_or_tok: ModelOrTokenizer) -> str:
    """Short hash of the vocabulary size and the ids of a probe string."""
    return _fingerprint(tokenizer_of(model_or_tok))


def _fingerprint(tok: Tokenizer) -> str:
    ids = tok.encode(_FINGERPRINT_PROBE, add_special_tokens=False)
    return hashlib.sha256(f"{len(tok)}|{list(ids)}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the trace


@dataclass
class Trace:
    """A tokenised trace with steps.

    ``token_ids`` and ``token_steps`` are LongTensors ``[pos]``; ``token_steps[t]`` is
    the index of the step token ``t`` belongs to, -1 for markup.
    """

    text: str
    token_ids: Int[torch.Tensor, "pos"]
    token_steps: Int[torch.Tensor, "pos"]
    steps: List[Step]
    format: str
    complete: bool
    tokenizer_fingerprint: str
    meta: Dict[str, Any] = field(default_factory=dict)
    token_offsets: Optional[Int[torch.Tensor, "pos 2"]] = None  # character span of each token in text

    def __post_init__(self):
        # A hand-built or edited trace fails here, naming the field, not as an
        # IndexError or a shape mismatch deep inside a forward pass.
        ids = self.token_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TraceError(f"token_ids must be a 1-d integer tensor, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        if ids.numel() and int(ids.min()) < 0:
            raise TraceError(f"token_ids holds the negative id {int(ids.min())}; token ids are >= 0")
        steps = self.token_steps
        if not isinstance(steps, torch.Tensor) or tuple(steps.shape) != tuple(ids.shape):
            raise TraceError(f"token_steps must have one step index per token ({ids.shape[0]}), got shape "
                             f"{tuple(getattr(steps, 'shape', ()))}")
        try:
            check_token_steps(steps, len(self.steps))
        except StepflowError as e:
            raise TraceError(str(e)) from None

    # ---- views
    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def step_kinds(self) -> List[str]:
        return [s.kind for s in self.steps]

    @property
    def step_labels(self) -> List[str]:
        """E.g. ``"T3: First, compute the"``: kind letter, global index, first words."""
        out = []
        for s in self.steps:
            words = " ".join(s.text.split())
            if len(words) > 20:
                cut = words[:21].rfind(" ")
                words = words[: cut if cut > 0 else 20]
            out.append(f"{s.kind[0].upper()}{s.index}: {words}")
        return out

    def _of_kind(self, kind: str) -> List[int]:
        return [s.index for s in self.steps if s.kind == kind]

    @property
    def question_steps(self) -> List[int]:
        return self._of_kind("question")

    @property
    def thinking_steps(self) -> List[int]:
        return self._of_kind("thinking")

    @property
    def summary_steps(self) -> List[int]:
        return self._of_kind("summary")

    def positions(self, kind: str) -> List[int]:
        """Token positions of all steps of ``kind``."""
        idx = set(self._of_kind(kind))
        return [t for t, s in enumerate(self.token_steps.tolist()) if s in idx]

    def check_tokenizer(self, model_or_tok) -> None:
        """Raise :class:`TraceError` if ``model_or_tok`` tokenises differently, or if a
        token id lies outside its vocabulary (an edited ``token_ids``)."""
        fp = tokenizer_fingerprint(model_or_tok)
        if fp != self.tokenizer_fingerprint:
            raise TraceError(
                f"this trace was tokenised by another tokenizer (fingerprint {self.tokenizer_fingerprint}, "
                f"the given one has {fp}); rebuild it with Trace.from_text/from_parts for this model"
            )
        tok = tokenizer_of(model_or_tok)
        if self.n_tokens and int(self.token_ids.max()) >= len(tok):
            _check_vocabulary(self.token_ids.tolist(), tok, "trace.token_ids")

    # ---- serialisation
    def to_dict(self) -> Dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids.tolist(),
            "token_steps": self.token_steps.tolist(),
            "steps": [
                {"index": s.index, "kind": s.kind, "text": s.text, "char_span": list(s.char_span),
                 "token_span": list(s.token_span)}
                for s in self.steps
            ],
            "format": self.format,
            "complete": self.complete,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "meta": self.meta,
            "token_offsets": None if self.token_offsets is None else self.token_offsets.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Trace":
        try:
            steps = [
                Step(int(s["index"]), s["kind"], s["text"], tuple(s["char_span"]), tuple(s["token_span"]))
                for s in d["steps"]
            ]
            return cls(
                text=d["text"],
                token_ids=torch.tensor(d["token_ids"], dtype=torch.long),
                token_steps=torch.tensor(d["token_steps"], dtype=torch.long),
                steps=steps,
                format=d["format"],
                complete=bool(d["complete"]),
                tokenizer_fingerprint=d["tokenizer_fingerprint"],
                meta=dict(d.get("meta", {})),
                token_offsets=(
                    None if d.get("token_offsets") is None
                    else torch.tensor(d["token_offsets"], dtype=torch.long).reshape(-1, 2)
                ),
            )
        except (KeyError, TypeError) as e:
            raise TraceError(f"not a serialised Trace (missing or bad field: {e})") from None

    # ---- constructors
    @classmethod
    def from_text(
        cls,
        model_or_tok,
        prompt_text: str,
        output_text: str,
        format: str = "auto",
        *,
        question: Optional[str] = None,
        split: SplitSpec = "blank_lines",
        split_summary: bool = False,
        allow_no_thinking: bool = False,
        max_tokens: Optional[int] = None,
        truncate: bool = False,
        meta: Optional[Dict[str, Any]] = None,
    ) -> "Trace":
        """Segment ``prompt_text + output_text``.

        ``prompt_text`` is the rendered prompt (chat template incl. generation prompt);
        the question is the last user message in it (or the last occurrence of
        ``question``). ``output_text`` is what the model generated. ``max_tokens``
        defaults to the model's ``n_ctx`` when a model is passed (no limit for a bare
        tokenizer); longer texts raise unless ``truncate=True``.
        """
        tok, max_tokens = _resolve(model_or_tok, max_tokens)
        return cls._from_text(tok, prompt_text, output_text, format, question=question, split=split,
                              split_summary=split_summary, allow_no_thinking=allow_no_thinking,
                              max_tokens=max_tokens, truncate=truncate, meta=meta)

    @classmethod
    def _from_text(cls, tok: Tokenizer, prompt_text: str, output_text: str, format: str = "auto", *,
                   question: Optional[str] = None, split: SplitSpec = "blank_lines", split_summary: bool = False,
                   allow_no_thinking: bool = False, max_tokens: Optional[int] = None, truncate: bool = False,
                   meta: Optional[Dict[str, Any]] = None) -> "Trace":
        """`from_text` for a resolved tokenizer and token limit (see `_resolve`)."""
        _check_str(prompt_text, "prompt_text")
        _check_str(output_text, "output_text")
        enc = tok(prompt_text + output_text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return cls._segment(tok, prompt_text, output_text, list(enc["input_ids"]),
                            [(int(x), int(y)) for x, y in enc["offset_mapping"]], format, question=question,
                            split=split, split_summary=split_summary, allow_no_thinking=allow_no_thinking,
                            max_tokens=max_tokens, truncate=truncate, meta=meta)

    @classmethod
    def from_ids(
        cls,
        model_or_tok,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        format: str = "auto",
        *,
        question: Optional[str] = None,
        split: SplitSpec = "blank_lines",
        split_summary: bool = False,
        allow_no_thinking: bool = False,
        max_tokens: Optional[int] = None,
        truncate: bool = False,
        meta: Optional[Dict[str, Any]] = None,
    ) -> "Trace":
        """The trace of exactly ``prompt_ids + output_ids`` (e.g. what a model generated).

        Nothing is re-tokenised: ``token_ids`` are the given ids, ``text`` is their
        decoding (special tokens kept) and each token's character span comes from
        decoding the ids one at a time (`formats.decode_with_offsets`). The prompt text
        is the text before the first output token; the rest is the output, segmented as
        in :meth:`from_text` (same options). A tokenizer may decode a non-canonical
        tokenisation to a text that it would tokenise differently; the trace still holds
        the given ids.
        """
        tok, max_tokens = _resolve(model_or_tok, max_tokens)
        prompt_ids = _check_ids(prompt_ids, "prompt_ids")
        if not prompt_ids:
            raise TraceError("prompt_ids is empty; the prompt must hold the question")
        output_ids = _check_ids(output_ids, "output_ids")
        _check_vocabulary(prompt_ids, tok, "prompt_ids")
        _check_vocabulary(output_ids, tok, "output_ids")
        ids = prompt_ids + output_ids
        text, offsets = decode_with_offsets(tok, ids)
        boundary = offsets[len(prompt_ids)][0] if len(ids) > len(prompt_ids) else len(text)
        return cls._segment(tok, text[:boundary], text[boundary:], ids, offsets, format,
                            question=question, split=split, split_summary=split_summary,
                            allow_no_thinking=allow_no_thinking, max_tokens=max_tokens, truncate=truncate,
                            meta=meta)

    @classmethod
    def _segment(cls, tok: Tokenizer, prompt_text, output_text, ids, offsets, format, *, question, split,
                 split_summary, allow_no_thinking, max_tokens, truncate, meta) -> "Trace":
        """Segment ``prompt_text + output_text`` whose tokens are ``ids`` with character
        ``offsets`` into that text."""
        if format not in FORMAT_CHOICES:
            raise TraceError(f"format must be one of {FORMAT_CHOICES}, got {format!r}")
        fmt = detect_format(prompt_text, output_text) if format == "auto" else format
        split = resolve_split(split, fmt)
        q0, q1 = _find_question(tok, prompt_text, question)
        off = len(prompt_text)
        starts = token_starts(offsets)
        # The output goes to the rule engine token by token, as `StepTracker` gives it:
        # a callable split is re-run once per piece on the segment so far.
        parser = StepParser(fmt, split, split_summary=split_summary, prompt_text=prompt_text,
                            specials=special_strings(tok))
        done = 0
        for cut in [s - off for s in starts if 0 < s - off < len(output_text)] + [len(output_text)]:
            if cut > done:
                parser.feed(output_text[done:cut])
                done = cut
        warning = None if parser.complete else incomplete_warning(fmt)
        if warning:
            warnings.warn(warning, TraceWarning, stacklevel=3)
        if max_tokens is not None and len(ids) > max_tokens:
            if not truncate:
                raise TraceError(
                    f"the trace has {len(ids)} tokens, more than max_tokens={max_tokens}; pass truncate=True "
                    "to cut it or a larger max_tokens")
        return _build(cls, tok, prompt_text + output_text, ids, starts, offsets, (q0, q1), parser, fmt,
                      allow_no_thinking, max_tokens if truncate else None, dict(meta or {}))

    @classmethod
    def from_parts(
        cls,
        model_or_tok,
        question: Question,
        thinking: str,
        summary: Optional[str] = None,
        format: str = "auto",
        split: SplitSpec = "blank_lines",
        system: Optional[str] = None,
        **kw,
    ) -> "Trace":
        """Render ``question``/``thinking``/``summary`` and segment the result.

        ``question`` is a string or an HF chat conversation (a list of ``{"role",
        "content"}`` dicts ending with the user's question, optionally with a system
        message); a conversation gives the same trace as its last user message with the
        same system message. The prompt is :func:`render_prompt`; the output is
        ``"<think>\\n{thinking}\\n</think>\\n\\n{summary}"`` (r1),
        ``"<|channel|>analysis<|message|>{thinking}<|end|><|start|>assistant<|channel|>final<|message|>{summary}"``
        (harmony) or ``"{thinking}\\n\\nAnswer: {summary}"`` (plain; no ``Answer:`` is
        added when the summary already starts with a marker). Raises TraceError if the
        parts contain markup that would make the rendered text parse differently.
        """
        tok, kw["max_tokens"] = _resolve(model_or_tok, kw.get("max_tokens"))
        _check_str(thinking, "thinking")
        _check_str(summary, "summary", optional=True)
        prompt = _render_prompt(tok, question, system)
        question = conversation(question, system)[1]
        has_summary = summary is not None and summary.strip() != ""
        fmt = format_for_parts(tok, format)
        trace = cls._from_text(tok, prompt, render_output(fmt, thinking, summary), fmt,
                              question=question, split=split, **kw)
        got_thinking = " ".join(trace.step_text("thinking").split())
        if got_thinking != " ".join(thinking.split()) or (has_summary and not trace.summary_steps):
            raise TraceError(
                f"the {fmt} rendering of these parts does not parse back into the same thinking/summary; "
                f"the thinking probably contains markup of the {fmt} format (e.g. '{THINK_CLOSE}' or a "
                f"summary marker {SUMMARY_MARKERS})")
        return trace

    @classmethod
    def from_record(cls, model_or_tok, record: Dict[str, Any], format: str = "auto", system=None, **kw) -> "Trace":
        """A trace from a record with ``question`` and ``output`` (the r1_traces.jsonl
        format); every other key goes to ``meta``. For r1 without an opening
        ``<think>`` in the output, the prompt gets ``"<think>\\n"`` appended, as the
        R1 chat templates do (unless the rendered prompt already ends with it)."""
        tok, kw["max_tokens"] = _resolve(model_or_tok, kw.get("max_tokens"))
        return cls._from_record(tok, record, format, system, **kw)

    @classmethod
    def _from_record(cls, tok: Tokenizer, record: Dict[str, Any], format: str = "auto", system=None,
                     **kw) -> "Trace":
        """`from_record` for a resolved tokenizer and token limit (see `_resolve`)."""
        check_trace_record(record)
        question, output = record["question"], record["output"]
        text = conversation(question, system, name="record['question']")[1]
        prompt = _render_prompt(tok, question, system)
        question = text
        fmt = detect_format(prompt, output) if format == "auto" else format
        prompt = prompt_for_output(fmt, prompt, output)
        meta = {k: v for k, v in record.items() if k not in ("question", "output")}
        return cls._from_text(tok, prompt, output, fmt, question=question, meta=meta, **kw)

    def step_text(self, kind: str) -> str:
        """The texts of all steps of ``kind`` joined by blank lines."""
        return "\n\n".join(s.text for s in self.steps if s.kind == kind)


def _resolve(model_or_tok: ModelOrTokenizer, max_tokens: Optional[int]) -> Tuple[Tokenizer, Optional[int]]:
    """The tokenizer and the token limit of an entry point's ``model_or_tok``, resolved
    once and passed down: ``max_tokens`` if given, else the model's ``n_ctx`` (no limit
    for a bare tokenizer)."""
    tok = tokenizer_of(model_or_tok)
    if max_tokens is None and tok is not model_or_tok:
        max_tokens = int(getattr(getattr(model_or_tok, "cfg", None), "n_ctx", 0) or 0) or None
    elif max_tokens is not None:
        max_tokens = check_int("max_tokens", max_tokens, low=1)
    return tok, max_tokens


def _shown(value) -> str:
    return json.dumps(value, default=str)[:40]


def check_trace_record(record: Any) -> None:
    """Raise :class:`TraceError` naming the field unless ``record`` is a trace record:
    ``question`` a non-empty string or a chat conversation, ``output`` a string, and
    ``correct`` (when present) a JSON boolean or null. A ``"correct": "yes"`` would
    otherwise leave the trace silently out of both the correct and incorrect groups."""
    if not isinstance(record, dict) or "question" not in record or "output" not in record:
        have = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
        raise TraceError(f"a trace record needs 'question' and 'output' keys (it has {have})")
    question, output = record["question"], record["output"]
    if isinstance(question, str):
        if not question.strip():
            raise TraceError("'question' is empty; fill it in or drop the record")
    else:
        conversation(question, None, name="record['question']")  # a conversation, or the error naming what it is
    if not isinstance(output, str):
        raise TraceError(f"'output' is {_shown(output)}, not text; fill it in or drop the record")
    correct = record.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise TraceError(f"'correct' is {_shown(correct)}, not true or false; write a JSON boolean (true/false), "
                         "or null or no 'correct' when the label is unknown")


def read_trace_records(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """The records of a trace file (JSON Lines, or JSON holding a list of records),
    each checked by `check_trace_record`; needs no model, so a command can refuse a bad
    file before it loads one. Raises :class:`TraceError` naming the file and record."""
    p = Path(path)
    if not p.exists():
        raise TraceError(f"trace file not found: {p}")
    records = read_json_records(p, error=TraceError)
    for i, rec in enumerate(records):
        try:
            check_trace_record(rec)
        except TraceError as e:
            raise TraceError(f"{p}, record {i}: {e}") from None
    return records


def _check_str(value, name: str, optional: bool = False) -> None:
    if not (isinstance(value, str) or (optional and value is None)):
        raise TraceError(f"{name} must be a str{' or None' if optional else ''}, got {type(value).__name__}")


def _check_vocabulary(ids: List[int], tok, name: str) -> None:
    """Raise naming ``name`` when an id is not one of ``tok``'s token ids."""
    size = len(tok)
    bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < size]
    if bad:
        i, t = bad[0]
        raise TraceError(f"{name}[{i}] = {t} is not a token id of this tokenizer (its vocabulary is 0..{size - 1}"
                         f"{f'; {len(bad)} ids are outside it' if len(bad) > 1 else ''}); use ids the tokenizer made")


def _check_ids(ids, name: str) -> List[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point:
            raise TraceError(f"{name} must be a 1-d integer tensor or a list of ints, got shape "
                             f"{tuple(ids.shape)} and dtype {ids.dtype}")
        return [int(i) for i in ids.tolist()]
    if isinstance(ids, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TraceError(f"{name} must be a list of ints (token ids), got {type(ids).__name__}")
    return [int(i) for i in ids]


def _build(cls, tok, text, ids, starts, offsets, question_span, parser, fmt, allow_no_thinking, cut, meta):
    """The trace from the character labels of the question and of the parsed output."""
    off = len(text) - len(parser.chars)
    q0, q1 = question_span
    label = question_labels(text[:off], q0, q1)
    if 0 not in label:
        raise TraceError("the question is empty")
    label += [r + 1 if r >= 0 else -1 for r in parser.labels]
    ends = [0] * len(parser.raw_kinds)
    for j, r in enumerate(parser.labels):
        if r >= 0 and not parser.chars[j].isspace():
            ends[r] = j + 1
    first = label.index(0)
    raw: List[List[Any]] = [["question", first, q0 + len(text[q0:q1].rstrip())]]
    raw += [[k, s + off, e + off] for k, s, e in zip(parser.raw_kinds, parser.raw_starts, ends)]
    complete = parser.complete

    if cut is not None and len(ids) > cut:
        cut_char = starts[cut]
        ids, starts, offsets = ids[:cut], starts[:cut], offsets[:cut]
        text = text[:cut_char]
        thinking_end = parser.thinking_end + off if parser.thinking_end >= 0 else 0
        complete = complete and thinking_end <= cut_char
        raw = [[k, c0, c0 + len(text[c0:min(c1, cut_char)].rstrip())] for k, c0, c1 in raw]
        warnings.warn(f"trace truncated to max_tokens={cut} tokens ({cut_char} characters)",
                      TraceWarning, stacklevel=3)

    tok_raw = token_labels(text, starts, label)
    first_tok: Dict[int, int] = {}
    last_tok: Dict[int, int] = {}
    for t, r in enumerate(tok_raw):
        if r >= 0:
            first_tok.setdefault(r, t)
            last_tok[r] = t
    # Steps without tokens: fold their text into a neighbour of the same segment.
    keep = [r for r in range(len(raw)) if r in first_tok]
    for r in range(len(raw)):
        if r in first_tok or raw[r][1] >= len(text):
            continue
        kind = raw[r][0]
        prev = [k for k in keep if k < r and raw[k][0] == kind]
        nxt = [k for k in keep if k > r and raw[k][0] == kind]
        if prev:
            raw[prev[-1]][2] = max(raw[prev[-1]][2], raw[r][2])
        elif nxt:
            raw[nxt[0]][1] = min(raw[nxt[0]][1], raw[r][1])
        warnings.warn(
            f"{kind} step {text[raw[r][1]:raw[r][2]][:40]!r} has no token of its own (no token's first "
            f"non-whitespace character is in it); it was {'merged into the preceding step' if prev else 'merged into the following step' if nxt else 'dropped'}",
            TraceWarning, stacklevel=3)
    final = {r: i for i, r in enumerate(keep)}
    steps = []
    for r in keep:
        kind, c0, c1 = raw[r]
        steps.append(Step(final[r], kind, text[c0:c1], (c0, c1), (first_tok[r], last_tok[r] + 1)))
    if not any(s.kind == "thinking" for s in steps) and not allow_no_thinking:
        if cut is not None and len(ids) == cut and any(k == "thinking" for k, _, _ in raw):
            raise TraceError(f"cut to max_tokens={cut} tokens, the trace keeps none of its thinking (the prompt "
                             "alone takes that many); raise max_tokens")
        raise TraceError("the trace has no thinking step; pass allow_no_thinking=True to accept it")
    if not any(s.kind == "question" for s in steps):
        raise TraceError("the question has no token of its own")
    token_steps = torch.tensor([final.get(r, -1) if r >= 0 else -1 for r in tok_raw], dtype=torch.long)
    return cls(
        text=text,
        token_ids=torch.tensor(ids, dtype=torch.long),
        token_steps=token_steps,
        steps=steps,
        format=fmt,
        complete=complete,
        tokenizer_fingerprint=_fingerprint(tok),
        meta=meta,
        token_offsets=torch.tensor([[int(a), int(b)] for a, b in offsets], dtype=torch.long).reshape(-1, 2),
    )


def load_traces(path, model_or_tok, format: str = "auto", **kw) -> List[Trace]:
    """Traces from a JSONL file (one record a line) or a JSON file (a list of records)
    with ``question`` and ``output``; other keys (``correct``, ``gold``, ``model``,
    ``source``, ...) go to ``Trace.meta``. ``kw`` goes to :meth:`Trace.from_text`."""
    p = Path(path)
    records = read_trace_records(p)
    tok, kw["max_tokens"] = _resolve(model_or_tok, kw.get("max_tokens"))
    out = []
    for i, rec in enumerate(records):
        try:
            t = Trace._from_record(tok, rec, format=format, **kw)
        except TraceError as e:
            raise TraceError(f"{p}, record {i}: {e}") from None
        t.meta.setdefault("record_index", i)
        out.append(t)
    return out
