"""A summary across all of a patient's stays, in time order.

A stay that already has a current discharge summary is read from that
summary (its statements and their citations), never from its notes again;
the other stays are read from their notes. Either way the record becomes
sources (``chunked.Source``) that each longitudinal section retrieves from,
and every section is written as the chunked route writes one: a request per
group of retrieved sources, each fitting the effective context, all sent
together so the engine batches them, their statements merged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.chunked import (
    GenerationTotals,
    SectionResult,
    SectionSpec,
    Source,
    build_section_prompts,
    chunk_budget_tokens,
    generate_sections,
    note_label,
    note_sources,
    request_overhead_tokens,
    section_statements,
)
from pipelines.engine import Engine
from pipelines.retrieval import Embedder
from pipelines.stays import Chart
from pipelines.support import (
    SummarySupport,
    Vocabulary,
    check_statement,
    evidence_text,
)
from pipelines.tokens import TokenCounter
from schemas.longitudinal import LongitudinalSummary
from schemas.settings import PipelineSettings
from schemas.summary import DischargeSummary, Statement

LONGITUDINAL_SYSTEM_PROMPT = """\
You write one section of a summary of a patient's records across many
visits, for clinicians. Excerpts are in time order and labelled with dates.
Use only facts written in the excerpts. Never guess or add facts.
Each statement is one short sentence, says when (the year or date), and
lists the notes it comes from, by the labels N1, N2, ... shown above each
excerpt. Write [] when the excerpts say nothing for this section.
Answer with JSON only."""

#: Sections of LongitudinalSummary; a request writes at most 3 items, since
#: its completion budget is small, and the merged section keeps up to the
#: schema's bound. Change with schemas/longitudinal.py.
LONGITUDINAL_SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec(
        "problems",
        "diagnoses and problems: assessment, history of present illness,"
        " chronic condition, diagnosed with, disorder",
        "Problems and diagnoses and how each evolved over time, with years.",
        max_items=3,
        max_section_items=6,
        required=True,
    ),
    SectionSpec(
        "medication_changes",
        "medications prescribed, started, stopped or changed: dose mg tablet,"
        " prescriptions, discharge medications",
        "Medications started, changed or stopped, with dates and doses.",
        max_items=3,
        max_section_items=6,
    ),
    SectionSpec(
        "key_results_and_procedures",
        "procedures performed and key test results: surgery, imaging, biopsy,"
        " laboratory results, chemotherapy, procedures conducted",
        "Key test results and procedures, with dates.",
        max_items=3,
        max_section_items=6,
    ),
    SectionSpec(
        "open_issues",
        "ongoing problems and plan: follow-up, pending results, still active,"
        " referral, next visit, assessment and plan",
        "Problems still active or follow-up still due at the last stay.",
        max_items=3,
        max_section_items=4,
    ),
)
#: Stays apart in ``Source.position``: sources sort by stay, then within it.
_STAY_STRIDE = 1_000_000


@dataclass(frozen=True)
class LongitudinalResult:
    """A longitudinal summary and how it was made."""

    summary: LongitudinalSummary
    #: Optional sections that never produced a valid list (left empty).
    failed_sections: list[str]
    totals: GenerationTotals
    #: Stays read from their stored discharge summary.
    reused_stays: list[str]
    #: Stays read from their notes.
    note_stays: list[str]


def summarize_patient(
    charts: Sequence[Chart],
    *,
    reused: Mapping[str, Mapping[str, Any]],
    engine: Engine,
    counter: TokenCounter,
    embedder: Embedder | None,
    context_tokens: int,
    settings: PipelineSettings,
    seed: int,
    request_prefix: str,
    on_round: Callable[[], None] = lambda: None,
    specs: Sequence[SectionSpec] = LONGITUDINAL_SECTIONS,
) -> LongitudinalResult:
    """The longitudinal summary of one patient's stays.

    Args:
        charts: The patient's stays in time order.
        reused: Stored discharge summary payloads by stay id; those stays
            are read from them instead of their notes.
        engine: The generation engine.
        counter: Exact token counts of the served model.
        embedder: Dense retrieval; None ranks by BM25 alone.
        context_tokens: The effective context every request must fit.
        settings: Completion budget, top_k, attempts.
        seed: Base sampling seed.
        request_prefix: Makes request ids unique.
        on_round: Called before each round of requests.
        specs: The sections to write.

    Raises:
        NeedsChunkedRouteError: The effective context is too short for even
            a small excerpt.
        CompletionInvalidError: No valid problems list came back.
    """
    preamble = patient_preamble(charts)
    overhead = request_overhead_tokens(
        specs,
        preamble=preamble,
        counter=counter,
        system_prompt=LONGITUDINAL_SYSTEM_PROMPT,
    )
    chunk_tokens = chunk_budget_tokens(
        context_tokens=context_tokens,
        overhead_tokens=overhead,
        completion_tokens=settings.chunk_completion_tokens,
    )
    sources = patient_sources(
        charts, reused=reused, counter=counter, chunk_tokens=chunk_tokens
    )
    prompts = build_section_prompts(
        specs,
        sources,
        embedder=embedder,
        preamble=preamble,
        counter=counter,
        context_tokens=context_tokens,
        settings=settings,
        system_prompt=LONGITUDINAL_SYSTEM_PROMPT,
    )
    results, totals = generate_sections(
        engine,
        prompts,
        settings=settings,
        seed=seed,
        request_prefix=request_prefix,
        on_round=on_round,
    )
    summary, failed = assemble_longitudinal(results, specs=specs, charts=charts)
    return LongitudinalResult(
        summary,
        failed,
        totals,
        reused_stays=[c.stay_id for c in charts if c.stay_id in reused],
        note_stays=[c.stay_id for c in charts if c.stay_id not in reused],
    )


def patient_sources(
    charts: Sequence[Chart],
    *,
    reused: Mapping[str, Mapping[str, Any]],
    counter: TokenCounter,
    chunk_tokens: int,
) -> list[Source]:
    """Sources of a patient's record in time order.

    A stay with a reused summary gives one source per non-empty summary
    section; every other stay gives the chunks of its notes, with repeats
    across stays collapsed.
    """
    stay_index = {chart.stay_id: i for i, chart in enumerate(charts)}
    sources = []
    for chart in charts:
        if chart.stay_id in reused:
            sources.extend(_summary_sources(chart, reused[chart.stay_id], stay_index))
    notes = [
        (chart.stay_id, note, f"{note_label(note)}, {_visit(chart)}")
        for chart in charts
        if chart.stay_id not in reused
        for note in chart.notes
    ]
    if notes:
        from_notes = note_sources(notes, counter=counter, chunk_tokens=chunk_tokens)
        sources.extend(
            dataclasses.replace(
                source,
                position=stay_index[source.stay_id] * _STAY_STRIDE + source.position,
            )
            for source in from_notes
        )
    return sorted(sources, key=lambda s: s.position)


def assemble_longitudinal(
    results: Mapping[str, SectionResult],
    *,
    specs: Sequence[SectionSpec],
    charts: Sequence[Chart],
) -> tuple[LongitudinalSummary, list[str]]:
    """Sections into one longitudinal summary; stay ids come from note ids.

    Raises:
        CompletionInvalidError: A required section has no valid statement.
    """
    stay_of = stay_of_note(charts)
    sections, failed = section_statements(results, specs=specs, what="longitudinal")
    body = {
        name: [
            {
                "text": s.text,
                "note_ids": s.note_ids,
                "stay_ids": list(dict.fromkeys(stay_of[n] for n in s.note_ids)),
            }
            for s in statements
        ]
        for name, statements in sections.items()
    }
    summary = LongitudinalSummary.model_validate(
        body, context={"stay_of_note": stay_of}
    )
    return summary, failed


def check_longitudinal(
    summary: LongitudinalSummary, *, charts: Sequence[Chart]
) -> SummarySupport:
    """Check each item against the text of the notes it cites."""
    note_texts = {n.note_id: evidence_text(n) for chart in charts for n in chart.notes}
    vocabularies = [Vocabulary.from_chart(chart) for chart in charts]
    vocabulary = Vocabulary(
        frozenset().union(*(v.medications for v in vocabularies)),
        frozenset().union(*(v.diagnoses for v in vocabularies)),
    )
    return SummarySupport(
        [
            check_statement(
                Statement(text=item.text, note_ids=item.note_ids),
                note_texts=note_texts,
                vocabulary=vocabulary,
                section=section,
                index=index,
            )
            for section, index, item in summary.items()
        ]
    )


def stay_of_note(charts: Sequence[Chart]) -> dict[str, str]:
    """Stay id by note id, over all of a patient's notes."""
    return {note.note_id: chart.stay_id for chart in charts for note in chart.notes}


def patient_preamble(charts: Sequence[Chart]) -> str:
    """The header quoted above a patient's excerpts."""
    dated = [c.admit_time for c in charts if c.admit_time is not None]
    span = f" from {min(dated):%Y} to {max(dated):%Y}" if dated else ""
    return f"Patient record: {len(charts)} stays{span}, excerpts in time order."


def _visit(chart: Chart) -> str:
    kind = chart.encounter_class or "visit"
    return f"{kind} stay" if "stay" not in kind else kind


def _summary_sources(
    chart: Chart, payload: Mapping[str, Any], stay_index: Mapping[str, int]
) -> list[Source]:
    summary = DischargeSummary.model_validate(payload)
    when = f"{chart.admit_time:%Y-%m-%d} " if chart.admit_time else ""
    sources = []
    for offset, name in enumerate(type(summary).model_fields):
        statements = tuple(getattr(summary, name))
        if not statements:
            continue
        sources.append(
            Source(
                source_id=f"summary:{chart.stay_id}:{name}",
                stay_id=chart.stay_id,
                position=stay_index[chart.stay_id] * _STAY_STRIDE + offset,
                label=f"{when}{_visit(chart)}, {name.replace('_', ' ')}",
                text=" ".join(s.text for s in statements),
                statements=statements,
            )
        )
    return sources
