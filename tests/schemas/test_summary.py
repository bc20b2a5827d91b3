"""The summary schema: citations, bounds and the decoding schema."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.summary import (
    MAX_STATEMENT_CHARS,
    DischargeSummary,
    Statement,
    discharge_json_schema,
    drop_repeated_clauses,
    drop_repeated_statements,
    words_key,
)
from tests.helpers import summary_json


def test_a_summary_citing_notes_of_the_stay_validates() -> None:
    """Citations inside the stay pass."""
    summary = DischargeSummary.model_validate_json(
        summary_json("n1"), context={"note_ids": {"n1", "n2"}}
    )

    assert summary.hospital_course[0].note_ids == ["n1"]


def test_a_citation_outside_the_stay_is_rejected() -> None:
    """Validation rejects a note id that is not in the stay."""
    with pytest.raises(ValidationError, match="not in the stay"):
        DischargeSummary.model_validate_json(
            summary_json("n9"), context={"note_ids": {"n1"}}
        )


def test_a_statement_without_citations_or_text_is_rejected() -> None:
    """Every statement needs text and at least one note id."""
    with pytest.raises(ValidationError):
        Statement(text="x", note_ids=[])
    with pytest.raises(ValidationError):
        Statement(text="   ", note_ids=["n1"])


def test_bounds_stop_an_overlong_statement_and_section() -> None:
    """Strings and lists are bounded so a looping model cannot grow them forever."""
    with pytest.raises(ValidationError):
        Statement(text="x" * (MAX_STATEMENT_CHARS + 1), note_ids=["n1"])
    many = [{"text": "x", "note_ids": ["n1"]}] * 6
    with pytest.raises(ValidationError):
        DischargeSummary.model_validate({"hospital_course": many})


def test_the_decoding_schema_narrows_citations_to_the_stay() -> None:
    """The JSON schema sent to the engine only allows the stay's note ids."""
    schema = discharge_json_schema(["n1", "n2"])
    items = schema["$defs"]["Statement"]["properties"]["note_ids"]["items"]

    assert items == {"enum": ["n1", "n2"]}
    assert set(schema["required"]) == set(DischargeSummary.model_fields)
    assert discharge_json_schema(["x"])["$defs"]["Statement"]["properties"]["note_ids"][
        "items"
    ] == {"enum": ["x"]}


statements = st.builds(
    Statement,
    text=st.text(min_size=1, max_size=MAX_STATEMENT_CHARS).filter(str.strip),
    note_ids=st.lists(st.sampled_from(["n1", "n2", "n3"]), min_size=1, max_size=3),
)


@given(
    st.builds(
        DischargeSummary,
        hospital_course=st.lists(statements, min_size=1, max_size=5),
        discharge_medications=st.lists(statements, max_size=8),
    )
)
def test_summaries_round_trip_through_json(summary: DischargeSummary) -> None:
    """Dumping and re-reading a summary gives the same summary."""
    text = summary.model_dump_json()

    again = DischargeSummary.model_validate_json(
        text, context={"note_ids": {"n1", "n2", "n3"}}
    )

    assert again == summary
    assert json.loads(text)["hospital_course"]


def test_a_looping_statement_keeps_each_clause_once() -> None:
    """What a small model's loop looks like, and what is stored."""
    looped = Statement(
        text="Metformin 500 mg tablets, 10mg tablets, 10mg tablets, 10Mg Tablets.",
        note_ids=["n1"],
    )
    sentences = drop_repeated_clauses(
        "No known allergies. No known intolerances. No known intolerances."
    )

    assert looped.text == "Metformin 500 mg tablets, 10mg tablets"
    assert sentences == "No known allergies. No known intolerances."


def test_decimals_and_distinct_clauses_are_left_alone() -> None:
    """A period inside 2.5 is not a clause break; different doses differ."""
    text = "Amlodipine 2.5 mg daily, lisinopril 2.5 mg daily; amlodipine 5 mg."

    assert drop_repeated_clauses(text) == text


@given(
    st.lists(
        st.sampled_from(["aspirin 81 mg", "Aspirin 81 MG", "daily", "stable", "x"]),
        min_size=1,
        max_size=8,
    )
)
def test_dropping_repeats_keeps_every_distinct_clause_once(clauses: list[str]) -> None:
    """Each distinct clause survives exactly once, in first-seen order."""
    out = drop_repeated_clauses(", ".join(clauses))
    kept = out.split(", ")

    assert [k.lower() for k in kept] == list(dict.fromkeys(c.lower() for c in clauses))
    assert drop_repeated_clauses(out) == out


def _said(text: str) -> Statement:
    return Statement(text=text, note_ids=["n1"])


def test_a_sentence_in_every_section_is_kept_once_where_it_came_first() -> None:
    """Later copies go, in any case or punctuation; other statements stay."""
    stock = "This stay was a 30 day inpatient stay."
    sections = {
        "hospital_course": [_said("Admitted for pneumonia."), _said(stock)],
        "discharge_diagnoses": [_said("this stay was a 30-day inpatient stay")],
        "follow_up": [_said(stock), _said("See the GP in 1 week."), _said(stock)],
    }

    kept, dropped = drop_repeated_statements(sections)

    assert dropped == 3
    assert {name: [s.text for s in found] for name, found in kept.items()} == {
        "hospital_course": ["Admitted for pneumonia.", stock],
        "discharge_diagnoses": [],
        "follow_up": ["See the GP in 1 week."],
    }


@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "c"]),
        st.lists(st.sampled_from(["One.", "one", "Two!", "Three x.", "four"])),
    )
)
def test_each_statement_is_said_once_in_first_seen_order(
    texts: dict[str, list[str]],
) -> None:
    """Every distinct statement survives exactly once; a second pass drops none."""
    sections = {name: [_said(t) for t in found] for name, found in texts.items()}

    kept, dropped = drop_repeated_statements(sections)

    flat = [words_key(s.text) for found in kept.values() for s in found]
    every = [words_key(t) for found in texts.values() for t in found]
    assert flat == list(dict.fromkeys(every))
    assert dropped == len(every) - len(flat)
    assert drop_repeated_statements(kept)[1] == 0


def test_a_statement_with_a_fact_may_repeat_in_another_section() -> None:
    """A dose under hospital course stays under discharge medications too,
    but not in a third section: that is a loop."""
    dose = "Started metoprolol 25 mg daily."
    sections = {
        "hospital_course": [_said(dose)],
        "discharge_medications": [_said(dose), _said(dose)],
        "follow_up": [_said(dose)],
    }

    kept, dropped = drop_repeated_statements(
        sections, may_repeat=lambda statement: "mg" in statement.text
    )

    assert dropped == 2
    assert {name: [s.text for s in found] for name, found in kept.items()} == {
        "hospital_course": [dose],
        "discharge_medications": [dose],
        "follow_up": [],
    }
