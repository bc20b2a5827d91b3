"""Faithfulness: a statement's drugs, doses, dates and numbers are in its notes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.stays import Chart, ChartNote, canonical_sha256, read_stays_file
from pipelines.support import (
    Vocabulary,
    check_statement,
    check_summary,
    diagnosis_terms,
    extract_facts,
    medication_names,
)
from schemas.summary import DischargeSummary, Statement
from tests.conftest import SHARED_DATA
from tests.helpers import notes_chart

CHEMO_STAY = "syn-enc-3d291b56-d41a-32b4-708a-f0d1ed9fb7f9"
LYMPHOMA_STAY = "mts-discharge-summary-lymphoma"


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


@pytest.fixture(scope="module")
def chemo() -> Chart:
    """A Synthea chemotherapy stay with structured medications."""
    return corpus_chart(CHEMO_STAY)


@pytest.fixture(scope="module")
def lymphoma() -> Chart:
    """A dictated discharge summary with doses and written dates."""
    return corpus_chart(LYMPHOMA_STAY)


def check(chart: Chart, text: str) -> tuple[bool, list[str]]:
    """Whether a statement citing the chart's first note is supported, and why not."""
    statement = Statement(text=text, note_ids=[chart.notes[0].note_id])
    result = check_statement(
        statement,
        note_texts={n.note_id: n.text for n in chart.notes},
        vocabulary=Vocabulary.from_chart(chart),
    )
    return result.supported, [f"{f.kind}:{f.normal}" for f in result.missing]


@pytest.mark.parametrize(
    "text",
    [
        "She received cisplatin 50 mg and paclitaxel 100 mg injections.",
        "Seen on 1986-11-04 for combined chemotherapy and radiation therapy.",
        "Seen on 11/04/1986.",
        "Seen on November 4, 1986.",
        "Seen in November 1986.",
        "She is a 59 year-old woman.",
        "Cisplatin 50mg was given.",
        "PACLITAXEL 100 MG injection.",
        "She takes acetaminophen 325 mg tablets.",
        "Nitrofurantoin 5 mg/mL oral suspension.",
        "Paclitaxel 0.1 g was given.",
        "She is married and has no known allergies.",
    ],
)
def test_true_statements_are_supported(chemo: Chart, text: str) -> None:
    """Facts written in the note, in any spacing, case or date format, pass."""
    assert check(chemo, text) == (True, [])


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("She received cisplatin 75 mg.", ["dose:75 mg"]),
        ("She received carboplatin 50 mg.", ["medication:carboplatin"]),
        (
            "Ibuprofen combined with chemotherapy and radiation.",
            ["medication:ibuprofen"],
        ),
        ("Seen on 1986-11-05.", ["date:1986-11-05"]),
        ("Seen on 11/05/1986.", ["date:1986-11-05"]),
        ("She is a 61 year-old woman.", ["number:61"]),
        ("She had 7 cycles of paclitaxel.", ["number:7"]),
        ("Paclitaxel 1 g was given.", ["dose:1000 mg"]),
        ("She was treated for sepsis.", ["diagnosis:sepsis"]),
    ],
)
def test_planted_false_statements_are_unsupported(
    chemo: Chart, text: str, missing: list[str]
) -> None:
    """A wrong dose, drug, date, number or diagnosis is named as missing."""
    assert check(chemo, text) == (False, missing)


@pytest.mark.parametrize(
    ("text", "supported"),
    [
        ("Admission is planned on August 18, 2008.", True),
        ("Admission is planned on 08/18/2008.", True),
        ("Admission is planned on 8/18/08.", True),
        ("Admission is planned on August 19, 2008.", False),
        ("She will continue Diflucan 200 mg daily.", True),
        ("She will continue Diflucan 400 mg daily.", False),
        ("Creatinine on the day of discharge was 0.9.", True),
        ("Creatinine on the day of discharge was 0.90.", True),
        ("Creatinine on the day of discharge was 1.9.", False),
        ("Lantus 35 units at bedtime.", True),
        ("Lantus 35 IU at bedtime.", True),
        ("Lantus 53 units at bedtime.", False),
    ],
)
def test_dictated_dates_doses_and_numbers_are_normalized(
    lymphoma: Chart, text: str, supported: bool
) -> None:
    """Written dates, units and decimals in a dictated summary match their forms."""
    assert check(lymphoma, text)[0] is supported


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        # Statements the embedded model wrote about stays of the corpus
        # whose cited notes say nothing of the kind.
        ("The details of the excerpt are incomplete.", "details, excerpt, incomplete"),
        ("The patient came and what happened.", "came, happened"),
        ("The patient underwent a cardiopulmonary bypass procedure.", None),
        ("No allergic reactions reported.", "allergic, reactions"),
        # Short ones, with no fact to check.
        ("Foemma.", "foemma"),
        ("Cesarean section", None),
    ],
)
def test_statements_not_worded_from_their_notes_are_unsupported(
    chemo: Chart, text: str, missing: str | None
) -> None:
    """Filler and invented narrative have no fact to check but fail on wording."""
    supported, reasons = check(chemo, text)

    assert not supported
    [wording] = [r for r in reasons if r.startswith("words:")]
    found, total = (int(n) for n in wording.removeprefix("words:").split("/"))
    assert found < total / 2
    if missing is not None:
        statement = Statement(text=text, note_ids=[chemo.notes[0].note_id])
        result = check_statement(
            statement, note_texts={n.note_id: n.text for n in chemo.notes}
        )
        assert [f.text for f in result.missing if f.kind == "words"] == [missing]


@pytest.mark.parametrize(
    "text",
    [
        # Other forms of the note's words: "combined chemotherapy and
        # radiation therapy", "married".
        "Chemotherapy combining radiation was given.",
        "She is a married woman receiving chemotherapy.",
        # Too few content words to judge the wording.
        "No allergies.",
    ],
)
def test_wording_from_the_note_in_other_forms_is_supported(
    chemo: Chart, text: str
) -> None:
    """Stems match ("combining" = "combined"); short statements are not judged."""
    assert check(chemo, text) == (True, [])


@pytest.mark.parametrize("text", ["no", "N/A", "It is so."])
def test_a_statement_that_says_nothing_checkable_is_unsupported(
    chemo: Chart, text: str
) -> None:
    """Neither a fact nor a content word: no note could back it."""
    assert check(chemo, text) == (False, ["words:0/0"])


@given(data=st.data())
def test_a_statement_made_of_its_notes_words_is_worded_from_them(
    data: st.DataObject,
) -> None:
    """Any sentence of words taken from the cited text passes the wording test."""
    note_text = (
        "Patient tolerated cisplatin infusion without nausea; creatinine"
        " remained stable and she was discharged home with daughter."
    )
    words = data.draw(
        st.lists(
            st.sampled_from(note_text.replace(";", "").split()), min_size=1, max_size=15
        )
    )
    statement = Statement(text=" ".join(words) + ".", note_ids=["n"])

    result = check_statement(statement, note_texts={"n": note_text})

    assert not [f for f in result.missing if f.kind == "words" and f.text]


def test_a_statement_citing_an_unknown_note_is_unsupported(chemo: Chart) -> None:
    """A citation outside the given notes makes the statement unsupported."""
    statement = Statement(text="Admitted.", note_ids=["no-such-note"])

    result = check_statement(statement, note_texts={})

    assert not result.supported
    assert result.unknown_note_ids == ("no-such-note",)


def test_the_summary_support_rate_counts_supported_statements(chemo: Chart) -> None:
    """Two of three statements supported gives a rate of 2/3, naming the third."""
    note_id = chemo.notes[0].note_id
    summary = DischargeSummary.model_validate(
        {
            "hospital_course": [
                {"text": "Cisplatin 50 mg was given.", "note_ids": [note_id]},
                {"text": "Cisplatin 500 mg was given.", "note_ids": [note_id]},
            ],
            "allergies": [{"text": "No known allergies.", "note_ids": [note_id]}],
        }
    )

    support = check_summary(summary, chart=chemo)

    assert support.support_rate == pytest.approx(2 / 3)
    [wrong] = support.unsupported
    assert (wrong.section, wrong.index) == ("hospital_course", 1)


def test_medication_displays_give_ingredients_and_brands() -> None:
    """Salts, forms and leading unit words are dropped; brands count too."""
    assert medication_names("Naproxen sodium 220 MG Oral Tablet") == ["naproxen"]
    assert medication_names(
        "Acetaminophen 325 MG / Oxycodone Hydrochloride 5 MG Oral Tablet [Percocet]"
    ) == ["percocet", "acetaminophen", "oxycodone"]
    assert medication_names("24 HR Metformin hydrochloride 500 MG Oral Tablet") == [
        "metformin"
    ]


def test_diagnosis_displays_lose_their_semantic_tag() -> None:
    """'(disorder)' is dropped and the part before a comma is a term too."""
    assert diagnosis_terms(
        "Non-small cell carcinoma of lung, TNM stage 1 (disorder)"
    ) == [
        "non small cell carcinoma of lung tnm stage 1",
        "non small cell carcinoma of lung",
    ]


@given(
    value=st.decimals(min_value=0, max_value=5000, places=2, allow_nan=False),
    unit=st.sampled_from(["mg", "MG", "mcg", "g", "mL", "units"]),
    space=st.sampled_from(["", " ", "  "]),
)
def test_a_dose_always_supports_itself_however_it_is_spaced(
    value: object, unit: str, space: str
) -> None:
    """A dose written in the note backs the same dose written with other spacing."""
    note_text = f"Given {value} {unit} today."
    statement = Statement(text=f"Took {value}{space}{unit.lower()}.", note_ids=["n"])

    result = check_statement(statement, note_texts={"n": note_text})

    assert result.supported, result.missing


@given(text=st.text(max_size=200))
def test_fact_extraction_never_fails_on_any_text(text: str) -> None:
    """Arbitrary text yields facts whose text is part of the input."""
    for fact in extract_facts(text):
        if fact.kind in ("dose", "date", "number"):
            assert fact.text in text


def test_a_date_from_the_note_header_supports_a_statement() -> None:
    """The prompt shows each note's charted date, so a statement may use it."""
    note = ChartNote(
        "n1", "Progress note", datetime(2024, 3, 12, 9, tzinfo=UTC), "Cough improved."
    )
    chart = notes_chart([note])
    summary = DischargeSummary.model_validate(
        {
            "hospital_course": [
                {"text": "Cough improved on 2024-03-12.", "note_ids": ["n1"]},
                {"text": "Cough improved on 2024-03-19.", "note_ids": ["n1"]},
            ]
        }
    )

    support = check_summary(summary, chart=chart)

    assert [s.supported for s in support.statements] == [True, False]
