"""Online step tracking during generation: one token id at a time.

:class:`StepTracker` turns the generated token stream into the segmentation that
:meth:`stepflow_tl.traces.trace.Trace.from_text` gives the same text: it decodes the
ids incrementally and hands the new characters to the rule engine
(`stepflow_tl.traces.formats.StepParser`), the same parser `Trace` runs over a finished
output, then applies the same token -> step rule (`formats.token_owner`). Cost per
``push`` is O(new characters) for the built-in splits; a user callable is re-run on
the current segment at each push (O(segment)).

Some decisions need characters that arrive later (``</think>`` in several tokens, a
plain summary marker that moves the summary start back to its line's start); the
parser rewinds when such a pattern completes and the tracker re-labels the tokens
from there, so ``token_steps`` always ends up equal to the offline segmentation;
labels (and ``new_step`` events) of those few tokens given earlier are provisional.
With tokenizers where the tags are single tokens (DeepSeek-R1, GPT-OSS) no rewind
happens for tags.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..errors import TraceError
from ..tl.adapter import tokenizer_of
from .formats import (
    FORMAT_CHOICES,
    REPLACEMENT,
    STEP_KINDS,
    SplitSpec,
    StepParser,
    _find_question,
    continues_character,
    decode,
    question_labels,
    resolve_format,
    special_strings,
    token_labels,
    token_range,
    token_starts,
)

# How many prompt tokens to keep as decoding context (spacing of the first new token).
_CONTEXT_TOKENS = 4


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
    ``format="auto"``: the format of a generation from this prompt
    (`formats.resolve_format`: the chat template's and the prompt's tags).
    """

    def __init__(
        self,
        tokenizer,
        *,
        format: str = "auto",
        split: SplitSpec = "blank_lines",
        split_summary: bool = False,
        prompt_ids: Sequence[int] = (),
        question_positions: Sequence[int] = (),
        start_segment: str = "thinking",
        prompt_text: Optional[str] = None,
    ):
        self.tokenizer = tokenizer_of(tokenizer)
        if format not in FORMAT_CHOICES:
            raise TraceError(f"format must be one of {FORMAT_CHOICES}, got {format!r}")
        if start_segment not in ("thinking", "summary"):
            raise TraceError(f"start_segment must be 'thinking' or 'summary', got {start_segment!r}")
        self._ids: List[int] = [int(i) for i in prompt_ids]
        self.n_prompt = len(self._ids)
        qpos = sorted(int(p) for p in question_positions)
        if qpos and (qpos[0] < 0 or qpos[-1] >= self.n_prompt):
            raise TraceError(f"question_positions must lie in the prompt (0..{self.n_prompt - 1})")
        if prompt_text is None:
            prompt_text = decode(self.tokenizer, self._ids)
        self.format = resolve_format(self.tokenizer, prompt_text, format)
        self._parser = StepParser(self.format, split, split_summary=split_summary, prompt_text=prompt_text,
                                  specials=special_strings(self.tokenizer), start_segment=start_segment)
        self.split = self._parser.split
        self.split_summary = split_summary
        self.token_steps: List[int] = [-1] * self.n_prompt
        for p in qpos:
            self.token_steps[p] = 0
        self._n_question_steps = 1 if qpos else 0  # generated steps are numbered after them
        self._kind_pos: Dict[str, List[int]] = {k: [] for k in STEP_KINDS}
        self._kind_pos["question"] = qpos
        self._step_pos: List[List[int]] = [list(qpos)] if qpos else []
        self._step_kind: List[str] = ["question"] if qpos else []

        # incremental detokenisation (offset window, as in HF's TextStreamer)
        self._prefix = max(0, self.n_prompt - _CONTEXT_TOKENS)
        self._read = self.n_prompt
        self._prefix_text = decode(self.tokenizer, self._ids[self._prefix:self._read])
        self._window_done = 0  # chars of the window beyond _prefix_text already committed
        self._window_text = ""  # the last decoding of the window ids[_prefix:]
        self._token_text: Dict[int, str] = {}  # decoding of one token id alone (the usual new context)
        self._pending = False  # the decoded text ends in an incomplete character

        # generated tokens -> raw steps of the parser -> steps
        self._token_char_start: List[int] = []  # first output char of each generated token
        self._step_of_raw: Dict[int, int] = {}  # the parser's raw step id -> step index
        self._raw_of_step: List[int] = []  # raw step id of each generated step
        self._step_first_token: List[int] = []  # generated-token index of each generated step's first token
        self._undone_steps: Dict[int, int] = {}  # steps undone during this push -> their first token
        # first position whose label the last push set or revised (== the new token's
        # position unless a multi-token pattern or a split character completed)
        self.changed_from = self.n_prompt

    # ------------------------------------------------------------------ public API
    @property
    def n_tokens(self) -> int:
        return len(self._ids)

    @property
    def current_segment(self) -> str:
        return self._parser.segment

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
        return "".join(self._parser.chars)

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
        seg_before = self._parser.segment
        n_before = len(self._step_kind)
        self._undone_steps = {}
        pos = len(self._ids)
        self._ids.append(int(token_id))
        window = decode(self.tokenizer, self._ids[self._prefix:])
        self._token_char_start.append(self._token_start(pos, window))
        dirty = min(self._commit_new_text(window), len(self._token_char_start) - 1)
        # A token's label can depend on its later characters (its first visible one) and
        # on whether they are complete, so the token before the first changed one, and
        # the byte pieces sharing its first character, are labelled again too.
        if dirty > 0:
            dirty = bisect.bisect_left(self._token_char_start, self._token_char_start[dirty - 1])
        before = self.token_steps[self.n_prompt + dirty:]
        self._relabel(dirty)
        after = self.token_steps[self.n_prompt + dirty:]
        same = next((i for i, (x, y) in enumerate(zip(before, after)) if x != y), len(before))
        self.changed_from = self.n_prompt + dirty + same
        events: List[StepEvent] = []
        if self._parser.segment != seg_before:
            events.append(StepEvent("segment_change", pos, self.current_step, self._parser.segment, seg_before))
        first_new = min([n_before] + list(self._undone_steps))
        for step in range(first_new, len(self._step_kind)):
            first = self._step_first_token[step - self._n_question_steps]
            if self._undone_steps.get(step) != first:
                events.append(StepEvent("new_step", self.n_prompt + first, step, self._step_kind[step], None))
        return events

    def extend(self, token_ids: Sequence[int]) -> List[StepEvent]:
        """``push`` each id in turn; all events."""
        out: List[StepEvent] = []
        for t in token_ids:
            out += self.push(t)
        return out

    # ------------------------------------------------------------------ detokenisation
    def _token_start(self, pos: int, window: str) -> int:
        """Output char index of the first character of token ``pos`` (which may still be
        an incomplete multi-byte character); ``window`` decodes ``ids[_prefix:pos + 1]``."""
        base = len(self._parser.chars) - self._window_done
        if self._read == pos:
            return base
        # the last push ended inside a character, so the window did not move and its
        # decoding then is ids[_prefix:pos]
        before = self._window_text
        rel = len(before) - len(self._prefix_text)
        if rel > 0 and continues_character(before, window):
            rel -= 1  # the token starts at the incomplete character it continues
        return base + rel

    def _commit_new_text(self, window: str) -> int:
        """Parse the newly complete characters of ``window`` (the decoding of
        ``ids[_prefix:]``). Returns the first generated-token index whose label may have
        changed."""
        pending = window.endswith(REPLACEMENT)
        end = len(window) - 1 if pending else len(window)
        new = window[len(self._prefix_text) + self._window_done:end]
        dirty_char = self._parser.feed(new)
        self._pending = pending
        self._window_text = window
        if pending:
            self._window_done += len(new)
        else:
            self._prefix, self._read = self._read, len(self._ids)
            if self._read - self._prefix == 1:
                token = self._ids[self._prefix]
                if token not in self._token_text:
                    self._token_text[token] = decode(self.tokenizer, [token])
                self._prefix_text = self._token_text[token]
            else:
                self._prefix_text = decode(self.tokenizer, self._ids[self._prefix:self._read])
            self._window_done = 0
        return bisect.bisect_left(self._token_char_start, dirty_char)

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
        while self._step_first_token and self._step_first_token[-1] >= k:
            f = len(self._step_kind) - 1
            self._undone_steps.setdefault(f, self._step_first_token.pop())
            del self._step_of_raw[self._raw_of_step.pop()]
            self._step_pos.pop()
            self._step_kind.pop()
        parser = self._parser
        n_chars = len(parser.labels)
        last = len(self._token_char_start) - 1
        for t in range(k, last + 1):
            a, b = token_range(self._token_char_start, t, n_chars)
            raw = parser.token_owner(a, b, incomplete=t == last and self._pending)
            if raw < 0 or raw >= len(parser.raw_kinds):
                self.token_steps.append(-1)
                continue
            step = self._step_of_raw.get(raw)
            if step is None:
                step = len(self._step_kind)
                self._step_of_raw[raw] = step
                self._raw_of_step.append(raw)
                self._step_first_token.append(t)
                self._step_kind.append(parser.raw_kinds[raw])
                self._step_pos.append([])
            p = self.n_prompt + t
            self.token_steps.append(step)
            self._kind_pos[self._step_kind[step]].append(p)
            self._step_pos[step].append(p)


def prompt_positions(model_or_tok, prompt_text: str, question: Optional[str] = None):
    """Token ids of ``prompt_text`` and the positions of its question tokens, by the
    same rule as :meth:`Trace.from_text`: ``(prompt_ids, question_positions)``."""
    tok = tokenizer_of(model_or_tok)
    q0, q1 = _find_question(tok, prompt_text, question)
    enc = tok(prompt_text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    labels = token_labels(prompt_text, token_starts(enc["offset_mapping"]), question_labels(prompt_text, q0, q1))
    return list(enc["input_ids"]), [t for t, x in enumerate(labels) if x == 0]
