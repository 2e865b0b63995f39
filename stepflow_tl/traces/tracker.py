"""Online step tracking during generation: one token id at a time.

:class:`StepTracker` turns the generated token stream into the segmentation that
:meth:`stepflow_tl.traces.trace.Trace.from_text` would give the same text: same markup
rules, same step boundaries, same token -> step rule (a token belongs to the step of
its first non-whitespace character; a whitespace-only token to the step before it).
Cost per ``push`` is O(new characters) for the built-in splits; a user callable is
re-run on the current segment at each push (O(segment)).

Some decisions need characters that arrive later. ``</think>`` may come as several
tokens (``<``, ``think``, ``>``), and a plain-format summary marker (``Answer:``)
moves the summary start back to the beginning of its line. When such a pattern
completes, the tracker rewinds to where it starts and re-labels the tokens from
there, so ``token_steps`` always ends up equal to the offline segmentation; labels
(and ``new_step`` events) of those few tokens given earlier are provisional. With
tokenizers where the tags are single tokens (DeepSeek-R1, GPT-OSS) no rewind happens
for tags.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

from ..errors import TraceError
from ..tl.adapter import tokenizer_of
from .formats import (
    FORMATS,
    HARMONY_END_TAGS,
    HARMONY_HEAD_TAGS,
    HARMONY_MESSAGE,
    SENTENCE_CLOSERS,
    SENTENCE_END,
    STEP_KINDS,
    SUMMARY_MARKERS,
    THINK_CLOSE,
    THINK_OPEN,
    REPLACEMENT,
    SplitSpec,
    continues_character,
    decode,
    find_question,
    first_visible,
    harmony_channel_mode,
    harmony_initial_mode,
    resolve_split,
    special_strings,
    step_starts,
    token_labels,
    token_range,
    token_starts,
)

# How many prompt tokens to keep as decoding context (spacing of the first new token).
_CONTEXT_TOKENS = 4


class _Snapshot(NamedTuple):
    """The parser state before one character (what a rewind restores)."""

    segment: str  # the segment being parsed: "thinking" or "summary"
    mode: str  # "content", "header" (a harmony header) or "skip" (a channel that is no segment)
    has_step: bool  # whether the segment has started a step yet
    current: int  # raw step id of the step being extended, -1 before the first
    gap_newlines: int  # newlines since the last non-whitespace character
    gap_space: bool  # whether whitespace followed the last non-whitespace character
    after_end: bool  # whether the last word ended a sentence (. ! ? and closers)
    n_raw: int  # raw steps started so far
    line_start: int  # first character of the current line
    header_start: int  # first character of the current harmony header
    think_opened: bool  # whether an opening <think> was seen
    floor: int  # no tag may start before this character (it was consumed by a tag)
    segment_start: int  # first character of the current segment


class _ParserState:
    """The mutable parser state; `snapshot` / `restore` convert it to and from `_Snapshot`."""

    __slots__ = _Snapshot._fields

    def __init__(self, segment: str, mode: str):
        self.restore(_Snapshot(segment, mode, False, -1, 0, False, False, 0, 0, 0, False, 0, 0))

    def snapshot(self) -> _Snapshot:
        return _Snapshot(*(getattr(self, f) for f in _Snapshot._fields))

    def restore(self, snap: _Snapshot) -> "_ParserState":
        for f, v in zip(_Snapshot._fields, snap):
            setattr(self, f, v)
        return self


@dataclass(frozen=True)
class StepEvent:
    """``new_step``: token ``position`` is the first token of step ``step``.
    ``segment_change``: from token ``position`` on, generation is in ``segment``."""

    kind: str
    position: int
    step: int
    segment: str
    previous_segment: Optional[str]


class StepTracker:
    """Tracks segments and steps of a generation, token by token.

    ``prompt_ids``: the prompt token ids (positions 0..len-1). ``question_positions``:
    absolute positions of the question tokens in the prompt (they form step 0); get
    them with :func:`prompt_positions`. Generated tokens get positions from
    ``len(prompt_ids)`` on. ``start_segment``: the segment generation starts in.
    """

    def __init__(
        self,
        tokenizer,
        *,
        format: str = "r1",
        split: SplitSpec = "blank_lines",
        split_summary: bool = False,
        prompt_ids: Sequence[int] = (),
        question_positions: Sequence[int] = (),
        start_segment: str = "thinking",
        prompt_text: Optional[str] = None,
    ):
        self.tokenizer = tokenizer_of(tokenizer)
        if format not in FORMATS:
            raise TraceError(f"format must be one of {FORMATS}, got {format!r}")
        if start_segment not in ("thinking", "summary"):
            raise TraceError(f"start_segment must be 'thinking' or 'summary', got {start_segment!r}")
        self.format = format
        self.split = resolve_split(split, format)
        self.split_summary = split_summary
        self._ids: List[int] = [int(i) for i in prompt_ids]
        self.n_prompt = len(self._ids)
        qpos = sorted(int(p) for p in question_positions)
        if qpos and (qpos[0] < 0 or qpos[-1] >= self.n_prompt):
            raise TraceError(f"question_positions must lie in the prompt (0..{self.n_prompt - 1})")
        self.token_steps: List[int] = [-1] * self.n_prompt
        for p in qpos:
            self.token_steps[p] = 0
        self._q = 1 if qpos else 0  # number of question steps (step indices start after them)
        self._kind_pos: Dict[str, List[int]] = {k: [] for k in STEP_KINDS}
        self._kind_pos["question"] = qpos
        self._step_pos: List[List[int]] = [list(qpos)] if qpos else []
        self._step_kind: List[str] = ["question"] if qpos else []

        # incremental detokenisation (offset window, as in HF's TextStreamer)
        self._prefix = max(0, self.n_prompt - _CONTEXT_TOKENS)
        self._read = self.n_prompt
        self._prefix_text = decode(self.tokenizer, self._ids[self._prefix:self._read])
        self._window_done = 0  # chars of the window beyond _prefix_text already committed

        # character-level parse of the generated text
        self._chars: List[str] = []
        self._label: List[int] = []  # raw step id per char, -1 markup
        self._snaps: List[_Snapshot] = []  # parser state before each char
        self._raw_kind: List[str] = []
        self._tstart: List[int] = []  # first char of each generated token
        self._raw_final: Dict[int, int] = {}
        self._final_first: List[int] = []  # generated-token index of each step's first token
        self._final_raw: List[int] = []  # raw step id of each generated step
        self._popped: Dict[int, int] = {}  # steps undone during this push -> their first token
        self._split_cache = None
        self._pending = False  # the decoded text ends in an incomplete character
        # first position whose label the last push set or revised (== the new token's
        # position unless a multi-token pattern or a split character completed)
        self.changed_from = self.n_prompt

        if prompt_text is None:
            prompt_text = decode(self.tokenizer, self._ids)
        mode, seg = "content", start_segment
        if format == "harmony":
            initial = harmony_initial_mode(prompt_text)
            if initial in ("header", "skip"):
                mode = initial
            else:
                seg = initial
        self._st = _ParserState(seg, mode)
        self._specials = special_strings(self.tokenizer)
        self._tags = self._tag_table()

    # ------------------------------------------------------------------ public API
    @property
    def n_tokens(self) -> int:
        return len(self._ids)

    @property
    def current_segment(self) -> str:
        return self._st.segment

    @property
    def current_step(self) -> int:
        """Index of the latest step started (-1 before any)."""
        return len(self._step_kind) - 1

    @property
    def step_kinds(self) -> List[str]:
        return list(self._step_kind)

    @property
    def text(self) -> str:
        """The generated text decoded so far (without an incomplete trailing character)."""
        return "".join(self._chars)

    def positions(self, kind: str) -> List[int]:
        """Absolute token positions so far whose step is of ``kind``."""
        if kind not in STEP_KINDS:
            raise TraceError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
        return list(self._kind_pos[kind])

    def step_positions(self, step_index: int) -> List[int]:
        """Absolute token positions of step ``step_index`` so far."""
        if not 0 <= step_index < len(self._step_pos):
            raise TraceError(f"no step {step_index} yet (steps so far: {len(self._step_pos)})")
        return list(self._step_pos[step_index])

    def push(self, token_id: int) -> List[StepEvent]:
        """Append one generated token; returns the events it causes."""
        seg_before = self._st.segment
        n_before = len(self._step_kind)
        self._popped = {}
        pos = len(self._ids)
        self._ids.append(int(token_id))
        self._tstart.append(self._token_start(pos))
        dirty = min(self._commit_new_text(), len(self._tstart) - 1)
        # A token's label can depend on its later characters (its first visible one) and
        # on whether they are complete, so the token before the first changed one, and
        # the byte pieces sharing its first character, are labelled again too.
        if dirty > 0:
            dirty = bisect.bisect_left(self._tstart, self._tstart[dirty - 1])
        before = self.token_steps[self.n_prompt + dirty:]
        self._relabel(dirty)
        after = self.token_steps[self.n_prompt + dirty:]
        same = next((i for i, (x, y) in enumerate(zip(before, after)) if x != y), len(before))
        self.changed_from = self.n_prompt + dirty + same
        events: List[StepEvent] = []
        if self._st.segment != seg_before:
            events.append(StepEvent("segment_change", pos, self.current_step, self._st.segment, seg_before))
        first_new = min([n_before] + list(self._popped))
        for step in range(first_new, len(self._step_kind)):
            first = self._final_first[step - self._q]
            if self._popped.get(step) != first:
                events.append(StepEvent("new_step", self.n_prompt + first, step, self._step_kind[step], None))
        return events

    def extend(self, token_ids: Sequence[int]) -> List[StepEvent]:
        """``push`` each id in turn; all events."""
        out: List[StepEvent] = []
        for t in token_ids:
            out += self.push(t)
        return out

    # ------------------------------------------------------------------ detokenisation
    def _token_start(self, pos: int) -> int:
        """Output char index of the first character of token ``pos`` (which may still be
        an incomplete multi-byte character)."""
        base = len(self._chars) - self._window_done
        if self._read == pos:
            return base
        before = decode(self.tokenizer, self._ids[self._prefix:pos])
        rel = len(before) - len(self._prefix_text)
        if rel > 0 and continues_character(before, decode(self.tokenizer, self._ids[self._prefix:pos + 1])):
            rel -= 1  # the token starts at the incomplete character it continues
        return base + rel

    def _commit_new_text(self) -> int:
        """Decode the window, parse the newly complete characters. Returns the first
        generated-token index whose label may have changed."""
        full = decode(self.tokenizer, self._ids[self._prefix:])
        pending = full.endswith(REPLACEMENT)
        end = len(full) - 1 if pending else len(full)
        new = full[len(self._prefix_text) + self._window_done:end]
        dirty_char = len(self._chars)
        for c in new:
            dirty_char = min(dirty_char, self._feed(c))
        self._pending = pending
        if pending:
            self._window_done += len(new)
        else:
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = decode(self.tokenizer, self._ids[self._prefix:self._read])
            self._window_done = 0
        return bisect.bisect_left(self._tstart, dirty_char)

    # ------------------------------------------------------------------ parsing
    def _tag_table(self):
        """Per last character: (pattern, action) pairs, longest first."""
        pats = []
        if self.format == "r1":
            pats += [(THINK_CLOSE, "close"), (THINK_OPEN, "open")]
        elif self.format == "harmony":
            pats += [(t, "h_end") for t in HARMONY_END_TAGS] + [(t, "h_head") for t in HARMONY_HEAD_TAGS]
            pats += [(HARMONY_MESSAGE, "h_message"), ("<|constrain|>", "markup")]
        else:
            pats += [(m, "marker") for m in SUMMARY_MARKERS]
        pats += [(s, "markup") for s in self._specials]
        table: Dict[str, list] = {}
        for p, a in sorted(pats, key=lambda x: -len(x[0])):
            table.setdefault(p[-1], []).append((p, a))
            if a == "marker":
                table.setdefault(p[-1].upper(), []).append((p, a))
        return table

    def _feed(self, c: str) -> int:
        """Append one character; returns the first char index whose label changed."""
        i = len(self._chars)
        self._chars.append(c)
        self._process(i)
        for pat, action in self._tags.get(c, ()):
            n = len(pat)
            a = i + 1 - n
            if a < self._st.floor or not _applies(action, self._snaps[a]):
                continue
            piece = "".join(self._chars[a:i + 1])
            if (piece.lower() if action == "marker" else piece) != pat:
                continue
            return self._apply_tag(action, a, i)
        return i

    def _apply_tag(self, action: str, a: int, i: int) -> int:
        """Rewind to char ``a`` and re-parse ``a..i`` knowing the pattern there."""
        line_start = self._st.line_start
        self._rewind(a)
        st = self._st
        header_text = "".join(self._chars[st.header_start:a])
        if action == "marker":
            s = line_start
            while s < a and self._chars[s].isspace():
                s += 1
            if s < a:
                self._rewind(s)
            self._new_segment("summary", s)
            for j in range(s, i + 1):
                self._process(j)
            return s
        if action == "close":
            self._new_segment("summary", i + 1)
        elif action == "open":
            st.think_opened = True
        elif action == "h_end" or action == "h_head":
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
            self._snaps.append(st.snapshot())
            self._label.append(-1)
            if self._chars[j] == "\n":
                st.line_start = j + 1
        return a

    def _rewind(self, a: int) -> None:
        self._st.restore(self._snaps[a])
        del self._snaps[a:]
        del self._label[a:]
        del self._raw_kind[self._st.n_raw:]
        self._split_cache = None

    def _new_segment(self, seg: str, start: int) -> None:
        st = self._st
        st.segment, st.mode, st.has_step, st.current, st.segment_start = seg, "content", False, -1, start
        st.gap_newlines, st.gap_space, st.after_end = 0, False, False

    def _process(self, i: int) -> None:
        """Parse char ``i`` with the current state (the state machine of the splits)."""
        st = self._st
        self._snaps.append(st.snapshot())
        c = self._chars[i]
        if c == "\n":
            st.line_start = i + 1
        if st.mode != "content":
            self._label.append(-1)
            return
        if c.isspace():
            self._label.append(st.current if st.has_step else -1)
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
            self._raw_kind.append(seg)
        self._label.append(st.current)
        st.gap_newlines, st.gap_space = 0, False
        st.after_end = c in SENTENCE_END or (st.after_end and c in SENTENCE_CLOSERS)

    def _gap_starts_step(self, st) -> bool:
        """Whether the whitespace since the last visible character starts a new step
        (built-in splits, inside a segment that is split)."""
        if self.split == "blank_lines" or callable(self.split):  # a callable's starts come later
            return st.gap_newlines >= 2
        if self.split == "lines":
            return st.gap_newlines >= 1
        return st.gap_newlines >= 2 or (st.after_end and st.gap_space)

    def _callable_starts(self, i: int) -> set:
        """Step starts (output char indices) of the current segment by the user's split,
        computed once per push on the segment's content so far plus the new chars."""
        key = (len(self._ids), self._st.segment_start)
        if self._split_cache is None or self._split_cache[0] != key:
            idx = [j for j in range(self._st.segment_start, i) if self._label[j] >= 0 or self._chars[j].isspace()]
            idx += range(i, len(self._chars))
            content = "".join(self._chars[j] for j in idx)
            self._split_cache = (key, {idx[s] for s in step_starts(content, self.split)})
        return self._split_cache[1]

    # ------------------------------------------------------------------ token labels
    def _relabel(self, k: int) -> None:
        """Recompute the step of generated tokens ``k..`` from the character labels."""
        cut = self.n_prompt + k
        for p in range(len(self.token_steps) - 1, cut - 1, -1):
            f = self.token_steps[p]
            if f >= 0:
                self._step_pos[f].pop()
                self._kind_pos[self._step_kind[f]].pop()
        del self.token_steps[cut:]
        while self._final_first and self._final_first[-1] >= k:
            f = len(self._step_kind) - 1
            self._popped.setdefault(f, self._final_first.pop())
            del self._raw_final[self._final_raw.pop()]
            self._step_pos.pop()
            self._step_kind.pop()
        n_chars = len(self._label)
        for t in range(k, len(self._tstart)):
            a, b = token_range(self._tstart, t, n_chars)
            j = first_visible(self._chars, a, b)
            last = t == len(self._tstart) - 1
            if j >= 0:
                raw = self._label[j]
            elif a < n_chars and not (last and self._pending):
                raw = self._label[a]  # whitespace only
            else:  # its first visible character is still incomplete: non-whitespace content
                st = self._st
                starts = (st.segment == "thinking" or self.split_summary) and self._gap_starts_step(st)
                raw = st.current if st.mode == "content" and st.has_step and not starts else -1
            if raw < 0 or raw >= len(self._raw_kind):
                self.token_steps.append(-1)
                continue
            final = self._raw_final.get(raw)
            if final is None:
                final = len(self._step_kind)
                self._raw_final[raw] = final
                self._final_raw.append(raw)
                self._final_first.append(t)
                self._step_kind.append(self._raw_kind[raw])
                self._step_pos.append([])
            p = self.n_prompt + t
            self.token_steps.append(final)
            self._kind_pos[self._step_kind[final]].append(p)
            self._step_pos[final].append(p)


def _applies(action: str, st: _Snapshot) -> bool:
    """Whether a pattern that starts in parser state ``st`` takes effect."""
    seg, mode = st.segment, st.mode
    if action in ("close", "marker"):
        return seg == "thinking" and mode == "content"
    if action == "open":
        return seg == "thinking" and mode == "content" and not st.has_step and not st.think_opened
    if action == "h_message":
        return True
    return mode != "header"


def prompt_positions(model_or_tok, prompt_text: str, question: Optional[str] = None):
    """Token ids of ``prompt_text`` and the positions of its question tokens, by the
    same rule as :meth:`Trace.from_text`: ``(prompt_ids, question_positions)``."""
    tok = tokenizer_of(model_or_tok)
    q0, q1 = find_question(tok, prompt_text, question)
    enc = tok(prompt_text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    starts = token_starts(enc["offset_mapping"])
    first = q0 + len(prompt_text[q0:q1]) - len(prompt_text[q0:q1].lstrip())
    char_label = [0 if first <= j < q1 else -1 for j in range(len(prompt_text))]
    labels = token_labels(prompt_text, starts, char_label)
    return list(enc["input_ids"]), [t for t, x in enumerate(labels) if x == 0]
