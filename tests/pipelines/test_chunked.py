"""The chunked route with a scripted engine: requests, citations, assembly."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipelines.chunked import (
    DISCHARGE_SECTIONS,
    SectionResult,
    assemble_discharge,
    summarize_chart_chunked,
)
from pipelines.errors import CompletionInvalidError, NeedsChunkedRouteError
from pipelines.stays import Chart, ChartNote
from pipelines.tokens import TokenCounter
from schemas.settings import PipelineSettings
from schemas.summary import Statement
from tests.helpers import ScriptedEngine, section_answer

PLANTED = "Dabigatran 150 mg twice daily was started for atrial fibrillation."
FILLER = (
    "# Progress\nPatient seen on rounds. Vital signs were stable overnight."
    " Ambulating in the hallway with physical therapy. Tolerating a regular"
    " diet. Pain controlled on the current regimen. Continue to monitor.\n\n"
)


def _long_chart(notes: int = 12) -> Chart:
    """A stay of many dull notes with one fact planted in the middle one."""
    chart_notes = []
    for i in range(notes):
        text = FILLER * 3
        if i == notes // 2:
            text += f"# Medications\n{PLANTED}\n"
        chart_notes.append(
            ChartNote(
                f"n{i}",
                "Progress note",
                datetime(2020, 1, 1 + i, tzinfo=UTC),
                text,
            )
        )
    return Chart(
        stay_id="s1",
        patient_id="p1",
        content_sha256="0" * 64,
        encounter_class="inpatient",
        reason_for_visit=None,
        admit_time=datetime(2020, 1, 1, tzinfo=UTC),
        discharge_time=datetime(2020, 1, 14, tzinfo=UTC),
        record={},
        notes=tuple(chart_notes),
    )


def test_every_request_fits_the_context_and_cites_only_its_own_notes(
    token_counter: TokenCounter,
) -> None:
    """Prompt plus completion budget within the context; enum = quoted notes."""
    chart = _long_chart()
    engine = ScriptedEngine(section_answer())
    settings = PipelineSettings()

    result = summarize_chart_chunked(
        chart,
        engine=engine,
        counter=token_counter,
        embedder=None,
        context_tokens=1500,
        settings=settings,
        seed=0,
        request_prefix="job",
    )

    assert chart_tokens(chart, token_counter) > 1500
    assert engine.batches == [len(engine.requests)]
    for request in engine.requests:
        assert len(request.prompt_token_ids) + request.max_tokens <= 1500
        assert request.max_tokens == settings.chunk_completion_tokens
        assert request.json_schema is not None
        section = request.json_schema["required"][0]
        items = request.json_schema["properties"][section]["items"]
        aliases = items["properties"]["note_ids"]["items"]["enum"]
        prompt = token_counter.decode(request.prompt_token_ids)
        assert all(f"=== {alias}: " in prompt for alias in aliases)
        assert len(aliases) < len(chart.notes)
    assert result.summary.hospital_course[0].note_ids[0] in chart.note_ids
    assert result.failed_sections == []


def test_a_fact_planted_mid_stay_reaches_the_medications_request(
    token_counter: TokenCounter,
) -> None:
    """Retrieval puts the middle note's medication line in that section's prompt."""
    engine = ScriptedEngine(section_answer())

    summarize_chart_chunked(
        _long_chart(),
        engine=engine,
        counter=token_counter,
        embedder=None,
        context_tokens=1500,
        settings=PipelineSettings(),
        seed=0,
        request_prefix="job",
    )

    [request] = [
        r for r in engine.requests if r.request_id.endswith("discharge_medications-1")
    ]
    assert PLANTED in token_counter.decode(request.prompt_token_ids)


def test_copied_forward_notes_are_quoted_once(token_counter: TokenCounter) -> None:
    """Twelve identical progress notes are quoted as one excerpt."""
    engine = ScriptedEngine(section_answer())

    summarize_chart_chunked(
        _long_chart(),
        engine=engine,
        counter=token_counter,
        embedder=None,
        context_tokens=1500,
        settings=PipelineSettings(),
        seed=0,
        request_prefix="job",
    )

    for request in engine.requests:
        prompt = token_counter.decode(request.prompt_token_ids)
        # 36 copies in the chart: one kept chunk of three, plus the one
        # before the planted fact in its own chunk.
        assert prompt.count("Patient seen on rounds.") <= 4


def test_an_invalid_section_is_retried_and_a_failing_one_left_empty(
    token_counter: TokenCounter,
) -> None:
    """Medications never validate: retried, then left empty and reported."""
    valid = section_answer()

    def answer(request):  # type: ignore[no-untyped-def]
        if "discharge_medications" in request.request_id:
            return "{not json", "stop"
        return valid(request)

    engine = ScriptedEngine(answer)

    result = summarize_chart_chunked(
        _long_chart(),
        engine=engine,
        counter=token_counter,
        embedder=None,
        context_tokens=1500,
        settings=PipelineSettings(),
        seed=0,
        request_prefix="job",
    )

    assert result.failed_sections == ["discharge_medications"]
    assert result.summary.discharge_medications == []
    assert engine.batches[1:] == [1, 1]


def test_a_context_with_no_room_for_a_chunk_is_refused(
    token_counter: TokenCounter,
) -> None:
    """The route raises instead of sending a request that cannot fit."""
    engine = ScriptedEngine(lambda _request: pytest.fail("engine must not run"))

    with pytest.raises(NeedsChunkedRouteError, match="effective context 600"):
        summarize_chart_chunked(
            _long_chart(),
            engine=engine,
            counter=token_counter,
            embedder=None,
            context_tokens=600,
            settings=PipelineSettings(),
            seed=0,
            request_prefix="job",
        )


def test_assembly_needs_a_hospital_course() -> None:
    """No valid hospital course means no summary."""
    results = {"hospital_course": SectionResult("hospital_course", None, ["x"])}

    with pytest.raises(CompletionInvalidError, match="hospital_course"):
        assemble_discharge(results, specs=DISCHARGE_SECTIONS, chart=_long_chart())


def test_assembly_validates_citations_like_the_single_pass_route() -> None:
    """A statement citing a note outside the stay is rejected."""
    results = {
        "hospital_course": SectionResult(
            "hospital_course", [Statement(text="Admitted.", note_ids=["other"])]
        )
    }

    with pytest.raises(ValueError, match="not in the stay"):
        assemble_discharge(results, specs=DISCHARGE_SECTIONS, chart=_long_chart())


def chart_tokens(chart: Chart, counter: TokenCounter) -> int:
    """Tokens of all note text of a chart."""
    return sum(counter.count(note.text) for note in chart.notes)
