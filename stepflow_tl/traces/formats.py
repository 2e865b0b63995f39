"""The rule engine of steps: every convention of the trace formats, once.

The format names and their ``"auto"`` rules, the markup tags (``<think>``/``</think>``,
harmony's channel tags), the plain format's summary markers, the step kinds, the
splits and their ``"auto"``, the question step and the token -> step ownership rule;
`StepParser` applies them incrementally, one character at a time. Also how a prompt
is rendered, where the question sits in it, how ids decode with offsets, and where the
stated answer sits in a summary.

`stepflow_tl.traces.trace.Trace` runs a `StepParser` over a finished output and
`stepflow_tl.traces.tracker.StepTracker` over a growing one, so offline and online
segmentation agree by construction; adding a format or a split touches this module
only (tests/test_layout.py checks that no other module defines a rule).
`stepflow_tl.study.grading` and the ``loss="answer"`` of Step-Saliency read answers
with the helpers at the end.
"""

from __future__ import annotations

import operator
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import StepflowError, TraceError
from ..tl.adapter import Tokenizer, tokenizer_of

STEP_KINDS = ("question", "thinking", "summary")
FORMATS = ("r1", "harmony", "plain")
# What a caller may pass: a format or "auto" (see `detect_format` and `resolve_format`).
FORMAT_CHOICES = ("auto",) + FORMATS
SPLITS = ("blank_lines", "lines", "sentences", "sentences_min15")
# "sentences_min15": the authors' convention (issue 25): a sentence under this many
# characters does not end a step; it joins the sentence after it.
SHORT_SENTENCE_CHARS = 15
# split="auto": the split that gives each format's traces real steps. Reasoning models
# (r1, harmony) write paragraphs separated by blank lines; models without a thinking
# format (plain) tend to write one step per line ("1. ...\n2. ...", SmolLM2).
AUTO_SPLIT = {"r1": "blank_lines", "harmony": "blank_lines", "plain": "lines"}
SPLIT_CHOICES = ("auto",) + SPLITS

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
HARMONY_END_TAGS = ("<|end|>", "<|return|>", "<|call|>")
HARMONY_HEAD_TAGS = ("<|start|>", "<|channel|>")
HARMONY_MESSAGE = "<|message|>"
HARMONY_TAGS = HARMONY_END_TAGS + HARMONY_HEAD_TAGS + (HARMONY_MESSAGE, "<|constrain|>")
_HARMONY_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([^\s<]*)")
# Summary markers for the plain format, matched case-insensitively; the summary starts
# at the first non-whitespace character of the line that holds the first marker.
SUMMARY_MARKERS = ("final answer", "answer:", "\\boxed{")
SUMMARY_MARKER_RE = re.compile("|".join(re.escape(m) for m in SUMMARY_MARKERS), re.IGNORECASE)
# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) when
# whitespace follows; a blank line also ends a sentence.
SENTENCE_END = ".!?"
SENTENCE_CLOSERS = "\"')]"
_PLAIN_QUESTION_PREFIX = "Question:\n"

SplitSpec = Union[str, Callable[[str], Sequence[Tuple[int, int]]]]
REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of an incomplete character
Question = Union[str, Sequence[Dict[str, str]]]
QUESTION_TYPE = "a str or a chat conversation (a list of {'role': ..., 'content': str} dicts)"


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


def conversation(question: Question, system: Optional[str] = None, *, name: str = "question"):
    """``(messages, question text)`` for a question string or an HF chat conversation.

    A conversation is a list of ``{"role", "content"}`` dicts, as HF pipelines take it:
    optionally a system message, then turns that end with a user message, whose
    content is the question. ``system`` prepends a system message (a conversation that
    already has one cannot take another). Raises :class:`TraceError` naming ``name``
    for anything else.
    """
    if system is not None and not isinstance(system, str):
        raise TraceError(f"system must be a str or None, got {type(system).__name__}")
    if isinstance(question, str):
        messages = [{"role": "user", "content": question}]
    elif isinstance(question, (list, tuple)) and question and all(isinstance(m, dict) for m in question):
        for i, m in enumerate(question):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TraceError(
                    f"{name}[{i}] must be a message {{'role': str, 'content': str}}, got keys {sorted(m)} "
                    f"with content of type {type(m.get('content')).__name__}")
        messages = [{"role": m["role"], "content": m["content"]} for m in question]
        if messages[-1]["role"] != "user":
            raise TraceError(f"the conversation given as {name} must end with a user message (the question); "
                             f"its last message is {messages[-1]['role']!r}")
        if system is not None and any(m["role"] == "system" for m in messages):
            raise TraceError(f"the conversation given as {name} has a system message; do not also pass system=")
    else:
        raise TraceError(f"{name} must be {QUESTION_TYPE}, got {type(question).__name__}")
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    return messages, messages[-1]["content"]


REASONING_EFFORTS = ("low", "medium", "high")


def render_prompt(model_or_tok, question: Question, system: Optional[str] = None, *, chat: bool = True,
                  reasoning_effort: Optional[str] = None) -> str:
    """The prompt for ``question`` (a string or an HF chat conversation, see
    :func:`conversation`) with the generation prompt appended.

    Uses the tokenizer's chat template; without one, falls back to
    ``"{system}\\n\\nQuestion:\\n{question}\\n\\n"`` (a newline, not a space, after the colon so
    the question's first word starts a token of its own), which holds at most a system
    message and one user message. ``chat=False``: ``question`` is already the rendered
    prompt (a str) and is returned as is. ``reasoning_effort``: harmony's ``"low"`` /
    ``"medium"`` / ``"high"`` (GPT-OSS), handed to a chat template that reads it; a
    template that does not is refused rather than ignoring it.
    """
    if not chat:
        if not isinstance(question, str):
            raise TraceError(f"with chat=False a prompt must be the rendered prompt text (a str), got "
                             f"{type(question).__name__}")
        return question
    return _render_prompt(tokenizer_of(model_or_tok), question, system, reasoning_effort)


def _render_prompt(tok: Tokenizer, question: Question, system: Optional[str],
                   reasoning_effort: Optional[str] = None) -> str:
    """`render_prompt` with chat for a resolved tokenizer (callers in this package
    resolve the model once, at their entry point)."""
    messages, text = conversation(question, system)
    effort = {}
    if reasoning_effort is not None:
        if reasoning_effort not in REASONING_EFFORTS:
            raise TraceError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
        if "reasoning_effort" not in (getattr(tok, "chat_template", None) or ""):
            raise TraceError("reasoning_effort needs a chat template that reads it (GPT-OSS's harmony template); "
                             "this tokenizer's does not")
        effort = {"reasoning_effort": reasoning_effort}
    if not getattr(tok, "chat_template", None):
        if len(messages) > 2 or (len(messages) == 2 and messages[0]["role"] != "system"):
            raise TraceError("without a chat template a conversation can hold only a system message and "
                             "one user message")
        prefix = f"{messages[0]['content']}\n\n" if len(messages) == 2 else ""
        return f"{prefix}{_PLAIN_QUESTION_PREFIX}{text}\n\n"
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **effort)


def find_question(model_or_tok, prompt_text: str, question: Optional[str] = None) -> Tuple[int, int]:
    """Character span of the (last) user message inside a rendered prompt.

    With ``question`` given, its last occurrence. Otherwise the template is rendered
    around a sentinel and the longest pieces of the text before/after the sentinel
    that occur in ``prompt_text`` delimit the question.
    """
    return _find_question(tokenizer_of(model_or_tok), prompt_text, question)


def _find_question(tok: Tokenizer, prompt_text: str, question: Optional[str]) -> Tuple[int, int]:
    """`find_question` for a resolved tokenizer."""
    if question is not None:
        i = prompt_text.rfind(question)
        if i < 0 or not question.strip():
            raise TraceError(f"question text not found in the prompt (question={question[:60]!r})")
        return i, i + len(question)
    sentinel = "QQSTEPFLOWSENTINELQQ"
    rendered = _render_prompt(tok, sentinel, None)
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
    if SUMMARY_MARKER_RE.search(output_text):
        return "plain"
    return "r1"


def resolve_format(tokenizer, prompt_text: str, format: str) -> str:
    """The format of a generation that has not started yet. ``"auto"``: harmony if the
    chat template or the prompt uses ``<|channel|>``, r1 if either uses ``<think>``,
    otherwise plain (thinking until a summary marker).

    `detect_format` is the same rule once the output exists; the two differ only when
    nothing at all marks the format: a finished output without tags is read as r1
    thinking that was cut off before its ``</think>``, while a model whose template
    has no tags is expected to write plain text.
    """
    if format not in FORMAT_CHOICES:
        raise StepflowError(f"format must be one of {FORMAT_CHOICES}, got {format!r}")
    if format != "auto":
        return format
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if "<|channel|>" in template or "<|channel|>" in prompt_text:
        return "harmony"
    if THINK_OPEN in template or THINK_OPEN in prompt_text:
        return "r1"
    return "plain"


def harmony_initial_mode(prompt_text: str) -> str:
    """Where harmony output starts: inside a message if the prompt ends with
    ``<|message|>`` (channel from the prompt's last header), else in a header."""
    if not prompt_text.endswith(HARMONY_MESSAGE):
        return "header"
    head = prompt_text[: -len(HARMONY_MESSAGE)]
    return harmony_channel_mode(head[max(head.rfind("<|start|>"), head.rfind("<|end|>"), 0):])


def harmony_channel_mode(header: str) -> str:
    found = _HARMONY_CHANNEL_RE.findall(header)
    channel = found[-1] if found else "analysis"
    return {"analysis": "thinking", "final": "summary"}.get(channel, "skip")


def format_for_parts(tokenizer, format: str) -> str:
    """The format `Trace.from_parts` writes its parts in. ``"auto"``: harmony if the chat
    template uses ``<|channel|>``, else r1. Never plain: its boundary is a summary
    marker, which thinking text may contain, while the tags cannot collide with it."""
    if format not in FORMAT_CHOICES:
        raise TraceError(f"format must be one of {FORMAT_CHOICES}, got {format!r}")
    if format != "auto":
        return format
    return "harmony" if "<|channel|>" in str(getattr(tokenizer, "chat_template", "") or "") else "r1"


def render_output(fmt: str, thinking: str, summary: Optional[str]) -> str:
    """The output that holds ``thinking`` and ``summary`` (None or blank: no summary) in
    format ``fmt`` (see `Trace.from_parts`)."""
    has_summary = summary is not None and summary.strip() != ""
    if fmt == "r1":
        return f"{THINK_OPEN}\n{thinking}\n{THINK_CLOSE}" + (f"\n\n{summary}" if has_summary else "")
    if fmt == "harmony":
        out = f"<|channel|>analysis{HARMONY_MESSAGE}{thinking}<|end|>"
        return out + (f"<|start|>assistant<|channel|>final{HARMONY_MESSAGE}{summary}" if has_summary else "")
    if fmt == "plain":
        if not has_summary:
            return thinking
        s = summary.lstrip()
        return f"{thinking}\n\n{'' if SUMMARY_MARKER_RE.match(s) else 'Answer: '}{s}"
    raise TraceError(f"format must be one of {FORMATS}, got {fmt!r}")


def prompt_for_output(fmt: str, prompt_text: str, output_text: str) -> str:
    """The prompt an output of format ``fmt`` was generated from: r1 output without an
    opening ``<think>`` gets ``"<think>\\n"`` appended to the prompt, as the R1 chat
    templates do (unless the prompt already ends with it)."""
    if (fmt == "r1" and not re.match(r"\s*" + re.escape(THINK_OPEN), output_text)
            and not prompt_text.rstrip().endswith(THINK_OPEN)):
        return prompt_text + THINK_OPEN + "\n"
    return prompt_text


def incomplete_warning(fmt: str) -> Optional[str]:
    """What a finished trace of format ``fmt`` without its summary boundary warns, or None."""
    if fmt == "r1":
        return (f"no '{THINK_CLOSE}' in the output: the thinking was cut off; all output is thinking, "
                "there is no summary and complete=False")
    if fmt == "plain":
        return f"no summary marker {SUMMARY_MARKERS} in the output: all output is thinking, complete=False"
    return None


# ---------------------------------------------------------------- the rule engine


def check_split(split: SplitSpec) -> None:
    if not callable(split) and split not in SPLIT_CHOICES:
        raise TraceError(
            f"split must be one of {SPLITS}, 'auto' or a callable (text) -> [(start, end)], got {split!r}")


def resolve_split(split: SplitSpec, fmt: str) -> SplitSpec:
    """``split="auto"`` for a trace of format ``fmt`` (see ``AUTO_SPLIT``); any other
    split as given."""
    check_split(split)
    return AUTO_SPLIT[fmt] if split == "auto" else split


class _ParserState:
    """The mutable parser state; `StepParser` keeps a snapshot of it (`_snapshot`)
    before each character, which a rewind restores."""

    FIELDS = (
        "segment",  # the segment being parsed: "thinking" or "summary"
        "mode",  # "content", "header" (a harmony header) or "skip" (a channel that is no segment)
        "has_step",  # whether the segment has started a step yet
        "current",  # raw step id of the step being extended, -1 before the first
        "gap_newlines",  # newlines since the last non-whitespace character
        "gap_space",  # whether whitespace followed the last non-whitespace character
        "after_end",  # whether the last word ended a sentence (. ! ? and closers)
        "n_raw",  # raw steps started so far
        "line_start",  # first character of the current line
        "header_start",  # first character of the current harmony header
        "think_opened",  # whether an opening <think> was seen
        "floor",  # no tag may start before this character (it was consumed by a tag)
        "segment_start",  # first character of the current segment
        "last_visible",  # the last non-whitespace content character
        "closed",  # whether the thinking was closed by its format's boundary
        "thinking_end",  # where thinking content last stopped (its closing tag or marker line), -1: never
    )
    __slots__ = FIELDS

    def __init__(self, segment: str, mode: str):
        self.restore((segment, mode, False, -1, 0, False, False, 0, 0, 0, False, 0, 0, -1, False, -1))

    def restore(self, snap: tuple) -> None:
        for f, v in zip(self.FIELDS, snap):
            setattr(self, f, v)


_SNAP = {f: i for i, f in enumerate(_ParserState.FIELDS)}
_snapshot = operator.attrgetter(*_ParserState.FIELDS)  # the state as a tuple, for `restore`


class StepParser:
    """The segmentation rules, once: an incremental parser of a trace's output text.

    ``feed`` appends text; each character gets a label, the raw step it belongs to
    (``-1``: markup, or whitespace before a segment's first step), and ``raw_kinds``
    / ``raw_starts`` give each raw step's segment and first character. Formats (tags,
    harmony channels, plain summary markers, special tokens as markup), splits and
    ``split="auto"`` are decided here and nowhere else: `Trace` runs a parser over a
    finished output and `StepTracker` over a growing one, so they agree by
    construction.

    Some decisions need characters that arrive later: ``</think>`` may come in pieces,
    and a plain summary marker moves the summary start back to its line's start. When
    such a pattern completes, the parser rewinds to where it starts and parses again
    from there; ``feed`` returns the first character whose label may have changed.
    ``format=None`` parses bare content (no tags): what `step_starts` does.
    """

    def __init__(self, format: Optional[str], split: SplitSpec, *, split_summary: bool = False,
                 prompt_text: str = "", specials: Sequence[str] = (), start_segment: str = "thinking"):
        if format is not None and format not in FORMATS:
            raise TraceError(f"format must be one of {FORMATS}, got {format!r}")
        if format is None:
            check_split(split)
            if split == "auto":
                raise TraceError("split='auto' needs a format to resolve it; pass a split")
        self.format = format
        self.split = split if format is None else resolve_split(split, format)
        self.split_summary = split_summary
        self.chars: List[str] = []
        self.labels: List[int] = []  # raw step id per character
        self.raw_kinds: List[str] = []  # segment of each raw step
        self.raw_starts: List[int] = []  # first character of each raw step
        self._snaps: List[tuple] = []  # parser state before each character
        self._batch = 0  # feed calls so far: a callable split is re-run once per call
        self._split_cache = None
        mode, seg = "content", start_segment
        if format == "harmony":
            initial = harmony_initial_mode(prompt_text)
            if initial in ("header", "skip"):
                mode = initial
            else:
                seg = initial
        self._st = _ParserState(seg, mode)
        self._tags = self._tag_table(specials)

    # ------------------------------------------------------------------ what it found
    @property
    def segment(self) -> str:
        return self._st.segment

    @property
    def complete(self) -> bool:
        """Whether the summary boundary was seen (or the output started in the summary)."""
        return self._st.closed or self._st.segment == "summary"

    @property
    def thinking_end(self) -> int:
        """Where the thinking content ends: the tag (or marker line) after its last piece,
        the end of the text while it goes on, -1 if there was none."""
        st = self._st
        return len(self.chars) if st.segment == "thinking" and st.mode == "content" else st.thinking_end

    def next_visible_owner(self) -> int:
        """The raw step that a non-whitespace character arriving now would belong to, -1
        for markup or a new step (for a token whose first character is incomplete)."""
        st = self._st
        if st.mode != "content" or not st.has_step:
            return -1
        splits = st.segment == "thinking" or self.split_summary
        return -1 if splits and self._gap_starts_step(st) else st.current

    def token_owner(self, a: int, b: int, incomplete: bool = False) -> int:
        """`token_owner` for a token of the text parsed so far that spans characters
        ``a:b``. ``incomplete``: the token ends in a character still to be completed.
        A token with no complete character yet, or no visible one while incomplete, gets
        the step its coming visible character will have (`next_visible_owner`)."""
        if a >= len(self.labels) or (incomplete and first_visible(self.chars, a, b) < 0):
            return self.next_visible_owner()
        return token_owner(self.chars, self.labels, a, b)

    # ------------------------------------------------------------------ feeding
    def feed(self, text: str) -> int:
        """Parse ``text`` after what came before; returns the first character index whose
        label may have changed (``len`` before the call unless a pattern completed)."""
        self._batch += 1
        dirty = len(self.chars)
        for c in text:
            dirty = min(dirty, self._feed(c))
        return dirty

    def _tag_table(self, specials: Sequence[str]) -> Dict[str, list]:
        """Per last character: (pattern, action) pairs, longest first."""
        pats = []
        if self.format == "r1":
            pats += [(THINK_CLOSE, "close"), (THINK_OPEN, "open")]
        elif self.format == "harmony":
            pats += [(t, "h_end") for t in HARMONY_END_TAGS] + [(t, "h_head") for t in HARMONY_HEAD_TAGS]
            pats += [(HARMONY_MESSAGE, "h_message"), ("<|constrain|>", "markup")]
        elif self.format == "plain":
            pats += [(m, "marker") for m in SUMMARY_MARKERS]
        if self.format is not None:
            pats += [(s, "markup") for s in specials]
        table: Dict[str, list] = {}
        for p, a in sorted(pats, key=lambda x: -len(x[0])):
            table.setdefault(p[-1], []).append((p, a))
            if a == "marker":
                table.setdefault(p[-1].upper(), []).append((p, a))
        return table

    def _feed(self, c: str) -> int:
        i = len(self.chars)
        self.chars.append(c)
        self._process(i)
        for pat, action in self._tags.get(c, ()):
            a = i + 1 - len(pat)
            if a < self._st.floor or not _applies(action, self._snaps[a]):
                continue
            piece = "".join(self.chars[a:i + 1])
            if (piece.lower() if action == "marker" else piece) != pat:
                continue
            return self._apply_tag(action, a, i)
        return i

    def _apply_tag(self, action: str, a: int, i: int) -> int:
        """Rewind to char ``a`` and re-parse ``a..i`` knowing the pattern there."""
        line_start = self._st.line_start
        self._rewind(a)
        st = self._st
        header_text = "".join(self.chars[st.header_start:a])
        if action == "marker":
            s = line_start
            while s < a and self.chars[s].isspace():
                s += 1
            if s < a:
                self._rewind(s)
            self._st.thinking_end = s
            self._new_segment("summary", s)
            for j in range(s, i + 1):
                self._process(j)
            return s
        if action == "close":
            st.thinking_end = a
            self._new_segment("summary", i + 1)
        elif action == "open":
            st.think_opened = True
        elif action == "h_end" or action == "h_head":
            if st.segment == "thinking" and st.mode == "content":
                st.closed, st.thinking_end = True, a
            st.mode, st.header_start = "header", a
        elif action == "h_message":
            if st.mode == "header":
                mode = harmony_channel_mode(header_text)
                if mode == "skip":
                    st.mode = "skip"
                else:
                    st.mode = "content"
                    if mode != st.segment:
                        self._new_segment(mode, i + 1)
        st.floor = i + 1
        for j in range(a, i + 1):
            self._snaps.append(_snapshot(st))
            self.labels.append(-1)
            if self.chars[j] == "\n":
                st.line_start = j + 1
        return a

    def _rewind(self, a: int) -> None:
        self._st.restore(self._snaps[a])
        del self._snaps[a:]
        del self.labels[a:]
        del self.raw_kinds[self._st.n_raw:]
        del self.raw_starts[self._st.n_raw:]
        self._split_cache = None

    def _new_segment(self, seg: str, start: int) -> None:
        st = self._st
        st.segment, st.mode, st.has_step, st.current, st.segment_start = seg, "content", False, -1, start
        st.gap_newlines, st.gap_space, st.after_end = 0, False, False
        if seg == "summary":
            st.closed = True

    def _process(self, i: int) -> None:
        """Parse char ``i`` with the current state (the state machine of the splits)."""
        st = self._st
        self._snaps.append(_snapshot(st))
        c = self.chars[i]
        if c == "\n":
            st.line_start = i + 1
        if st.mode != "content":
            self.labels.append(-1)
            return
        if c.isspace():
            self.labels.append(st.current if st.has_step else -1)
            if c == "\n":
                st.gap_newlines += 1
            st.gap_space = True
            return
        seg = st.segment
        splits = seg == "thinking" or (seg == "summary" and self.split_summary)
        if splits and callable(self.split):
            new = i in self._callable_starts(i)
        elif not st.has_step:
            new = True
        elif not splits:
            new = False
        else:
            new = self._gap_starts_step(st)
        if new:
            st.current = st.n_raw
            st.n_raw += 1
            st.has_step = True
            self.raw_kinds.append(seg)
            self.raw_starts.append(i)
        self.labels.append(st.current)
        st.gap_newlines, st.gap_space, st.last_visible = 0, False, i
        st.after_end = c in SENTENCE_END or (st.after_end and c in SENTENCE_CLOSERS)

    def _gap_starts_step(self, st: _ParserState) -> bool:
        """Whether the whitespace since the last visible character starts a new step
        (built-in splits, inside a segment that is split): the split rules."""
        split = self.split
        if split == "blank_lines" or callable(split):  # a callable's starts come later
            return st.gap_newlines >= 2
        if split == "lines":
            return st.gap_newlines >= 1
        boundary = st.gap_newlines >= 2 or (st.after_end and st.gap_space)
        if split == "sentences_min15":
            return boundary and st.last_visible + 1 - self.raw_starts[st.current] >= SHORT_SENTENCE_CHARS
        return boundary

    def _callable_starts(self, i: int) -> set:
        """Step starts (char indices) of the current segment by the user's split,
        computed once per `feed` call on the segment's content so far."""
        key = (self._batch, self._st.segment_start)
        if self._split_cache is None or self._split_cache[0] != key:
            idx = [j for j in range(self._st.segment_start, i) if self.labels[j] >= 0 or self.chars[j].isspace()]
            idx += range(i, len(self.chars))
            content = "".join(self.chars[j] for j in idx)
            self._split_cache = (key, {idx[s] for s in _callable_step_starts(content, self.split)})
        return self._split_cache[1]


def _applies(action: str, snap: tuple) -> bool:
    """Whether a pattern that starts in the parser state ``snap`` takes effect."""
    seg, mode = snap[_SNAP["segment"]], snap[_SNAP["mode"]]
    if action in ("close", "marker"):
        return seg == "thinking" and mode == "content"
    if action == "open":
        return (seg == "thinking" and mode == "content" and not snap[_SNAP["has_step"]]
                and not snap[_SNAP["think_opened"]])
    if action == "h_message":
        return True
    return mode != "header"


def step_starts(content: str, split: SplitSpec) -> List[int]:
    """Positions in ``content`` (text without markup) where steps start: the first
    non-whitespace character of each."""
    if callable(split):
        return _callable_step_starts(content, split)
    parser = StepParser(None, split)
    parser.feed(content)
    return list(parser.raw_starts)


def _callable_step_starts(content: str, split) -> List[int]:
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


def question_labels(prompt_text: str, q0: int, q1: int) -> List[int]:
    """Per character of the prompt: 0 for the question step (from the first
    non-whitespace character of ``prompt_text[q0:q1]`` to ``q1``), -1 elsewhere."""
    piece = prompt_text[q0:q1]
    first = q0 + len(piece) - len(piece.lstrip())
    return [0 if first <= j < q1 else -1 for j in range(len(prompt_text))]


def token_starts(offsets) -> List[int]:
    """First character of each token: its offset start, or the previous token's end if
    that is earlier (tokenizers that trim leading spaces from offsets)."""
    starts = []
    prev_end = 0
    for s, e in offsets:
        starts.append(min(int(s), prev_end) if starts else int(s))
        prev_end = max(int(e), prev_end)
    return starts


def token_range(starts: Sequence[int], t: int, n_chars: int) -> Tuple[int, int]:
    """Characters of token ``t``: from its first character to the next token's first
    character (at least one character, so byte pieces of one character share it)."""
    a = starts[t]
    b = starts[t + 1] if t + 1 < len(starts) else n_chars
    return a, min(max(b, a + 1), n_chars)


def first_visible(chars, a: int, b: int) -> int:
    """Index of the first non-whitespace character of ``chars[a:b]``, -1 if none."""
    for j in range(a, b):
        if not chars[j].isspace():
            return j
    return -1


def token_owner(chars, labels: Sequence[int], a: int, b: int) -> int:
    """The ownership rule for the token that spans characters ``a:b``: it belongs to the
    step (``labels``: one per character) of its first non-whitespace character; a
    whitespace-only token to the step of its first character (the step whose extended
    span holds it, -1 before a segment's first step or in markup)."""
    j = first_visible(chars, a, b)
    j = a if j < 0 else j
    return labels[j] if j < len(chars) else -1


def token_labels(text: str, starts: Sequence[int], char_label: Sequence[int]) -> List[int]:
    """`token_owner` of every token (``starts``: each token's first character)."""
    return [token_owner(text, char_label, *token_range(starts, t, len(text))) for t in range(len(starts))]


def decode_with_offsets(tok, ids: Sequence[int]) -> Tuple[str, List[Tuple[int, int]]]:
    """The decoded text of ``ids`` and each token's character span in it.

    Decodes a sliding window of ids, as Hugging Face's ``TextStreamer`` does: the cost
    is O(len(ids)), and the window keeps the previous piece as context for tokenizers
    whose decoding of a token depends on the one before (SentencePiece spaces). A token
    starts at the character that holds its first byte: the bytes of one multi-byte
    character split over several tokens put all of them at that character. A span runs
    to the next token's start (at least one character).
    """
    pieces: List[str] = []
    n_chars = 0
    prefix, read = 0, 0  # ids[prefix:read] is committed text kept as context
    prefix_text = ""
    starts: List[int] = []
    for t in range(len(ids)):
        full = decode(tok, ids[prefix:t + 1])
        if read == t:
            starts.append(n_chars)
        else:  # ids[read:t] ended inside a character, which t may continue
            pending = decode(tok, ids[prefix:t])
            starts.append(n_chars + len(pending) - len(prefix_text) - continues_character(pending, full))
        if full.endswith(REPLACEMENT) and t + 1 < len(ids):
            continue
        new = full[len(prefix_text):]
        pieces.append(new)
        n_chars += len(new)
        prefix, read = read, t + 1
        prefix_text = decode(tok, ids[prefix:read])
    text = "".join(pieces)
    return text, [token_range(starts, t, len(text)) for t in range(len(starts))]


def continues_character(before: str, after: str) -> bool:
    """Whether the token that turned the decoding ``before`` into ``after`` continues
    (or completes) the incomplete character ``before`` ends in, rather than starting
    after bytes that will never form a character (which stay a U+FFFD of their own)."""
    if not before.endswith(REPLACEMENT):
        return False
    return len(after) == len(before) or after[len(before) - 1:len(before)] != REPLACEMENT


# ---------------------------------------------------------------- the stated answer
# A boxed answer: ``\\boxed{...}`` or ``\\fbox{...}`` with balanced braces.
BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# The last "Answer:" / "answer is" of a summary, when nothing is boxed.
_ANSWER_LEAD_RE = re.compile(r"answer\s*(?:is)?\s*[:：]?\s*", flags=re.IGNORECASE)


def boxed_spans(text: str) -> List[Tuple[int, int, int]]:
    """``(box start, content start, content end)`` of every balanced ``\\boxed{...}`` /
    ``\\fbox{...}`` in ``text``, in text order. An unclosed box (output cut off) is skipped."""
    found = []
    for match in BOXED_RE.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append((match.start(), start, i))
                    break
    return found


def stated_answer_span(summary: str) -> Optional[Tuple[int, int]]:
    """Character span of the final answer in a summary: the content of the last balanced
    box, else the text after the last ``Answer:`` / ``answer is``; None if neither."""
    boxes = boxed_spans(summary)
    if boxes:
        return boxes[-1][1:]
    match = None
    for match in _ANSWER_LEAD_RE.finditer(summary):
        pass
    if match is None or match.end() >= len(summary.rstrip()):
        return None
    return match.end(), len(summary.rstrip())
