"""Chunking: exact token budgets, exact offsets, note and section boundaries."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.chunking import Chunk, chunk_chart, chunk_notes, find_sections
from pipelines.stays import Chart, ChartNote, canonical_sha256, read_stays_file
from pipelines.tokens import TokenCounter
from tests.conftest import SHARED_DATA
from tests.strategies import chart_notes, chunk_budgets, note_texts

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None)


@pytest.fixture(scope="module")
def counter(model_dir: Path) -> TokenCounter:
    """The embedded model's exact token counter."""
    return TokenCounter.from_model_dir(model_dir)


def corpus_chart(stay_id: str) -> Chart:
    """A stay of the shared developer corpus, as the pipeline loads it."""
    stays = read_stays_file(SHARED_DATA / "stays.jsonl").stays
    record = next(stay for stay in stays if stay.stay_id == stay_id)
    return Chart(
        stay_id=record.stay_id,
        patient_id=record.patient_id,
        content_sha256=canonical_sha256(record),
        encounter_class=record.encounter_class,
        reason_for_visit=record.reason_for_visit,
        admit_time=record.admit_time,
        discharge_time=record.discharge_time,
        record=record.model_dump(mode="json", exclude={"notes"}),
        notes=tuple(
            ChartNote(n.note_id, n.note_type, n.charted_at, n.text)
            for n in record.notes
        ),
    )


def note(text: str, note_id: str = "n1") -> ChartNote:
    """A note with only an id and text."""
    return ChartNote(note_id=note_id, note_type=None, charted_at=None, text=text)


def covered(chunks: list[Chunk], note_id: str) -> set[int]:
    """Character positions of one note that some chunk holds."""
    return {i for c in chunks if c.note_id == note_id for i in range(c.start, c.end)}


@PROPERTY_SETTINGS
@given(notes=chart_notes(), budget=chunk_budgets())
def test_no_chunk_is_over_budget(
    counter: TokenCounter, notes: list[ChartNote], budget: dict[str, int]
) -> None:
    """Every chunk's exact token count, recounted, is at most max_tokens."""
    chunks = chunk_notes(notes, counter=counter, **budget)

    for chunk in chunks:
        assert counter.count(chunk.text) == chunk.tokens <= budget["max_tokens"]


@PROPERTY_SETTINGS
@given(notes=chart_notes(), budget=chunk_budgets())
def test_chunks_cover_every_character_with_exact_offsets(
    counter: TokenCounter, notes: list[ChartNote], budget: dict[str, int]
) -> None:
    """Each note is covered whole, in order, and text[start:end] is the chunk."""
    chunks = chunk_notes(notes, counter=counter, **budget)

    texts = {n.note_id: n.text for n in notes}
    assert [c.note_id for c in chunks] == sorted(
        (c.note_id for c in chunks), key=list(texts).index
    )
    for chunk in chunks:
        assert texts[chunk.note_id][chunk.start : chunk.end] == chunk.text
        assert chunk.start < chunk.end
    for n in notes:
        assert covered(chunks, n.note_id) == set(range(len(n.text)))
        starts = [c.start for c in chunks if c.note_id == n.note_id]
        assert starts == sorted(starts)


@settings(max_examples=30, deadline=None)
@given(notes=chart_notes(), budget=chunk_budgets())
def test_chunking_is_deterministic(
    counter: TokenCounter, notes: list[ChartNote], budget: dict[str, int]
) -> None:
    """The same notes and budget always give the same chunks."""
    first = chunk_notes(notes, counter=counter, **budget)
    second = chunk_notes(list(notes), counter=counter, **budget)

    assert first == second


@given(text=note_texts())
def test_sections_partition_the_note(text: str) -> None:
    """Sections are contiguous, non-empty and together are the whole text."""
    sections = find_sections(text)

    assert sections[0].start == 0 and sections[-1].end == len(text)
    for before, after in pairwise(sections):
        assert before.end == after.start
    assert all(s.start < s.end for s in sections)


def test_markdown_and_dictated_headings_are_found() -> None:
    """Markdown, caps-with-colon and caps-alone lines are headings; others not."""
    text = (
        "1976-01-19\n\n# Chief Complaint\n- Cough\n## Plan\nRest.\n"
        "HOSPITAL COURSE: Admitted.\n HISTORY OF PRESENT ILLNESS: Pain.\n"
        "DIAGNOSES ON ADMISSION  \n1. CVA.\nGI: Soft.\nNKDA\n"
        "Respiration: Stable.\nHe was seen by Dr. X: fine."
    )

    headings = [s.heading for s in find_sections(text)]

    assert headings == [
        None,
        "Chief Complaint",
        "Plan",
        "HOSPITAL COURSE",
        "HISTORY OF PRESENT ILLNESS",
        "DIAGNOSES ON ADMISSION",
        "GI",
    ]


def test_a_section_that_fits_is_one_chunk_starting_at_its_heading(
    counter: TokenCounter,
) -> None:
    """A dictated summary under a large budget gives one chunk per section."""
    chart = corpus_chart("mts-discharge-summary-lymphoma")

    chunks = chunk_chart(chart, counter=counter, max_tokens=2048)

    text = chart.notes[0].text
    sections = find_sections(text)
    assert [(c.start, c.end) for c in chunks] == [(s.start, s.end) for s in sections]
    medication = next(c for c in chunks if c.heading == "DISCHARGE MEDICATIONS")
    assert medication.text.startswith("DISCHARGE MEDICATIONS:")


def test_an_oversized_section_is_cut_at_paragraphs_first(
    counter: TokenCounter,
) -> None:
    """Three paragraphs that each fit, but not together, become three chunks."""
    paragraph = ("The patient improved on treatment and walked. " * 5).strip()
    text = "HOSPITAL COURSE:\n" + "\n\n".join([paragraph] * 3)
    budget = counter.count(f"HOSPITAL COURSE:\n{paragraph}\n\n")

    chunks = chunk_notes([note(text)], counter=counter, max_tokens=budget)

    assert len(chunks) == 3
    assert all(c.heading == "HOSPITAL COURSE" for c in chunks)
    assert [c.start for c in chunks[1:]] == [
        i + 2 for i in range(len(text)) if text.startswith("\n\n", i)
    ]


def test_a_long_sentence_is_cut_by_tokens_at_whitespace(
    counter: TokenCounter,
) -> None:
    """A sentence with no break is cut by token count, after a space."""
    text = " ".join(["cisplatin"] * 200)

    chunks = chunk_notes([note(text)], counter=counter, max_tokens=30)

    assert len(chunks) > 1
    assert all(c.tokens <= 30 for c in chunks)
    assert all(c.text.endswith(" ") for c in chunks[:-1])


def test_pieces_of_a_split_section_overlap_within_the_overlap_budget(
    counter: TokenCounter,
) -> None:
    """Each later piece starts with whole sentences from the end of the last."""
    chart = corpus_chart("mts-multiple-medical-problems-discharge-summary")

    chunks = chunk_chart(chart, counter=counter, max_tokens=128, overlap_tokens=32)

    text = chart.notes[0].text
    pairs = [
        (a, b)
        for a, b in pairwise(chunks)
        if a.heading == b.heading == "HOSPITAL COURSE"
    ]
    assert pairs
    for before, after in pairs:
        assert after.start < before.end
        assert counter.count(text[after.start : before.end]) <= 32


def test_small_sections_join_the_next_one_and_keep_their_headings(
    counter: TokenCounter,
) -> None:
    """With min_tokens, an empty heading joins the next section's chunk."""
    text = "# Assessment and Plan\n\n## Plan\nContinue lisinopril 10 mg daily.\n"

    joined = chunk_notes([note(text)], counter=counter, max_tokens=64, min_tokens=16)
    apart = chunk_notes([note(text)], counter=counter, max_tokens=64)

    assert [c.headings for c in joined] == [("Assessment and Plan", "Plan")]
    assert [c.heading for c in apart] == ["Assessment and Plan", "Plan"]


def test_chunks_never_cross_a_note_boundary(counter: TokenCounter) -> None:
    """Two tiny notes give two chunks even when both would fit in one."""
    notes = [note("Fever.", "a"), note("Cough.", "b")]

    chunks = chunk_notes(notes, counter=counter, max_tokens=512, min_tokens=64)

    assert [(c.note_id, c.text) for c in chunks] == [("a", "Fever."), ("b", "Cough.")]
    assert chunks[0].chunk_id == "a@0-6"


@pytest.mark.parametrize(
    "budget",
    [
        {"max_tokens": 7},
        {"max_tokens": 64, "overlap_tokens": 64},
        {"max_tokens": 64, "overlap_tokens": -1},
    ],
)
def test_an_impossible_budget_is_refused(
    counter: TokenCounter, budget: dict[str, Any]
) -> None:
    """A budget below 8 tokens or an overlap not below it raises ValueError."""
    with pytest.raises(ValueError, match="tokens"):
        chunk_notes([note("Fever.")], counter=counter, **budget)


@settings(max_examples=50, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=300))
def test_any_text_chunks_within_budget_with_a_tiny_budget(text: str) -> None:
    """Even raw unicode under the smallest budget stays within it."""
    fake = _CharCounter()

    chunks = chunk_notes([note(text or "x")], counter=fake, max_tokens=8)

    assert all(fake.count(c.text) <= 8 for c in chunks)
    assert "".join(c.text for c in chunks) == (text or "x")


class _CharCounter:
    """Counts UTF-8 bytes, the worst case of a byte-level tokenizer."""

    def count(self, text: str, *, allow_special: bool = False) -> int:
        """One token per byte."""
        return len(text.encode("utf-8"))
