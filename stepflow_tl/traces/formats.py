"""Every convention of the trace formats, once: the format names and the ``"auto"`` rule,
the markup tags (``<think>``/``</think>``, harmony's channel tags), the plain format's
summary markers, the step kinds, how a prompt is rendered, where the question sits in
it, how an output is cut into segments and a segment into steps, and where the stated
answer sits in a summary.

`stepflow_tl.traces.trace` (offline) and `stepflow_tl.traces.tracker` (online, token by
token) both segment with these rules, so they agree by construction;
`stepflow_tl.study.grading` and the ``loss="answer"`` of Step-Saliency read answers
with them.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import StepflowError, TraceError
from ..tl.adapter import tokenizer_of

STEP_KINDS = ("question", "thinking", "summary")
FORMATS = ("r1", "harmony", "plain")
# What a caller may pass: a format or "auto" (see `detect_format` and `resolve_format`).
FORMAT_CHOICES = ("auto",) + FORMATS
SPLITS = ("blank_lines", "lines", "sentences")
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
_HARMONY_TAG_RE = re.compile("|".join(re.escape(t) for t in HARMONY_TAGS))
_HARMONY_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([^\s<]*)")
# Summary markers for the plain format, matched case-insensitively; the summary starts
# at the first non-whitespace character of the line that holds the first marker.
SUMMARY_MARKERS = ("final answer", "answer:", "\\boxed{")
SUMMARY_MARKER_RE = re.compile("|".join(re.escape(m) for m in SUMMARY_MARKERS), re.IGNORECASE)
# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) when
# whitespace follows; a blank line also ends a sentence.
SENTENCE_END = ".!?"
SENTENCE_CLOSERS = "\"')]"
_SENTENCE_END_RE = re.compile(r"[.!?][\"')\]]*$")
_BLANK_LINE_RE = re.compile(r"\n\s*\n")
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


def render_prompt(model_or_tok, question: Question, system: Optional[str] = None, *, chat: bool = True) -> str:
    """The prompt for ``question`` (a string or an HF chat conversation, see
    :func:`conversation`) with the generation prompt appended.

    Uses the tokenizer's chat template; without one, falls back to
    ``"{system}\\n\\nQuestion:\\n{question}\\n\\n"`` (a newline, not a space, after the colon so
    the question's first word starts a token of its own), which holds at most a system
    message and one user message. ``chat=False``: ``question`` is already the rendered
    prompt (a str) and is returned as is.
    """
    if not chat:
        if not isinstance(question, str):
            raise TraceError(f"with chat=False a prompt must be the rendered prompt text (a str), got "
                             f"{type(question).__name__}")
        return question
    tok = tokenizer_of(model_or_tok)
    messages, text = conversation(question, system)
    if not getattr(tok, "chat_template", None):
        if len(messages) > 2 or (len(messages) == 2 and messages[0]["role"] != "system"):
            raise TraceError("without a chat template a conversation can hold only a system message and "
                             "one user message")
        prefix = f"{messages[0]['content']}\n\n" if len(messages) == 2 else ""
        return f"{prefix}{_PLAIN_QUESTION_PREFIX}{text}\n\n"
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
        m = SUMMARY_MARKER_RE.search(output)
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
                    mode = harmony_channel_mode(output[pos:m.start()])
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


def check_split(split: SplitSpec) -> None:
    if not callable(split) and split not in SPLIT_CHOICES:
        raise TraceError(
            f"split must be one of {SPLITS}, 'auto' or a callable (text) -> [(start, end)], got {split!r}")


def resolve_split(split: SplitSpec, fmt: str) -> SplitSpec:
    """``split="auto"`` for a trace of format ``fmt`` (see ``AUTO_SPLIT``); any other
    split as given."""
    check_split(split)
    return AUTO_SPLIT[fmt] if split == "auto" else split


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
    if split in ("sentences", "lines"):
        out = []
        prev = None
        for m in re.finditer(r"\S+", content):
            if prev is None:
                out.append(m.start())
            else:
                newlines = content.count("\n", prev.end(), m.start())
                if split == "lines":
                    new = newlines >= 1
                else:
                    new = newlines >= 2 or _SENTENCE_END_RE.search(prev.group()) is not None
                if new:
                    out.append(m.start())
            prev = m
        return out
    check_split(split)
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


def token_labels(text: str, starts: Sequence[int], char_label: Sequence[int]) -> List[int]:
    """The ownership rule: a token gets the label of its first non-whitespace character;
    a whitespace-only token gets the label of its first character (the step whose
    extended span holds it, -1 before a segment's first step or in markup)."""
    out = []
    for t in range(len(starts)):
        a, b = token_range(starts, t, len(text))
        j = first_visible(text, a, b)
        j = a if j < 0 else j
        out.append(char_label[j] if j < len(text) else -1)
    return out


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
