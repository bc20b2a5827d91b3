"""Longitudinal summaries with a scripted engine: ingest, reuse, support, show."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from pipelines.longitudinal import check_longitudinal
from pipelines.show import render_summary
from pipelines.stays import parse_stay_lines, read_stays_file, stays_from_longitudinal
from pipelines.store import ChartStore
from pipelines.summarize import Summarizer
from pipelines.tokens import TokenCounter
from schemas.longitudinal import LongitudinalSummary
from schemas.tables import JobState, SummaryKind
from tests.conftest import SHARED_DATA
from tests.helpers import (
    ScriptedEngine,
    scripted_summarizer,
    section_answer,
    stay_dict,
    summary_json,
)

#: Words only in stay a's note and only in its stored summary.
NOTE_CANARY = "ZEBRANOTE"
SUMMARY_CANARY = "QUOKKASUM"


def _record() -> dict[str, object]:
    """A longitudinal record: two encounters and one note without one."""
    note = {"note_type": "Encounter note", "text": "# Plan\nRest."}
    return {
        "record_kind": "longitudinal_record",
        "stay_id": "rec-1",
        "patient_id": "p-1",
        "patient": {"sex": "female", "birth_date": "1950-01-01", "age_at_admission": 9},
        "encounters": [
            {
                "encounter_id": "e1",
                "encounter_class": "inpatient",
                "start": "2001-01-01",
            },
            {
                "encounter_id": "e2",
                "encounter_class": "emergency",
                "start": "2002-01-01",
            },
        ],
        "notes": [
            {**note, "note_id": "n1", "encounter_id": "e1", "charted_at": "2001-01-01"},
            {**note, "note_id": "n2", "encounter_id": "e1", "charted_at": "2001-01-02"},
            {**note, "note_id": "n3", "encounter_id": "e2", "charted_at": "2002-01-01"},
            {**note, "note_id": "n4", "charted_at": "2003-05-01"},
        ],
        "diagnoses": [
            {"display": "Asthma", "encounter_id": "e1"},
            {"display": "Sprain", "encounter_id": "e2"},
        ],
        "medications": [],
        "procedures": [],
    }


def test_a_longitudinal_record_becomes_one_stay_per_encounter() -> None:
    """Notes group by encounter; a note without one is a stay of its own."""
    stays = stays_from_longitudinal(_record())

    assert [s["stay_id"] for s in stays] == ["e1", "e2", "rec-1:n4"]
    assert [len(s["notes"]) for s in stays] == [2, 1, 1]
    assert [d["display"] for d in stays[0]["diagnoses"]] == ["Asthma"]
    assert stays[1]["encounter_class"] == "emergency"
    assert stays[2]["admit_time"] == "2003-05-01"
    assert "age_at_admission" not in stays[0]["patient"]


def test_a_longitudinal_line_ingests_as_the_patients_stays() -> None:
    """parse_stay_lines accepts the record and validates each stay."""
    parsed = parse_stay_lines([json.dumps(_record())])

    assert parsed.errors == []
    assert {s.patient_id for s in parsed.stays} == {"p-1"}
    assert len(parsed.stays) == 3


def test_the_shared_longitudinal_records_all_ingest() -> None:
    """The three real records split into stays with no rejected line."""
    parsed = read_stays_file(SHARED_DATA / "longitudinal.jsonl")

    assert parsed.errors == []
    assert len({s.patient_id for s in parsed.stays}) == 3
    assert len(parsed.stays) == 472


def _summarizer(
    store: ChartStore, engine: ScriptedEngine, model_dir: Path
) -> Summarizer:
    return scripted_summarizer(store, engine, model_dir, context_tokens=4096)


def _three_stays(store: ChartStore) -> None:
    note_a = f"# Assessment\nDiagnosed with asthma. {NOTE_CANARY} wheeze noted."
    stays = [
        stay_dict(
            "a",
            notes=[{"note_id": "a-n1", "note_type": "H&P", "text": note_a}],
        ),
        stay_dict(
            "b",
            admit_time="2021-01-01T10:00:00+00:00",
            discharge_time="2021-01-03T10:00:00+00:00",
        ),
        stay_dict(
            "c",
            admit_time="2022-01-01T10:00:00+00:00",
            discharge_time="2022-01-03T10:00:00+00:00",
        ),
    ]
    store.ingest(parse_stay_lines([json.dumps(s) for s in stays]).stays)


def test_a_longitudinal_job_reuses_stored_stay_summaries(
    sqlite_store: ChartStore, model_dir: Path
) -> None:
    """Stay a is read from its summary, never from its notes; b and c from notes."""
    # Given stay a has a stored discharge summary
    _three_stays(sqlite_store)
    statement = f"Diagnosed with asthma and {SUMMARY_CANARY} wheeze."
    first = ScriptedEngine(
        lambda _r: (
            summary_json("N1").replace("Admitted for acute bronchitis.", statement),
            "stop",
        )
    )
    [(discharge_job, _)] = sqlite_store.create_jobs(
        kind="discharge", stay_ids=["a"], queue="q"
    )
    assert (
        _summarizer(sqlite_store, first, model_dir).process_job(discharge_job).state
        == JobState.SUCCEEDED
    )
    # When the patient's longitudinal job runs
    engine = ScriptedEngine(
        section_answer(
            {
                "problems": "Started amoxicillin 500 mg.",
                "medication_changes": "Amoxicillin 500 mg was started.",
                "key_results_and_procedures": "Amoxicillin 500 mg started.",
                "open_issues": "Started on amoxicillin 500 mg.",
            }
        )
    )
    [(job_id, created)] = sqlite_store.create_patient_jobs(
        kind="longitudinal", patient_ids=["t-patient-1"], queue="q"
    )
    outcome = _summarizer(sqlite_store, engine, model_dir).process_job(job_id)

    # Then no request quoted stay a's notes, and its summary was quoted
    counter = TokenCounter.from_model_dir(model_dir)
    prompts = [counter.decode(r.prompt_token_ids) for r in engine.requests]
    assert created and prompts
    assert not any(NOTE_CANARY in p for p in prompts)
    assert any(SUMMARY_CANARY in p for p in prompts)
    assert engine.batches == [len(engine.requests)]
    assert all(len(r.prompt_token_ids) + r.max_tokens <= 4096 for r in engine.requests)
    found = sqlite_store.find_patient_summary("t-patient-1")
    assert found is not None
    summary, job = found
    assert (summary.kind, summary.stay_id, job.route) == (
        SummaryKind.LONGITUDINAL,
        None,
        "chunked",
    )
    parsed = LongitudinalSummary.model_validate(summary.payload)
    # The first label is stay a's note (cited by its summary), which never
    # mentions amoxicillin; sections whose first label is b's or c's note
    # are backed by it.
    assert parsed.problems[0].stay_ids == ["a"]
    assert summary.support is not None
    flags = {(s["section"], s["supported"]) for s in summary.support["statements"]}
    assert ("problems", False) in flags
    assert 0.0 < (summary.support_rate or 0.0) < 1.0
    assert outcome.support_rate == summary.support_rate


def test_show_marks_unsupported_items_of_a_longitudinal_summary(
    sqlite_store: ChartStore, model_dir: Path
) -> None:
    """The panel names the stays and flags what the notes do not back."""
    _three_stays(sqlite_store)
    engine = ScriptedEngine(section_answer("Given warfarin 5 mg."))
    [(job_id, _)] = sqlite_store.create_patient_jobs(
        kind="longitudinal", patient_ids=["t-patient-1"], queue="q"
    )
    _summarizer(sqlite_store, engine, model_dir).process_job(job_id)
    found = sqlite_store.find_patient_summary("t-patient-1")
    assert found is not None

    console = Console(record=True, width=200)
    console.print(render_summary(*found))

    text = console.export_text()
    assert "Longitudinal summary" in text
    assert "stays [a]" in text
    assert "[unsupported: dose 5 mg; medication warfarin]" in text
    assert "support 0%" in text


def test_support_of_a_longitudinal_item_reads_its_cited_notes(
    sqlite_store: ChartStore,
) -> None:
    """A fact in the cited note is supported; one elsewhere is not."""
    _three_stays(sqlite_store)
    charts = sqlite_store.load_patient_charts("t-patient-1")
    summary = LongitudinalSummary.model_validate(
        {
            "problems": [
                {
                    "text": "Amoxicillin 500 mg.",
                    "note_ids": ["b-n1"],
                    "stay_ids": ["b"],
                },
                {
                    "text": "Amoxicillin 500 mg.",
                    "note_ids": ["a-n1"],
                    "stay_ids": ["a"],
                },
            ]
        }
    )

    support = check_longitudinal(summary, charts=charts)

    assert [s.supported for s in support.statements] == [True, False]
    assert [c.stay_id for c in charts] == ["a", "b", "c"]
