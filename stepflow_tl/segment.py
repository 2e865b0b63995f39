"""Reasoning traces: the rendered text, its tokens, and the steps they belong to.

A trace has three segments -- question, thinking, summary -- and each segment is cut
into steps. Template markup (role headers, ``<think>`` tags, harmony channel markers,
special tokens) belongs to no step. Tokens are mapped to steps through the character
offsets of ONE tokenisation of the full text; pieces are never re-tokenised.

Alignment rule (see docs/traces.md for a worked example): a step's *extended span*
runs from its first non-whitespace character to the first character of the next step
in the same segment (or the segment end), minus markup; a token belongs to the step
whose extended span holds the token's FIRST character, and to no step (-1) otherwise.
A step that ends up with no token is merged into the preceding step of its segment
(or the following one when it is the first), with a :class:`TraceWarning`.

``stepflow_tl.tracker.StepTracker`` reproduces this segmentation online, token by
token; the rules below (``format_markers``, ``split_*``) are shared by both.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .backend import tokenizer_of
from .errors import TraceError
from .records import read_json_records

KINDS = ("question", "thinking", "summary")
FORMATS = ("r1", "harmony", "plain")
SPLITS = ("blank_lines", "sentences")

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
HARMONY_END_TAGS = ("<|end|>", "<|return|>", "<|call|>")
HARMONY_HEAD_TAGS = ("<|start|>", "<|channel|>")
HARMONY_MESSAGE = "<|message|>"
HARMONY_TAGS = HARMONY_END_TAGS + HARMONY_HEAD_TAGS + (HARMONY_MESSAGE, "<|constrain|>")
_HARMONY_TAG_RE = re.compile("|".join(re.escape(t) for t in HARMONY_TAGS))
_HARMONY_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([^\s<]*)")
# Summary markers for the plain format, matched case-insensitively; the summary starts
# at the first non-whitespace character of the line that holds the first marker.
SUMMARY_MARKERS = ("final answer", "answer:", "\\boxed{")
_MARKER_RE = re.compile("|".join(re.escape(m) for m in SUMMARY_MARKERS), re.IGNORECASE)
# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) when
# whitespace follows; a blank line also ends a sentence.
SENTENCE_END = ".!?"
SENTENCE_CLOSERS = "\"')]"
_SENTENCE_END_RE = re.compile(r"[.!?][\"')\]]*$")
_BLANK_LINE_RE = re.compile(r"\n\s*\n")
_PLAIN_QUESTION_PREFIX = "Question:\n"
_FINGERPRINT_PROBE = "Hello world!\n\n<think> 12345 \u00e9t\u00e9 \u4e16\u754c \u2211 \U0001F600"

SplitSpec = Union[str, Callable[[str], Sequence[Tuple[int, int]]]]


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


def tokenizer_fingerprint(model_or_tok) -> str:
    """Short hash of the vocabulary size and the ids of a probe string."""
    tok = tokenizer_of(model_or_tok)
    ids = tok.encode(_FINGERPRINT_PROBE, add_special_tokens=False)
    return hashlib.sha256(f"{len(tok)}|{list(ids)}".encode()).hexdigest()[:16]


def special_strings(tok) -> List[str]:
    """Texts of the tokenizer's special tokens: markup wherever they appear in output."""
    out = set()
    for s in getattr(tok, "all_special_tokens", []) or []:
        if isinstance(s, str) and len(s) >= 2 and not s.isspace():
            out.add(s)
    return sorted(out - {THINK_OPEN, THINK_CLOSE} - set(HARMONY_TAGS), key=len, reverse=True)


def decode(tok, ids) -> str:
    """Decode keeping special tokens and spacing exactly (what offsets refer to)."""
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------- prompt rendering


def render_prompt(model_or_tok, question: str, system: Optional[str] = None) -> str:
    """The prompt for ``question`` with the generation prompt appended.

    Uses the tokenizer's chat template; without one, falls back to
    ``"Question:\\n{question}\\n\\n"`` (a newline, not a space, after the colon so the
    question's first word starts a token of its own).
    """
    tok = tokenizer_of(model_or_tok)
    if not getattr(tok, "chat_template", None):
        prefix = f"{system}\n\n" if system else ""
        return f"{prefix}{_PLAIN_QUESTION_PREFIX}{question}\n\n"
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def find_question(model_or_tok, prompt_text: str, question: Optional[str] = None) -> Tuple[int, int]:
    """Character span of the (last) user message inside a rendered prompt.

    With ``question`` given, its last occurrence. Otherwise the template is rendered
    around a sentinel and the longest pieces of the text before/after the sentinel
    that occur in ``prompt_text`` delimit the question.
    """
    if question is not None:
        i = prompt_text.rfind(question)
        if i < 0 or not question.strip():
            raise TraceError(f"question text not found in the prompt (question={question[:60]!r})")
        return i, i + len(question)
    sentinel = "QQSTEPFLOWSENTINELQQ"
    rendered = render_prompt(model_or_tok, sentinel)
    k = rendered.index(sentinel)
    before, after = rendered[:k], rendered[k + len(sentinel):]
    start = None
    for n in range(len(before), 0, -1):
        j = prompt_text.rfind(before[-n:])
        if j >= 0 and (n >= 3 or n == len(before)):
            start = j + n
            break
    if start is None:
        raise TraceError("cannot locate the question in the prompt; pass question=...")
    end = None
    for n in range(len(after), 0, -1):
        j = prompt_text.find(after[:n], start)
        if j >= 0 and (n >= 3 or n == len(after)):
            end = j
            break
    if end is None:
        end = len(prompt_text) if not after else None
    if end is None or not prompt_text[start:end].strip():
        raise TraceError("cannot locate the question in the prompt; pass question=...")
    return start, end


# ---------------------------------------------------------------- output parsing


def detect_format(prompt_text: str, output_text: str) -> str:
    """``harmony`` if channel tags appear, ``r1`` if think tags appear (or the prompt
    ends with ``<think>``), ``plain`` if a summary marker appears, else ``r1``."""
    if "<|channel|>" in output_text or prompt_text.rstrip().endswith(HARMONY_MESSAGE):
        return "harmony"
    if THINK_CLOSE in output_text or THINK_OPEN in output_text or prompt_text.rstrip().endswith(THINK_OPEN):
        return "r1"
    if _MARKER_RE.search(output_text):
        return "plain"
    return "r1"


def harmony_initial_mode(prompt_text: str) -> str:
    """Where harmony output starts: inside a message if the prompt ends with
    ``<|message|>`` (channel from the prompt's last header), else in a header."""
    if not prompt_text.endswith(HARMONY_MESSAGE):
        return "header"
    head = prompt_text[: -len(HARMONY_MESSAGE)]
    return _harmony_channel_mode(head[max(head.rfind("<|start|>"), head.rfind("<|end|>"), 0):])


def _harmony_channel_mode(header: str) -> str:
    found = _HARMONY_CHANNEL_RE.findall(header)
    channel = found[-1] if found else "analysis"
    return {"analysis": "thinking", "final": "summary"}.get(channel, "skip")


def parse_output(output: str, fmt: str, prompt_text: str, specials: Sequence[str]):
    """Segments of the output: ``(list of (kind, start, end), markup ranges, complete)``,
    in output coordinates."""
    segments: List[Tuple[str, int, int]] = []
    markup: List[Tuple[int, int]] = []
    if fmt == "r1":
        t0 = 0
        m = re.match(r"\s*" + re.escape(THINK_OPEN), output)
        if m:
            t0 = m.end()
            markup.append((m.end() - len(THINK_OPEN), m.end()))
        close = output.find(THINK_CLOSE, t0)
        complete = close >= 0
        if complete:
            segments += [("thinking", t0, close), ("summary", close + len(THINK_CLOSE), len(output))]
            markup.append((close, close + len(THINK_CLOSE)))
        else:
            segments.append(("thinking", t0, len(output)))
    elif fmt == "plain":
        m = _MARKER_RE.search(output)
        complete = m is not None
        if m:
            line = output.rfind("\n", 0, m.start()) + 1
            s = line + len(output[line:m.start()]) - len(output[line:m.start()].lstrip())
            segments += [("thinking", 0, s), ("summary", s, len(output))]
        else:
            segments.append(("thinking", 0, len(output)))
    elif fmt == "harmony":
        mode = harmony_initial_mode(prompt_text)
        pos = 0
        closed = False
        for m in _HARMONY_TAG_RE.finditer(output):
            tag = m.group()
            if mode == "header":
                if tag == HARMONY_MESSAGE:
                    mode = _harmony_channel_mode(output[pos:m.start()])
                    markup.append((pos, m.end()))
                    pos = m.end()
                continue
            # content mode: the text since pos is a message (or skipped channel) body
            if mode in ("thinking", "summary"):
                segments.append((mode, pos, m.start()))
            else:
                markup.append((pos, m.start()))
            if tag in HARMONY_END_TAGS or tag in HARMONY_HEAD_TAGS:
                closed = closed or mode == "thinking"
                mode, pos = "header", m.start()
            else:
                markup.append((m.start(), m.end()))
                pos = m.end()
        if mode in ("thinking", "summary"):
            segments.append((mode, pos, len(output)))
        else:
            markup.append((pos, len(output)))
        complete = closed or any(k == "summary" for k, _, _ in segments)
    else:
        raise TraceError(f"format must be one of {FORMATS} or 'auto', got {fmt!r}")
    for s in specials:
        for m in re.finditer(re.escape(s), output):
            markup.append((m.start(), m.end()))
    return segments, [r for r in markup if r[1] > r[0]], complete


# ---------------------------------------------------------------- step splitting


def _check_split(split: SplitSpec) -> None:
    if not callable(split) and split not in SPLITS:
        raise TraceError(f"split must be one of {SPLITS} or a callable (text) -> [(start, end)], got {split!r}")


def step_starts(content: str, split: SplitSpec) -> List[int]:
    """Positions in ``content`` where steps start (first non-whitespace char of each)."""
    if split == "blank_lines":
        out = []
        pos = 0
        for m in list(_BLANK_LINE_RE.finditer(content)) + [None]:
            end = m.start() if m else len(content)
            piece = content[pos:end]
            stripped = piece.lstrip()
            if stripped:
                out.append(pos + len(piece) - len(stripped))
            pos = m.end() if m else pos
        return out
    if split == "sentences":
        out = []
        prev = None
        for m in re.finditer(r"\S+", content):
            if prev is None:
                out.append(m.start())
            else:
                gap = content[prev.end():m.start()]
                if gap.count("\n") >= 2 or _SENTENCE_END_RE.search(prev.group()):
                    out.append(m.start())
            prev = m
        return out
    _check_split(split)
    spans = list(split(content))
    out = []
    last_end = 0
    for span in spans:
        try:
            s, e = int(span[0]), int(span[1])
        except (TypeError, ValueError, IndexError):
            raise TraceError(f"split callable must return (start, end) pairs, got {span!r}") from None
        if not (last_end <= s <= e <= len(content)):
            raise TraceError(
                f"split callable returned span {(s, e)} that is out of order, overlapping or outside "
                f"the text of length {len(content)}; spans must be sorted and disjoint"
            )
        last_end = e
        piece = content[s:e]
        if piece.strip():
            out.append(s + len(piece) - len(piece.lstrip()))
    return out


# ---------------------------------------------------------------- the trace


@dataclass
class Trace:
    """A tokenised trace with steps.

    ``token_ids`` and ``token_steps`` are LongTensors ``[pos]``; ``token_steps[t]`` is
    the index of the step token ``t`` belongs to, -1 for markup.
    """

    text: str
    token_ids: torch.Tensor
    token_steps: torch.Tensor
    steps: List[Step]
    format: str
    complete: bool
    tokenizer_fingerprint: str
    meta: Dict[str, Any] = field(default_factory=dict)
    token_offsets: Optional[torch.Tensor] = None  # [pos, 2] character span of each token in text

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
        """Raise :class:`TraceError` if ``model_or_tok`` tokenises differently."""
        fp = tokenizer_fingerprint(model_or_tok)
        if fp != self.tokenizer_fingerprint:
            raise TraceError(
                f"this trace was tokenised by another tokenizer (fingerprint {self.tokenizer_fingerprint}, "
                f"the given one has {fp}); rebuild it with Trace.from_text/from_parts for this model"
            )

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
        tok = tokenizer_of(model_or_tok)
        _check_split(split)
        if not isinstance(prompt_text, str) or not isinstance(output_text, str):
            raise TraceError("prompt_text and output_text must be strings")
        fmt = detect_format(prompt_text, output_text) if format == "auto" else format
        if fmt not in FORMATS:
            raise TraceError(f"format must be one of {FORMATS} or 'auto', got {format!r}")
        if max_tokens is None and tok is not model_or_tok:
            cfg = getattr(model_or_tok, "cfg", None)
            max_tokens = int(getattr(cfg, "n_ctx", 0) or 0) or None
        text = prompt_text + output_text
        q0, q1 = find_question(tok, prompt_text, question)
        off = len(prompt_text)
        segs, markup, complete = parse_output(output_text, fmt, prompt_text, special_strings(tok))
        if fmt == "r1" and not complete:
            warnings.warn(
                "no '</think>' in the output: the thinking was cut off; all output is thinking, "
                "there is no summary and complete=False", TraceWarning, stacklevel=2)
        elif fmt == "plain" and not complete:
            warnings.warn(
                f"no summary marker {SUMMARY_MARKERS} in the output: all output is thinking, complete=False",
                TraceWarning, stacklevel=2)
        segments = [("question", q0, q1)] + [(k, s + off, e + off) for k, s, e in segs]
        markup = [(s + off, e + off) for s, e in markup]

        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        if max_tokens is not None and len(ids) > max_tokens:
            if not truncate:
                raise TraceError(
                    f"the trace has {len(ids)} tokens, more than max_tokens={max_tokens} (the model's "
                    f"context); pass truncate=True to cut it or a larger max_tokens")
        starts = token_starts(offsets)
        return _build(cls, tok, text, ids, starts, offsets, segments, markup, fmt, complete, split,
                      split_summary, allow_no_thinking, max_tokens if truncate else None, dict(meta or {}))

    @classmethod
    def from_parts(
        cls,
        model_or_tok,
        question: str,
        thinking: str,
        summary: Optional[str] = None,
        format: str = "r1",
        split: SplitSpec = "blank_lines",
        system: Optional[str] = None,
        **kw,
    ) -> "Trace":
        """Render ``question``/``thinking``/``summary`` and segment the result.

        The prompt is :func:`render_prompt`; the output is
        ``"<think>\\n{thinking}\\n</think>\\n\\n{summary}"`` (r1),
        ``"<|channel|>analysis<|message|>{thinking}<|end|><|start|>assistant<|channel|>final<|message|>{summary}"``
        (harmony) or ``"{thinking}\\n\\nAnswer: {summary}"`` (plain; no ``Answer:`` is
        added when the summary already starts with a marker). Raises TraceError if the
        parts contain markup that would make the rendered text parse differently.
        """
        tok = tokenizer_of(model_or_tok)
        prompt = render_prompt(tok, question, system)
        has_summary = summary is not None and summary.strip() != ""
        if format == "r1":
            out = f"{THINK_OPEN}\n{thinking}\n{THINK_CLOSE}" + (f"\n\n{summary}" if has_summary else "")
        elif format == "harmony":
            out = f"<|channel|>analysis<|message|>{thinking}<|end|>"
            if has_summary:
                out += f"<|start|>assistant<|channel|>final<|message|>{summary}"
        elif format == "plain":
            out = thinking
            if has_summary:
                s = summary.lstrip()
                lead = "" if _MARKER_RE.match(s) else "Answer: "
                out += f"\n\n{lead}{s}"
        else:
            raise TraceError(f"format must be one of {FORMATS}, got {format!r}")
        trace = cls.from_text(model_or_tok, prompt, out, format,
                              question=question, split=split, **kw)
        got_thinking = " ".join(trace.step_text("thinking").split())
        if got_thinking != " ".join(thinking.split()) or (has_summary and not trace.summary_steps):
            raise TraceError(
                f"the {format} rendering of these parts does not parse back into the same thinking/summary; "
                f"the thinking probably contains markup of the {format} format (e.g. '</think>' or a "
                f"summary marker {SUMMARY_MARKERS})")
        return trace

    @classmethod
    def from_record(cls, model_or_tok, record: Dict[str, Any], format: str = "r1", system=None, **kw) -> "Trace":
        """A trace from a record with ``question`` and ``output`` (the r1_traces.jsonl
        format); every other key goes to ``meta``. For r1 without an opening
        ``<think>`` in the output, the prompt gets ``"<think>\\n"`` appended, as the
        R1 chat templates do."""
        if not isinstance(record, dict) or "question" not in record or "output" not in record:
            raise TraceError("a trace record needs 'question' and 'output' keys")
        tok = tokenizer_of(model_or_tok)
        question, output = record["question"], record["output"]
        prompt = render_prompt(tok, question, system)
        fmt = detect_format(prompt, output) if format == "auto" else format
        if fmt == "r1" and not re.match(r"\s*" + re.escape(THINK_OPEN), output):
            prompt += THINK_OPEN + "\n"
        meta = {k: v for k, v in record.items() if k not in ("question", "output")}
        return cls.from_text(model_or_tok, prompt, output, fmt, question=question, meta=meta, **kw)

    def step_text(self, kind: str) -> str:
        """The texts of all steps of ``kind`` joined by blank lines."""
        return "\n\n".join(s.text for s in self.steps if s.kind == kind)


def token_starts(offsets) -> List[int]:
    """First character of each token: its offset start, or the previous token's end if
    that is earlier (tokenizers that trim leading spaces from offsets)."""
    starts = []
    prev_end = 0
    for s, e in offsets:
        starts.append(min(int(s), prev_end) if starts else int(s))
        prev_end = max(int(e), prev_end)
    return starts


def _build(cls, tok, text, ids, starts, offsets, segments, markup, fmt, complete, split, split_summary,
           allow_no_thinking, cut, meta):
    n_chars = len(text)
    is_markup = bytearray(n_chars)
    for s, e in markup:
        is_markup[s:e] = b"\x01" * (e - s)
    label = [-1] * n_chars  # raw step id per character
    raw: List[List[Any]] = []  # [kind, start char, end char]
    for kind, s, e in segments:
        idx = [j for j in range(s, e) if not is_markup[j]]
        content = "".join(text[j] for j in idx)
        if kind == "question" or (kind == "summary" and not split_summary):
            stripped = content.lstrip()
            starts_c = [len(content) - len(stripped)] if stripped else []
        else:
            starts_c = step_starts(content, split)
        for k, c0 in enumerate(starts_c):
            c1 = starts_c[k + 1] if k + 1 < len(starts_c) else len(content)
            rid = len(raw)
            for j in idx[c0:c1]:
                label[j] = rid
            last = c0 + len(content[c0:c1].rstrip()) - 1
            raw.append([kind, idx[c0], idx[last] + 1])
        if kind == "question" and not starts_c:
            raise TraceError("the question is empty")

    if cut is not None and len(ids) > cut:
        cut_char = starts[cut]
        ids, starts, offsets = ids[:cut], starts[:cut], offsets[:cut]
        text = text[:cut_char]
        thinking_end = max((e for k, _, e in segments if k == "thinking"), default=0)
        complete = complete and thinking_end <= cut_char
        raw = [[k, c0, c0 + len(text[c0:min(c1, cut_char)].rstrip())] for k, c0, c1 in raw]
        warnings.warn(f"trace truncated to max_tokens={cut} tokens ({cut_char} characters)",
                      TraceWarning, stacklevel=3)

    tok_raw = [label[s] if s < len(label) else -1 for s in starts]
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
            f"{kind} step {text[raw[r][1]:raw[r][2]][:40]!r} has no token of its own (no token starts "
            f"inside it); it was {'merged into the preceding step' if prev else 'merged into the following step' if nxt else 'dropped'}",
            TraceWarning, stacklevel=3)
    final = {r: i for i, r in enumerate(keep)}
    steps = []
    for r in keep:
        kind, c0, c1 = raw[r]
        steps.append(Step(final[r], kind, text[c0:c1], (c0, c1), (first_tok[r], last_tok[r] + 1)))
    if not any(s.kind == "thinking" for s in steps) and not allow_no_thinking:
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
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        meta=meta,
        token_offsets=torch.tensor([[int(a), int(b)] for a, b in offsets], dtype=torch.long).reshape(-1, 2),
    )


def load_traces(path, model_or_tok, format: str = "r1", **kw) -> List[Trace]:
    """Traces from a JSONL file (one record a line) or a JSON file (a list of records)
    with ``question`` and ``output``; other keys (``correct``, ``gold``, ``model``,
    ``source``, ...) go to ``Trace.meta``. ``kw`` goes to :meth:`Trace.from_text`."""
    p = Path(path)
    if not p.exists():
        raise TraceError(f"trace file not found: {p}")
    records = read_json_records(p, error=TraceError)
    out = []
    for i, rec in enumerate(records):
        try:
            t = Trace.from_record(model_or_tok, rec, format=format, **kw)
        except TraceError as e:
            raise TraceError(f"{p}, record {i}: {e}") from None
        t.meta.setdefault("record_index", i)
        out.append(t)
    return out
