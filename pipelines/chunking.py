"""Cutting a chart's notes into chunks that fit a token budget.

A chunk never crosses a note boundary and starts at a section heading unless
its section was too long for one chunk. Headings are Markdown lines
(``# Medications``, ``## Plan``, as Synthea writes them) and ALL-CAPS labels
at the start of a line, with a colon (``HOSPITAL COURSE: The patient...``) or
alone on their line (``DIAGNOSES ON ADMISSION``), as dictated summaries write
them. A section over budget is split at paragraphs, then at sentences or
lines, then wherever the exact token count says (preferring whitespace).

Every chunk records ``[start, end)`` character offsets into its note, so
``note.text[start:end] == chunk.text`` and citations stay exact. Sizes are
exact model tokens of the chunk text counted on its own, never estimates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

from pipelines.stays import Chart, ChartNote

#: Smallest allowed budget: one code point is at most 4 bytes, so at most 4
#: byte-level tokens, and a chunk must always be able to hold one.
MIN_MAX_TOKENS = 8

_MARKDOWN_HEADING = r"[ \t]*\#{1,6}[ \t]+(?P<md>[^\n]*?)[ \t#]*"
_CAPS = r"[A-Z][A-Z0-9&/,'()\- ]{0,58}[A-Z)]"
_CAPS_WITH_COLON = rf"[ \t]*(?P<colon>{_CAPS})[ \t]*:"
_CAPS_LINE = rf"[ \t]*(?P<line>{_CAPS})[ \t]*$"
_HEADING = re.compile(
    rf"^(?:{_MARKDOWN_HEADING}$|{_CAPS_WITH_COLON}|{_CAPS_LINE})", re.MULTILINE
)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# A sentence ends at . ! or ? (plus closing quotes or brackets) before
# whitespace. Lines come next: list items are lines without full stops, but
# dictated text is hard-wrapped, so a line end is a worse cut than a full stop.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_LINE_BREAK = re.compile(r"[ \t]*\n\s*")
_BREAKS = (_PARAGRAPH_BREAK, _SENTENCE_BREAK, _LINE_BREAK)
_WHITESPACE = re.compile(r"\s")


class TokenCounting(Protocol):
    """What chunking needs from a tokenizer (TokenCounter has it)."""

    def count(self, text: str, *, allow_special: bool = False) -> int:
        """Model tokens in ``text``."""
        ...


@dataclass(frozen=True)
class Section:
    """A span of a note from one heading (or the note start) to the next."""

    heading: str | None
    start: int
    end: int


@dataclass(frozen=True)
class Chunk:
    """A piece of one note that fits the token budget.

    ``heading`` is the first heading of the chunk's section (None before a
    note's first heading); ``headings`` lists every heading when small
    sections were joined. Each piece of a split section keeps its heading.
    """

    note_id: str
    heading: str | None
    headings: tuple[str, ...]
    start: int
    end: int
    text: str
    tokens: int

    @property
    def chunk_id(self) -> str:
        """A stable id naming the note and the character span."""
        return f"{self.note_id}@{self.start}-{self.end}"


def find_sections(text: str) -> list[Section]:
    """Split a note into sections at its headings.

    The sections cover the text exactly once, in order: the first starts at
    0 (with heading None when text precedes the first heading), each later one
    at the start of its heading line, and the last ends at ``len(text)``.
    """
    starts: list[tuple[int, str | None]] = [(0, None)]
    for match in _HEADING.finditer(text):
        heading = _heading_name(match)
        if heading is None:
            continue
        if match.start() == 0:
            starts[0] = (0, heading)
        else:
            starts.append((match.start(), heading))
    ends = [start for start, _ in starts[1:]] + [len(text)]
    return [
        Section(heading, start, end)
        for (start, heading), end in zip(starts, ends, strict=True)
        if end > start
    ]


def chunk_notes(
    notes: Iterable[ChartNote],
    *,
    counter: TokenCounting,
    max_tokens: int,
    overlap_tokens: int = 0,
    min_tokens: int = 0,
) -> list[Chunk]:
    """Chunks of every note, in note order then text order.

    Args:
        notes: The notes to cut.
        counter: Counts model tokens (a TokenCounter).
        max_tokens: Most tokens in one chunk, overlap included; at least 8.
        overlap_tokens: Most tokens a piece of a split section repeats from
            the end of the piece before it, cut at a sentence or unit
            boundary (so often fewer). Default 0; must be below max_tokens.
        min_tokens: A section with fewer tokens than this is joined to the
            next section of the same note when both fit in max_tokens, so
            empty or one-line sections don't become chunks of their own.
            Default 0 (never join).

    Raises:
        ValueError: If max_tokens is below 8 or overlap_tokens is negative or
            not below max_tokens.
    """
    _check_budget(max_tokens=max_tokens, overlap_tokens=overlap_tokens)
    return [
        chunk
        for note in notes
        for chunk in _chunk_note(
            note,
            counter=counter,
            max_tokens=max_tokens,
            overlap_tokens=overlap_tokens,
            min_tokens=min_tokens,
        )
    ]


def chunk_chart(
    chart: Chart,
    *,
    counter: TokenCounting,
    max_tokens: int,
    overlap_tokens: int = 0,
    min_tokens: int = 0,
) -> list[Chunk]:
    """Chunks of all notes of a chart (see chunk_notes for the options)."""
    return chunk_notes(
        chart.notes,
        counter=counter,
        max_tokens=max_tokens,
        overlap_tokens=overlap_tokens,
        min_tokens=min_tokens,
    )


def _check_budget(*, max_tokens: int, overlap_tokens: int) -> None:
    if max_tokens < MIN_MAX_TOKENS:
        raise ValueError(
            f"max_tokens is {max_tokens}; chunks need at least {MIN_MAX_TOKENS}"
        )
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"overlap_tokens is {overlap_tokens}; it must be at least 0 and"
            f" below max_tokens ({max_tokens})"
        )


def _heading_name(match: re.Match[str]) -> str | None:
    if match.group("md") is not None:
        return match.group("md").strip() or None
    name = match.group("colon") or match.group("line")
    letters = sum(char.isalpha() for char in name)
    # A caps word alone on its line ("NKDA", "CBC") is more often content
    # than a heading; with a colon, short labels ("GI:", "ENT:") are real.
    if match.group("line") is not None and letters < 5:
        return None
    return name.strip() if letters >= 2 else None


@dataclass
class _Group:
    start: int
    end: int
    headings: list[str]


def _chunk_note(
    note: ChartNote,
    *,
    counter: TokenCounting,
    max_tokens: int,
    overlap_tokens: int,
    min_tokens: int,
) -> list[Chunk]:
    text = note.text
    chunks = []
    for group in _group_sections(
        text, counter=counter, max_tokens=max_tokens, min_tokens=min_tokens
    ):
        heading = group.headings[0] if group.headings else None
        pieces = _split_span(
            text,
            group.start,
            group.end,
            counter=counter,
            max_tokens=max_tokens,
            overlap_tokens=overlap_tokens,
        )
        for start, end in pieces:
            piece_text = text[start:end]
            chunks.append(
                Chunk(
                    note_id=note.note_id,
                    heading=heading,
                    headings=tuple(group.headings),
                    start=start,
                    end=end,
                    text=piece_text,
                    tokens=counter.count(piece_text),
                )
            )
    return chunks


def _group_sections(
    text: str, *, counter: TokenCounting, max_tokens: int, min_tokens: int
) -> list[_Group]:
    groups: list[_Group] = []
    for section in find_sections(text):
        headings = [section.heading] if section.heading else []
        if groups and _joinable(
            text, groups[-1], section.end, counter, max_tokens, min_tokens
        ):
            groups[-1].end = section.end
            groups[-1].headings.extend(headings)
        else:
            groups.append(_Group(section.start, section.end, headings))
    # A small last section joins the one before it rather than stand alone.
    if len(groups) > 1:
        last = groups[-1]
        if counter.count(text[last.start : last.end]) < min_tokens and _fits(
            text, groups[-2].start, last.end, counter, max_tokens
        ):
            groups[-2].end = last.end
            groups[-2].headings.extend(last.headings)
            groups.pop()
    return groups


def _joinable(
    text: str,
    group: _Group,
    end: int,
    counter: TokenCounting,
    max_tokens: int,
    min_tokens: int,
) -> bool:
    small = counter.count(text[group.start : group.end]) < min_tokens
    return small and _fits(text, group.start, end, counter, max_tokens)


def _fits(
    text: str, start: int, end: int, counter: TokenCounting, max_tokens: int
) -> bool:
    return counter.count(text[start:end]) <= max_tokens


def _split_span(
    text: str,
    start: int,
    end: int,
    *,
    counter: TokenCounting,
    max_tokens: int,
    overlap_tokens: int,
) -> list[tuple[int, int]]:
    if _fits(text, start, end, counter, max_tokens):
        return [(start, end)]
    units = _units(text, start, end, counter=counter, max_tokens=max_tokens)
    return _pack_units(
        text, units, counter=counter, max_tokens=max_tokens, overlap=overlap_tokens
    )


def _units(
    text: str,
    start: int,
    end: int,
    *,
    counter: TokenCounting,
    max_tokens: int,
    level: int = 0,
) -> list[tuple[int, int]]:
    """Contiguous spans covering [start, end), each within max_tokens.

    Paragraphs are tried first; a paragraph over budget is cut into
    sentences, a sentence into lines, and a line by token count.
    """
    if _fits(text, start, end, counter, max_tokens):
        return [(start, end)]
    if level == len(_BREAKS):
        return _split_by_tokens(text, start, end, counter, max_tokens)
    return [
        unit
        for piece_start, piece_end in _split_at(_BREAKS[level], text, start, end)
        for unit in _units(
            text,
            piece_start,
            piece_end,
            counter=counter,
            max_tokens=max_tokens,
            level=level + 1,
        )
    ]


def _split_at(
    pattern: re.Pattern[str], text: str, start: int, end: int
) -> list[tuple[int, int]]:
    """Spans of text[start:end] cut after each match of ``pattern``."""
    cuts = [m.end() for m in pattern.finditer(text, start, end) if m.end() < end]
    bounds = [start, *cuts, end]
    return [(a, b) for a, b in pairwise(bounds) if b > a]


def _split_by_tokens(
    text: str, start: int, end: int, counter: TokenCounting, max_tokens: int
) -> list[tuple[int, int]]:
    pieces = []
    while start < end:
        cut = _longest_fitting_end(text, start, end, counter, max_tokens)
        if cut < end:
            cut = _back_off_to_whitespace(text, start, cut)
        pieces.append((start, cut))
        start = cut
    return pieces


def _longest_fitting_end(
    text: str, start: int, end: int, counter: TokenCounting, max_tokens: int
) -> int:
    # Binary search on the end offset. Token counts are not strictly
    # monotone in the prefix length, but ``low`` always fits, so the result
    # is within budget even where the search misses a longer fit.
    low, high = start + 1, end
    if _fits(text, start, high, counter, max_tokens):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if _fits(text, start, middle, counter, max_tokens):
            low = middle
        else:
            high = middle
    return low


def _back_off_to_whitespace(text: str, start: int, cut: int) -> int:
    """Move a cut back to just after whitespace, if that keeps half the piece."""
    floor = start + (cut - start) // 2
    for position in range(cut, floor, -1):
        if _WHITESPACE.match(text, position - 1):
            return position
    return cut


def _pack_units(
    text: str,
    units: list[tuple[int, int]],
    *,
    counter: TokenCounting,
    max_tokens: int,
    overlap: int,
) -> list[tuple[int, int]]:
    """Join consecutive units greedily into pieces, each within max_tokens."""
    pieces: list[tuple[int, int]] = []
    start = units[0][0]
    index = 0
    while index < len(units):
        stop = index
        while stop < len(units) and _fits(
            text, start, units[stop][1], counter, max_tokens
        ):
            stop += 1
        if stop == index and start != units[index][0]:
            # The overlap left no room for a new unit: drop the overlap.
            start = units[index][0]
            continue
        # A unit is only over budget when one character is, which a
        # byte-level tokenizer and the 8-token floor rule out; take it whole
        # rather than loop.
        stop = max(stop, index + 1)
        end = units[stop - 1][1]
        pieces.append((start, end))
        index = stop
        start = end
        if overlap and index < len(units):
            start = _overlap_start(
                text,
                start_floor=pieces[-1][0],
                end=end,
                counter=counter,
                overlap_tokens=overlap,
            )
    return pieces


def _overlap_start(
    text: str,
    *,
    start_floor: int,
    end: int,
    counter: TokenCounting,
    overlap_tokens: int,
) -> int:
    """The earliest boundary after start_floor whose tail fits the overlap.

    Sentence ends are tried first, then line ends; ``end`` (no overlap)
    when neither gives a tail that fits.
    """
    for pattern in (_SENTENCE_BREAK, _LINE_BREAK):
        boundaries = [
            m.end()
            for m in pattern.finditer(text, start_floor, end)
            if start_floor < m.end() < end
        ]
        best = end
        for boundary in reversed(boundaries):
            if counter.count(text[boundary:end]) > overlap_tokens:
                break
            best = boundary
        if best < end:
            return best
    return end
