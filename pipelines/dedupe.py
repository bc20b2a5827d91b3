"""Collapsing copy-forward bloat: notes and paragraphs seen more than once.

Charts repeat themselves: a templated note is written again at every
visit, and a paragraph is copied from note to note with a word or two
changed. Each group of such repeats becomes one ``Passage``: one
representative text and every place (note id and character offsets) where
a member of the group appeared, so a summary can still cite all of them.

Rules:

- Text is compared after normalizing: lower case, words only (runs of
  letters and digits), so whitespace, punctuation and case never matter.
- Exact duplicates (the same normalized words) always collapse.
- Near duplicates collapse when the Jaccard similarity of their sets of
  word shingles (``shingle_words`` consecutive words, default 3) is at
  least ``threshold`` (default 0.8). With 3-word shingles, changing one word
  in a 40-word paragraph removes at most 3 of its 38 shingles and adds as
  many, so the Jaccard is about 0.85 and it still collapses at 0.8; two
  changed words give about 0.73 and keep it apart. Units with fewer than
  ``min_words`` words (default 8) only collapse when exact: a few shingles
  say too little.
- Clusters are formed greedily: units are visited from the last to the first
  (``keep="last"``, the default, since the latest copy is the most current)
  or from the first to the last, and each joins the first cluster whose
  representative is similar enough. So every member is within the threshold
  of its representative, but two members need not be of each other.
- Candidates are found with MinHash and LSH banding (128 hashes in 32 bands
  of 4, seeded, so results are deterministic) and then checked with the
  exact Jaccard, so the threshold is exact; a pair can only be missed when
  its Jaccard is low (below about 0.5 the chance of being a candidate
  falls off; at 0.8 it is over 0.999).

Limits: a near-duplicate's differing words ("improved" for "stable", one
more drug in a list) are lost from the text that is kept; only its position
survives in ``occurrences``. By default a near duplicate must hold the same numbers
(``numbers_must_match``), so changed doses, dates and ages are kept apart;
use exact-only collapsing (``threshold=1.0``) where every changed word
matters. Shingles are a set, so two lists that differ only in how often a
line repeats (Synthea's chemotherapy plans) are near duplicates. Repeats
inside one paragraph are not collapsed.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipelines.stays import ChartNote

_WORD = re.compile(r"[^\W_]+")
_PARAGRAPH = re.compile(r"\S(?:.*?\S)?(?=\n[ \t]*\n|\s*\Z)", re.DOTALL)

_HASHES = 128
_BANDS = 32
_ROWS = _HASHES // _BANDS
_PRIME = (1 << 61) - 1
_RNG = np.random.default_rng(20240611)
_A = _RNG.integers(1, _PRIME, size=_HASHES, dtype=np.uint64)
_B = _RNG.integers(0, _PRIME, size=_HASHES, dtype=np.uint64)

Keep = Literal["first", "last"]


@dataclass(frozen=True)
class Occurrence:
    """Where one copy of a passage sits: ``note.text[start:end]``."""

    note_id: str
    start: int
    end: int


@dataclass(frozen=True)
class Passage:
    """One kept text and every place it, or a near copy of it, appeared.

    ``occurrences`` are in chart order and include the representative.
    """

    text: str
    representative: Occurrence
    occurrences: tuple[Occurrence, ...]

    @property
    def note_ids(self) -> list[str]:
        """Ids of the notes holding a copy, in chart order, each once."""
        return list(dict.fromkeys(o.note_id for o in self.occurrences))

    @property
    def copies(self) -> int:
        """How many times this passage appeared."""
        return len(self.occurrences)


@dataclass(frozen=True)
class Deduplication:
    """The passages left after collapsing, and what collapsing removed."""

    passages: list[Passage]
    #: Characters of all units before collapsing.
    input_chars: int
    #: Characters of the representatives.
    kept_chars: int
    #: Units that collapsed into another with exactly the same words.
    exact_duplicates: int
    #: Units that collapsed into another as near duplicates.
    near_duplicates: int

    @property
    def collapse_ratio(self) -> float:
        """Share of the input characters removed, from 0.0 to 1.0."""
        if not self.input_chars:
            return 0.0
        return 1.0 - self.kept_chars / self.input_chars


@dataclass(frozen=True)
class _Unit:
    occurrence: Occurrence
    text: str
    words: tuple[str, ...]


def normalize_words(text: str) -> tuple[str, ...]:
    """The words of ``text``, lower case, without punctuation or spacing."""
    return tuple(word.lower() for word in _WORD.findall(text))


def shingles(words: Sequence[str], *, size: int = 3) -> frozenset[str]:
    """Every run of ``size`` consecutive words (the whole text if shorter)."""
    if len(words) <= size:
        return frozenset([" ".join(words)])
    return frozenset(
        " ".join(words[i : i + size]) for i in range(len(words) - size + 1)
    )


def jaccard(left: frozenset[str], right: frozenset[str]) -> float:
    """Size of the intersection over size of the union (1.0 for two empties)."""
    if not left and not right:
        return 1.0
    return len(left & right) / len(left | right)


def dedupe_notes(
    notes: Iterable[ChartNote],
    *,
    threshold: float = 0.8,
    shingle_words: int = 3,
    min_words: int = 8,
    keep: Keep = "last",
    numbers_must_match: bool = True,
) -> Deduplication:
    """Collapse whole notes that repeat another note exactly or nearly.

    Args:
        notes: Notes in chart order.
        threshold: Least shingle Jaccard for a near duplicate, 0.0 to 1.0;
            1.0 collapses exact duplicates only. Default 0.8.
        shingle_words: Words per shingle. Default 3.
        min_words: Units with fewer words only collapse when exact.
            Default 8.
        keep: Which copy is kept as the text: "last" (default) or "first".
        numbers_must_match: Near duplicates collapse only when they hold the
            same set of words with digits (doses, dates, ages, counts).
            Default True.

    Raises:
        ValueError: If threshold is outside 0.0 to 1.0 or shingle_words is
            below 1.
    """
    units = [_note_unit(note) for note in notes]
    return _dedupe(
        [u for u in units if u.words],
        threshold=threshold,
        shingle_words=shingle_words,
        min_words=min_words,
        keep=keep,
        numbers_must_match=numbers_must_match,
    )


def dedupe_paragraphs(
    notes: Iterable[ChartNote],
    *,
    threshold: float = 0.8,
    shingle_words: int = 3,
    min_words: int = 8,
    keep: Keep = "last",
    numbers_must_match: bool = True,
) -> Deduplication:
    """Collapse paragraphs (text between blank lines) across all notes.

    A paragraph's offsets leave out the blank lines around it. Options are
    those of dedupe_notes.
    """
    units = [unit for note in notes for unit in _paragraph_units(note)]
    return _dedupe(
        [u for u in units if u.words],
        threshold=threshold,
        shingle_words=shingle_words,
        min_words=min_words,
        keep=keep,
        numbers_must_match=numbers_must_match,
    )


def _note_unit(note: ChartNote) -> _Unit:
    occurrence = Occurrence(note.note_id, 0, len(note.text))
    return _Unit(occurrence, note.text, normalize_words(note.text))


def _paragraph_units(note: ChartNote) -> list[_Unit]:
    return [
        _Unit(
            Occurrence(note.note_id, m.start(), m.end()),
            m.group(),
            normalize_words(m.group()),
        )
        for m in _PARAGRAPH.finditer(note.text)
    ]


def _dedupe(
    units: list[_Unit],
    *,
    threshold: float,
    shingle_words: int,
    min_words: int,
    keep: Keep,
    numbers_must_match: bool,
) -> Deduplication:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is {threshold}; it must be 0.0 to 1.0")
    if shingle_words < 1:
        raise ValueError(f"shingle_words is {shingle_words}; it must be 1 or more")
    order = range(len(units)) if keep == "first" else range(len(units) - 1, -1, -1)
    members: dict[int, list[int]] = {}
    exact_index: dict[tuple[str, ...], int] = {}
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    sets: dict[int, frozenset[str]] = {}
    numbers = [_numbers(unit.words) for unit in units]
    exact = near = 0
    for index in order:
        unit = units[index]
        leader = exact_index.get(unit.words)
        if leader is not None:
            exact += 1
        elif threshold < 1.0 and len(unit.words) >= min_words:
            sets[index] = shingles(unit.words, size=shingle_words)
            keys = _band_keys(sets[index])
            leader = _similar_leader(
                index,
                keys,
                buckets,
                sets,
                threshold=threshold,
                numbers=numbers if numbers_must_match else None,
            )
            if leader is not None:
                near += 1
            else:
                for key in keys:
                    buckets[key].append(index)
        if leader is None:
            leader = index
            members[index] = []
        members[leader].append(index)
        # Later exact copies of any member join the member's cluster.
        exact_index.setdefault(unit.words, leader)
    # Passages read in the order their first copy appears in the chart.
    leaders = sorted(members, key=lambda leader: min(members[leader]))
    passages = [_passage(units, leader, members[leader]) for leader in leaders]
    return Deduplication(
        passages=passages,
        input_chars=sum(len(u.text) for u in units),
        kept_chars=sum(len(p.text) for p in passages),
        exact_duplicates=exact,
        near_duplicates=near,
    )


def _similar_leader(
    index: int,
    keys: list[tuple[int, bytes]],
    buckets: dict[tuple[int, bytes], list[int]],
    sets: dict[int, frozenset[str]],
    *,
    threshold: float,
    numbers: list[frozenset[str]] | None,
) -> int | None:
    candidates = {c for key in keys for c in buckets.get(key, ())}
    # Leaders were made in visiting order, which runs away from ``index``,
    # so the farthest candidate is the earliest made. Trying the earliest
    # first makes ties break the same way on every run.
    for candidate in sorted(candidates, key=lambda c: abs(c - index), reverse=True):
        if numbers is not None and numbers[index] != numbers[candidate]:
            continue
        if jaccard(sets[index], sets[candidate]) >= threshold:
            return candidate
    return None


def _numbers(words: tuple[str, ...]) -> frozenset[str]:
    return frozenset(word for word in words if any(c.isdigit() for c in word))


def _band_keys(shingle_set: frozenset[str]) -> list[tuple[int, bytes]]:
    hashed = np.array(
        [
            int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest())
            for s in shingle_set
        ],
        dtype=np.uint64,
    ) % np.uint64(_PRIME)
    # (a * x + b) mod p in 64 bits wraps around; the wrapped values are still
    # a fixed pseudo-random permutation-like hash, which is all MinHash needs.
    signature = ((np.outer(_A, hashed) + _B[:, None]) % np.uint64(_PRIME)).min(axis=1)
    rows = signature.reshape(_BANDS, _ROWS)
    return [(band, rows[band].tobytes()) for band in range(_BANDS)]


def _passage(units: list[_Unit], leader: int, indexes: list[int]) -> Passage:
    occurrences = tuple(units[i].occurrence for i in sorted(indexes))
    return Passage(
        text=units[leader].text,
        representative=units[leader].occurrence,
        occurrences=occurrences,
    )
