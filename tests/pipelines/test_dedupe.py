"""Collapsing repeated notes and paragraphs while keeping every citation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.dedupe import (
    dedupe_notes,
    dedupe_paragraphs,
    jaccard,
    shingles,
)
from pipelines.stays import ChartNote
from tests.conftest import SHARED_DATA
from tests.strategies import chart_notes

CHEMO_PATIENT = "syn-129c6ac7-8d06-89de-ad63-0204a93e76c3"
COURSE = (
    "The patient was admitted for the third cycle of chemotherapy for non-small"
    " cell carcinoma of the lung. She tolerated the infusion well with mild nausea"
    " that resolved with ondansetron. Appetite and oral intake were adequate and"
    " she was walking in the hallway without help on the morning of discharge."
)


def note(note_id: str, text: str) -> ChartNote:
    """A note with only an id and text."""
    return ChartNote(note_id=note_id, note_type=None, charted_at=None, text=text)


def chemo_notes(*, encounter_class: str | None = None) -> list[ChartNote]:
    """The 90 notes of the repeated-chemotherapy patient, in chart order."""
    with (SHARED_DATA / "longitudinal.jsonl").open(encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines]
    record = next(r for r in records if r["patient_id"] == CHEMO_PATIENT)
    return [
        note(n["note_id"], n["text"])
        for n in record["notes"]
        if encounter_class in (None, n["encounter_class"])
    ]


def test_exact_duplicate_notes_collapse_into_one_citing_both() -> None:
    """Two notes with the same words (spacing and case aside) become one."""
    notes = [note("a", COURSE), note("b", "  " + COURSE.upper() + "\n")]

    result = dedupe_notes(notes)

    [passage] = result.passages
    assert passage.note_ids == ["a", "b"]
    assert passage.representative.note_id == "b"
    assert (result.exact_duplicates, result.near_duplicates) == (1, 0)


def test_a_copy_with_a_few_words_changed_collapses_as_a_near_duplicate() -> None:
    """Changing one word of a long note still collapses at the 0.8 default."""
    changed = COURSE.replace("mild nausea", "mild vomiting")
    notes = [note("a", COURSE), note("b", changed)]

    result = dedupe_notes(notes)

    [passage] = result.passages
    assert passage.note_ids == ["a", "b"]
    assert passage.text == changed
    assert (result.exact_duplicates, result.near_duplicates) == (0, 1)


def test_keep_first_keeps_the_oldest_copy_as_the_text() -> None:
    """With keep="first", the representative is the first copy in the chart."""
    changed = COURSE.replace("mild nausea", "mild vomiting")

    result = dedupe_notes([note("a", COURSE), note("b", changed)], keep="first")

    assert result.passages[0].text == COURSE


def test_distinct_notes_are_kept_apart() -> None:
    """Notes about different things each stay a passage of their own."""
    other = (
        "Follow up with oncology in two weeks for blood counts and review of the"
        " restaging scan. Call the clinic for fever, bleeding or shortness of breath."
    )

    result = dedupe_notes([note("a", COURSE), note("b", other)])

    assert [p.note_ids for p in result.passages] == [["a"], ["b"]]
    assert result.collapse_ratio == 0.0


def test_a_changed_number_keeps_near_duplicates_apart() -> None:
    """A different dose is not copy-forward: by default it is not collapsed."""
    first = COURSE + " Discharged on ondansetron 4 mg as needed."
    second = COURSE + " Discharged on ondansetron 8 mg as needed."

    kept = dedupe_notes([note("a", first), note("b", second)])
    collapsed = dedupe_notes(
        [note("a", first), note("b", second)], numbers_must_match=False
    )

    assert len(kept.passages) == 2
    assert len(collapsed.passages) == 1


def test_threshold_one_collapses_exact_duplicates_only() -> None:
    """At threshold 1.0 a one-word change keeps the copies apart."""
    changed = COURSE.replace("mild nausea", "mild vomiting")

    result = dedupe_notes([note("a", COURSE), note("b", changed)], threshold=1.0)

    assert len(result.passages) == 2


def test_paragraphs_collapse_across_notes_with_exact_offsets() -> None:
    """A paragraph copied into a later note is kept once, cited in both."""
    first = "# Allergies\nNo Known Allergies.\n\n" + COURSE
    second = COURSE + "\n\n\n# Plan\nDischarge home."

    result = dedupe_paragraphs([note("a", first), note("b", second)])

    texts = {"a": first, "b": second}
    course = next(p for p in result.passages if p.copies == 2)
    assert course.note_ids == ["a", "b"]
    for place in course.occurrences:
        assert texts[place.note_id][place.start : place.end] == COURSE
    assert len(result.passages) == 3


def test_an_invalid_threshold_is_refused() -> None:
    """A threshold outside 0.0 to 1.0 raises ValueError."""
    with pytest.raises(ValueError, match="threshold"):
        dedupe_notes([note("a", COURSE)], threshold=1.5)


@settings(max_examples=60, deadline=None)
@given(notes=chart_notes(max_notes=4))
def test_every_paragraph_lands_in_exactly_one_passage(notes: list[ChartNote]) -> None:
    """Occurrences point at real text, no paragraph is lost or counted twice."""
    result = dedupe_paragraphs(notes)

    texts = {n.note_id: n.text for n in notes}
    places = [o for p in result.passages for o in p.occurrences]
    assert len(places) == len(set(places))
    for passage in result.passages:
        assert passage.representative in passage.occurrences
        for place in passage.occurrences:
            copy = texts[place.note_id][place.start : place.end]
            assert copy == copy.strip() and copy
    assert result == dedupe_paragraphs(list(notes))


@given(words=st.lists(st.sampled_from(["a", "b", "c", "50", "mg"]), max_size=12))
def test_shingle_jaccard_is_one_only_for_the_same_shingles(words: list[str]) -> None:
    """A text is fully similar to itself, and less to itself plus a new word."""
    same = shingles(words)
    longer = shingles([*words, "zzz"])

    assert jaccard(same, same) == 1.0
    assert jaccard(same, longer) < 1.0


def test_copy_forward_of_the_chemotherapy_patient_collapses() -> None:
    """The 90 notes lose most of their text; exact repeats alone remove 60%."""
    notes = chemo_notes()

    exact = dedupe_paragraphs(notes, threshold=1.0)
    near = dedupe_paragraphs(notes)
    whole = dedupe_notes(notes)

    # Measured: 832 paragraphs -> 205 (61.5% of characters) exact only,
    # -> 174 (84.0%) at 0.8. Whole notes never collapse: each starts with
    # its own date, a number that must match.
    assert sum(p.copies for p in exact.passages) == 832
    assert (len(exact.passages), len(near.passages)) == (205, 174)
    assert 0.60 < exact.collapse_ratio < near.collapse_ratio
    assert near.collapse_ratio > 0.80
    assert len(whole.passages) == 90
    allergies = next(p for p in near.passages if p.text.startswith("# Allergies"))
    assert allergies.copies == 90


def test_repeated_chemotherapy_plans_collapse_into_few_passages() -> None:
    """The 45 inpatient stays' procedure and medication lists mostly collapse."""
    notes = chemo_notes(encounter_class="inpatient")

    result = dedupe_paragraphs(notes)

    # Measured: 448 paragraphs -> 63; 84,350 -> 5,379 characters (93.6%).
    assert len(result.passages) == 63
    assert result.collapse_ratio > 0.9
    plans = [p for p in result.passages if "chemotherapy" in p.text]
    assert max(p.copies for p in plans) >= 20
