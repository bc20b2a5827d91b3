"""The chunked route with a scripted engine: requests, citations, assembly."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pipelines.chunked import (
    DISCHARGE_SECTIONS,
    ChunkedSummary,
    SectionResult,
    assemble_discharge,
    merge_parts,
    section_json_schema,
    summarize_chart_chunked,
)
from pipelines.errors import CompletionInvalidError, NeedsChunkedRouteError
from pipelines.stays import Chart, ChartNote
from pipelines.tokens import TokenCounter
from schemas.settings import PipelineSettings
from schemas.summary import Statement
from tests.helpers import ScriptedEngine, notes_chart, section_answer

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
    return notes_chart(
        chart_notes,
        admit_time=datetime(2020, 1, 1, tzinfo=UTC),
        discharge_time=datetime(2020, 1, 14, tzinfo=UTC),
    )


def _summarize(
    chart: Chart,
    engine: ScriptedEngine,
    counter: TokenCounter,
    *,
    settings: PipelineSettings | None = None,
    context_tokens: int = 1500,
) -> ChunkedSummary:
    """The chunked route with BM25 alone, seed 0 and request prefix "job"."""
    return summarize_chart_chunked(
        chart,
        engine=engine,
        counter=counter,
        embedder=None,
        context_tokens=context_tokens,
        settings=settings or PipelineSettings(),
        seed=0,
        request_prefix="job",
    )


def test_every_request_fits_the_context_and_cites_only_its_own_notes(
    token_counter: TokenCounter,
) -> None:
    """Prompt plus completion budget within the context; enum = quoted notes."""
    chart = _long_chart()
    engine = ScriptedEngine(section_answer())
    settings = PipelineSettings()

    result = _summarize(chart, engine, token_counter, settings=settings)

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

    _summarize(_long_chart(), engine, token_counter)

    medications = [
        token_counter.decode(r.prompt_token_ids)
        for r in engine.requests
        if "-discharge_medications-" in r.request_id
    ]
    assert any(PLANTED in prompt for prompt in medications)


def test_copied_forward_notes_are_quoted_once(token_counter: TokenCounter) -> None:
    """Twelve identical progress notes are quoted as one excerpt."""
    engine = ScriptedEngine(section_answer())

    _summarize(_long_chart(), engine, token_counter)

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

    result = _summarize(_long_chart(), engine, token_counter)

    assert result.failed_sections == ["discharge_medications"]
    assert result.summary.discharge_medications == []
    assert engine.batches[1:] == [1, 1]


def test_a_context_with_no_room_for_a_chunk_is_refused(
    token_counter: TokenCounter,
) -> None:
    """The route raises instead of sending a request that cannot fit."""
    engine = ScriptedEngine(lambda _request: pytest.fail("engine must not run"))

    with pytest.raises(NeedsChunkedRouteError, match="effective context 600"):
        _summarize(_long_chart(), engine, token_counter, context_tokens=600)


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


def _varied_chart(notes: int = 6) -> Chart:
    """A stay whose notes each name another drug, so nothing collapses."""
    drugs = ["aspirin", "metoprolol", "lisinopril", "warfarin", "insulin", "heparin"]
    chart_notes = [
        ChartNote(
            f"v{i}",
            "Progress note",
            datetime(2020, 2, 1 + i, tzinfo=UTC),
            f"# Medications\n{drugs[i % len(drugs)].title()} {10 + i} mg daily"
            f" was continued on day {i + 1}.\n\n# Plan\nReview on day {i + 2}"
            f" with the {drugs[(i + 1) % len(drugs)]} level.\n\n# Hospital Course\n"
            f"Admitted with chest pain; course stable on day {i + 1}.\n",
        )
        for i in range(notes)
    ]
    return notes_chart(
        chart_notes,
        stay_id="s2",
        admit_time=datetime(2020, 2, 1, tzinfo=UTC),
        discharge_time=datetime(2020, 2, 9, tzinfo=UTC),
    )


def _answer_by_part(request):  # type: ignore[no-untyped-def]
    """One statement naming the request's section and part, citing its note."""
    section = request.json_schema["required"][0]
    items = request.json_schema["properties"][section]["items"]
    alias = items["properties"]["note_ids"]["items"]["enum"][0]
    part = request.request_id.split("-")[-2]
    return json.dumps(
        {section: [{"note_ids": [alias], "text": f"{section} {part}."}]}
    ), ("stop")


def test_a_sentence_every_section_returns_is_kept_once_in_the_first(
    token_counter: TokenCounter,
) -> None:
    """Separate section requests giving one sentence: hospital course keeps it."""
    engine = ScriptedEngine(section_answer("Admitted for acute bronchitis."))

    result = _summarize(_long_chart(), engine, token_counter)

    said = [(name, s.text) for name, _, s in result.summary.statements()]
    assert said == [("hospital_course", "Admitted for acute bronchitis.")]
    assert len({r.request_id.split("-")[-3] for r in engine.requests}) > 1


def test_a_section_is_written_one_excerpt_per_request_and_merged(
    token_counter: TokenCounter,
) -> None:
    """chunk_top_k requests per section, one note each; merged in rank order."""
    chart = _varied_chart()
    engine = ScriptedEngine(_answer_by_part)
    settings = PipelineSettings(chunk_top_k=4, chunk_sources_per_request=1)

    result = _summarize(chart, engine, token_counter, settings=settings)

    medications = [
        r for r in engine.requests if "-discharge_medications-" in r.request_id
    ]
    assert len(medications) == 4
    for request in medications:
        items = request.json_schema["properties"]["discharge_medications"]["items"]
        assert len(items["properties"]["note_ids"]["items"]["enum"]) == 1
    statements = result.summary.discharge_medications
    assert [s.text for s in statements] == [
        f"discharge_medications {part}." for part in range(4)
    ]
    assert len({s.note_ids[0] for s in statements}) == 4
    assert engine.batches == [len(engine.requests)]


def test_one_failing_request_costs_only_its_own_statements(
    token_counter: TokenCounter,
) -> None:
    """Part 1 of medications never validates; the other parts still count."""

    def answer(request):  # type: ignore[no-untyped-def]
        if "-discharge_medications-1-" in request.request_id:
            return "{not json", "stop"
        return _answer_by_part(request)

    engine = ScriptedEngine(answer)

    result = _summarize(
        _varied_chart(),
        engine,
        token_counter,
        settings=PipelineSettings(chunk_top_k=3, chunk_sources_per_request=1),
    )

    assert result.failed_sections == []
    assert [s.text for s in result.summary.discharge_medications] == [
        "discharge_medications 0.",
        "discharge_medications 2.",
    ]
    assert engine.batches[1:] == [1, 1]


def test_grouped_requests_quote_several_excerpts(token_counter: TokenCounter) -> None:
    """chunk_sources_per_request=4 packs a section's four chunks in one request."""
    engine = ScriptedEngine(_answer_by_part)

    _summarize(
        _varied_chart(),
        engine,
        token_counter,
        settings=PipelineSettings(chunk_top_k=4, chunk_sources_per_request=4),
    )

    [request] = [
        r for r in engine.requests if "-discharge_medications-" in r.request_id
    ]
    items = request.json_schema["properties"]["discharge_medications"]["items"]
    assert len(items["properties"]["note_ids"]["items"]["enum"]) == 4


def test_merge_takes_each_part_in_turn_drops_repeats_and_keeps_the_bound() -> None:
    """Round-robin over parts; a repeat differing in case and punctuation goes."""
    a1 = Statement(text="Aspirin 81 mg daily.", note_ids=["a"])
    a2 = Statement(text="Heparin was stopped.", note_ids=["a"])
    b1 = Statement(text="aspirin 81 mg daily", note_ids=["b"])
    b2 = Statement(text="Warfarin 5 mg.", note_ids=["b"])
    c1 = Statement(text="Insulin at night.", note_ids=["c"])

    merged = merge_parts([[a1, a2], [b1, b2], [c1]], limit=3)

    assert merged == [a1, c1, a2]
    assert merge_parts([[a1, a2], [b1, b2], [c1]], limit=10) == [a1, c1, a2, b2]


def test_section_schema_asks_for_citations_first_and_each_label_once() -> None:
    """note_ids precede text; no more citations than labels."""
    schema = section_json_schema("allergies", ["N1"], max_items=2, required=False)

    statement = schema["properties"]["allergies"]["items"]
    assert list(statement["properties"]) == ["note_ids", "text"]
    assert statement["required"] == ["note_ids", "text"]
    assert statement["properties"]["note_ids"]["maxItems"] == 1
    assert schema["properties"]["allergies"]["maxItems"] == 2
