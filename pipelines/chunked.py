"""The chunked route: records longer than the effective context.

A chart is cut into chunks at note and heading boundaries (``chunking``),
repeated chunks collapse into one that remembers every note it appeared in
(``dedupe``), and each summary section retrieves its chunks (``retrieval``,
BM25 and MiniLM fused). The section is then written map-reduce style: each
request quotes a few of the retrieved chunks (one by default), and the
statements of all of a section's requests are merged, repeats dropped,
round-robin by retrieval rank, up to the section's bound. Small models
answer a lookup in a short excerpt far better than in a long one, which is
what the calibration measures. Citations in a request are narrowed to the
notes its chunks come from. Every request is measured in exact tokens and
fits the effective context with its completion budget, or it is not sent.
All requests of a job go to the engine at once, so it batches them.
Longitudinal summaries use the same parts; their sources may also be stored
per-stay summaries.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import TypeAdapter, ValidationError

from pipelines.chunking import Chunk, chunk_notes
from pipelines.dedupe import dedupe_notes
from pipelines.engine import CompletionRequest, Engine
from pipelines.errors import CompletionInvalidError, NeedsChunkedRouteError
from pipelines.prompts import Prompt
from pipelines.retrieval import (
    SECTION_QUERIES,
    ChunkIndex,
    Embedder,
    retrieve_for_sections,
)
from pipelines.stays import Chart, ChartNote
from pipelines.support import has_checkable_fact
from pipelines.tokens import TokenCounter, neutralize_special_tokens
from schemas.settings import PipelineSettings
from schemas.summary import (
    DischargeSummary,
    Statement,
    drop_repeated_statements,
    words_key,
)

log = structlog.get_logger("chartsum.chunked")

#: Largest chunk (tokens): longer chunks crowd out other notes' chunks.
MAX_CHUNK_TOKENS = 512
#: Smallest useful chunk (tokens); a context with no room for a few of them
#: cannot be summarized by this route either.
MIN_CHUNK_TOKENS = 64
#: Chunks a request should be able to hold; sets the chunk size.
CHUNKS_PER_REQUEST = 4
#: Tokens kept free per chunk for its "=== N3: ... ===" header line.
HEADER_TOKENS = 40
#: Sections shorter than this many tokens join the next (see chunk_notes).
MIN_SECTION_TOKENS = 48
#: Most statements one section request may write.
REQUEST_ITEMS = 3

SECTION_SYSTEM_PROMPT = """\
You write one section of a summary of hospital records for clinicians.
Use only facts written in the excerpts. Never guess or add facts.
Each statement is one short sentence and lists the notes it comes from,
by the labels N1, N2, ... shown above each excerpt.
Write [] when the excerpts say nothing for this section.
Answer with JSON only."""

_STATEMENTS = TypeAdapter(list[Statement])
_STATEMENT_SCHEMA = Statement.model_json_schema()


@dataclass(frozen=True)
class SectionSpec:
    """One section to write: its query, instruction and bounds."""

    name: str
    query: str
    instruction: str
    #: Most statements one request may write.
    max_items: int
    #: Most statements the merged section keeps (the schema's bound).
    max_section_items: int
    required: bool = False


@dataclass(frozen=True)
class Source:
    """A piece of the record a section request may quote.

    Either a chunk of one note (``note_id`` set; its text is quoted as
    written) or a stored summary of a stay (``statements`` set; each line is
    quoted with the notes it cites).
    """

    source_id: str
    stay_id: str
    #: Order in the record (time order for a patient, chart order for a stay).
    position: int
    label: str
    #: What retrieval searches: the chunk text, or the statements' text.
    text: str
    note_id: str | None = None
    #: Other notes holding a copy of this chunk (collapsed repeats).
    also_in: tuple[str, ...] = ()
    statements: tuple[Statement, ...] = ()

    @property
    def note_ids(self) -> list[str]:
        """The notes this source lets a statement cite."""
        if self.note_id is not None:
            return [self.note_id]
        return list(dict.fromkeys(n for s in self.statements for n in s.note_ids))

    def as_chunk(self) -> Chunk:
        """The source as a chunk for the retrieval indexes."""
        return Chunk(self.source_id, None, (), 0, len(self.text), self.text, 0)


@dataclass(frozen=True)
class SectionPrompt:
    """One request of a section: the prompt, its sources and its schema.

    A section has one request per group of retrieved sources; ``part``
    numbers them in retrieval order, best first.
    """

    spec: SectionSpec
    prompt: Prompt
    sources: tuple[Source, ...]
    json_schema: dict[str, Any]
    part: int = 0


@dataclass(frozen=True)
class SectionResult:
    """A section's statements, or None with the reasons every try failed."""

    section: str
    statements: list[Statement] | None
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationTotals:
    """Token counts and time of all requests of one job."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    #: Largest single request, prompt plus completion budget.
    max_request_tokens: int
    duration_ms: int


@dataclass(frozen=True)
class ChunkedSummary:
    """A discharge summary made on the chunked route."""

    summary: DischargeSummary
    #: Optional sections that never produced a valid list (left empty).
    failed_sections: list[str]
    totals: GenerationTotals


def _section_bound(name: str) -> int:
    info = DischargeSummary.model_fields[name]
    return int(min(m.max_length for m in info.metadata if hasattr(m, "max_length")))


#: The discharge sections, with bounds no larger than DischargeSummary's.
DISCHARGE_SECTIONS: tuple[SectionSpec, ...] = tuple(
    SectionSpec(
        name=name,
        query=SECTION_QUERIES[name],
        instruction=str(info.description),
        # A request's completion budget is small, so its list is shorter.
        max_items=min(REQUEST_ITEMS, _section_bound(name)),
        max_section_items=_section_bound(name),
        required=name == "hospital_course",
    )
    for name, info in DischargeSummary.model_fields.items()
)

_embedder_lock = threading.Lock()
_embedder: Embedder | None = None


def shared_embedder() -> Embedder:
    """The process's MiniLM embedder, loaded on first use (10-20 s) and shared.

    Safe to call from many threads: the first caller loads it, the others
    wait for it.
    """
    global _embedder
    with _embedder_lock:
        if _embedder is None:
            from pipelines.retrieval import MiniLmEmbedder

            started = time.perf_counter()
            _embedder = MiniLmEmbedder()
            log.info(
                "embedder_loaded",
                duration_ms=int((time.perf_counter() - started) * 1000),
            )
        return _embedder


def chunk_budget_tokens(
    *, context_tokens: int, overhead_tokens: int, completion_tokens: int
) -> int:
    """The chunk size that lets a request hold several chunks.

    Args:
        context_tokens: The effective context.
        overhead_tokens: Tokens of a request with no excerpts.
        completion_tokens: Completion budget per request.

    Raises:
        NeedsChunkedRouteError: Not even one small chunk fits; the model's
            effective context is too short for any route.
    """
    available = context_tokens - overhead_tokens - completion_tokens
    size = min(MAX_CHUNK_TOKENS, available // CHUNKS_PER_REQUEST - HEADER_TOKENS)
    if size < MIN_CHUNK_TOKENS:
        raise NeedsChunkedRouteError(
            f"effective context {context_tokens} leaves {available} tokens for"
            f" excerpts after a {overhead_tokens}-token prompt and a"
            f" {completion_tokens}-token completion budget; chunks need at"
            f" least {MIN_CHUNK_TOKENS + HEADER_TOKENS} each. Calibrate the"
            " model or serve one with a longer effective context."
        )
    return size


def note_sources(
    notes: Sequence[tuple[str, ChartNote, str]],
    *,
    counter: TokenCounter,
    chunk_tokens: int,
    first_position: int = 0,
) -> list[Source]:
    """Chunks of notes, repeats collapsed, as sources in record order.

    Args:
        notes: (stay id, note, label) in record order.
        counter: Exact token counts.
        chunk_tokens: Most tokens per chunk.
        first_position: Position given to the first source.
    """
    stay_of = {note.note_id: stay_id for stay_id, note, _ in notes}
    label_of = {note.note_id: label for _, note, label in notes}
    chunks = chunk_notes(
        [note for _, note, _ in notes],
        counter=counter,
        max_tokens=chunk_tokens,
        overlap_tokens=min(32, chunk_tokens // 8),
        min_tokens=MIN_SECTION_TOKENS,
    )
    by_id = {chunk.chunk_id: chunk for chunk in chunks}
    collapsed = dedupe_notes(
        ChartNote(chunk.chunk_id, None, None, chunk.text) for chunk in chunks
    )
    order = {chunk.chunk_id: i for i, chunk in enumerate(chunks)}
    sources = []
    for passage in collapsed.passages:
        chunk = by_id[passage.representative.note_id]
        copies = [by_id[o.note_id].note_id for o in passage.occurrences]
        also_in = tuple(n for n in dict.fromkeys(copies) if n != chunk.note_id)
        heading = f" ({chunk.heading})" if chunk.heading else ""
        sources.append(
            Source(
                source_id=chunk.chunk_id,
                stay_id=stay_of[chunk.note_id],
                position=first_position + order[chunk.chunk_id],
                label=label_of[chunk.note_id] + heading,
                text=chunk.text,
                note_id=chunk.note_id,
                also_in=also_in,
            )
        )
    log.debug(
        "chunks_built",
        chunks=len(chunks),
        kept=len(sources),
        collapse_ratio=round(collapsed.collapse_ratio, 3),
    )
    return sorted(sources, key=lambda s: s.position)


def note_label(note: ChartNote) -> str:
    """A note's header words: its type and date."""
    when = f", {note.charted_at:%Y-%m-%d}" if note.charted_at else ""
    return f"{note.note_type or 'note'}{when}"


def retrieve_sources(
    sources: Sequence[Source],
    specs: Sequence[SectionSpec],
    *,
    embedder: Embedder | None,
    top_k: int,
) -> dict[str, list[Source]]:
    """The best sources for each section, best first (BM25 + MiniLM fused)."""
    index = ChunkIndex([s.as_chunk() for s in sources], embedder=embedder)
    by_id = {s.source_id: s for s in sources}
    hits = retrieve_for_sections(
        index, queries={spec.name: spec.query for spec in specs}, top_k=top_k
    )
    return {
        name: [by_id[hit.chunk.note_id] for hit in found]
        for name, found in hits.items()
    }


def build_section_prompts(
    specs: Sequence[SectionSpec],
    sources: Sequence[Source],
    *,
    embedder: Embedder | None,
    preamble: str,
    counter: TokenCounter,
    context_tokens: int,
    settings: PipelineSettings,
    system_prompt: str = SECTION_SYSTEM_PROMPT,
) -> list[SectionPrompt]:
    """Every section's requests: its retrieved sources in groups, best first.

    Each section retrieves its best ``settings.chunk_top_k`` sources
    (``retrieve_sources``). Each group of ``settings.chunk_sources_per_request``
    of them becomes one request (``part`` 0, 1, ...); a group none of whose
    sources fits is dropped. A section with no sources gets no request and
    is left empty.

    Raises:
        NeedsChunkedRouteError: A section's prompt with no excerpts already
            leaves no room for the completion budget.
    """
    completion_tokens = settings.chunk_completion_tokens
    limit = context_tokens - completion_tokens
    per_request = settings.chunk_sources_per_request
    ranked = retrieve_sources(
        sources, specs, embedder=embedder, top_k=settings.chunk_top_k
    )
    prompts: list[SectionPrompt] = []
    for spec in specs:
        empty = _section_prompt(spec, [], preamble, counter, system_prompt)
        if empty.tokens > limit:
            raise NeedsChunkedRouteError(
                f"section {spec.name}: a {empty.tokens}-token prompt with no"
                f" excerpts plus a {completion_tokens}-token completion exceeds"
                f" the effective context {context_tokens}"
            )
        best = ranked[spec.name]
        part = 0
        for start in range(0, len(best), per_request):
            group = best[start : start + per_request]
            prompt = _group_prompt(
                spec, group, preamble, counter, system_prompt, limit, part
            )
            if prompt is not None:
                prompts.append(prompt)
                part += 1
    return prompts


def _group_prompt(
    spec: SectionSpec,
    ranked: Sequence[Source],
    preamble: str,
    counter: TokenCounter,
    system_prompt: str,
    limit: int,
    part: int,
) -> SectionPrompt | None:
    """One request: as many of ``ranked`` as fit ``limit`` tokens, or None.

    Sources are taken best first while the exact prompt stays within the
    limit, then quoted in record order.
    """
    chosen: list[Source] = []
    best = None
    for source in ranked:
        trial = sorted([*chosen, source], key=lambda s: s.position)
        prompt = _section_prompt(spec, trial, preamble, counter, system_prompt)
        if prompt.tokens <= limit:
            chosen, best = trial, prompt
    if best is None:
        return None
    schema = section_json_schema(
        spec.name,
        list(best.aliases),
        max_items=spec.max_items,
        required=spec.required,
    )
    return SectionPrompt(spec, best, tuple(chosen), schema, part)


def section_json_schema(
    section: str, aliases: list[str], *, max_items: int, required: bool
) -> dict[str, Any]:
    """The schema constraining one section's answer: ``{section: [...]}``.

    Citations may only name ``aliases``, each at most once, and come before
    the text: written after it, a small model tends to put a label where
    the sentence belongs (``{"text": "N1", ...}``). ``required`` asks for at
    least one statement.
    """
    statement = copy.deepcopy(_STATEMENT_SCHEMA)
    statement.pop("title", None)
    statement.pop("description", None)
    properties = statement["properties"]
    citations = properties["note_ids"]
    citations["items"] = {"enum": list(aliases)}
    citations["maxItems"] = max(1, min(citations["maxItems"], len(aliases)))
    statement["properties"] = {"note_ids": citations, "text": properties["text"]}
    statement["required"] = ["note_ids", "text"]
    array: dict[str, Any] = {"type": "array", "items": statement}
    array["maxItems"] = max_items
    if required:
        array["minItems"] = 1
    return {
        "type": "object",
        "properties": {section: array},
        "required": [section],
        "additionalProperties": False,
    }


def generate_sections(
    engine: Engine,
    prompts: Sequence[SectionPrompt],
    *,
    settings: PipelineSettings,
    seed: int,
    request_prefix: str,
    on_round: Callable[[], None] = lambda: None,
) -> tuple[dict[str, SectionResult], GenerationTotals]:
    """Send every request at once, retry the invalid ones together, merge.

    A round sends all pending requests through ``complete_many`` (so the
    engine batches them); a request whose answer is cut off, not JSON, or
    fails validation is tried again in the next round, sampling instead of
    greedy, up to ``settings.max_generation_attempts`` rounds. A section's
    valid requests are then merged (``merge_parts``); a section whose every
    request failed has no statements, and the reasons of its tries.

    Args:
        engine: The generation engine.
        prompts: The requests of every section.
        settings: Completion budget, attempts and repetition penalty.
        seed: Base sampling seed.
        request_prefix: Makes request ids unique (job id and delivery).
        on_round: Called before each round (to count generation attempts).
    """
    budget = settings.chunk_completion_tokens
    answers: dict[tuple[str, int], list[Statement]] = {}
    reasons: dict[str, list[str]] = {p.spec.name: [] for p in prompts}
    pending = list(prompts)
    prompt_tokens = completion_tokens = duration_ms = requests = 0
    for attempt in range(1, settings.max_generation_attempts + 1):
        if not pending:
            break
        on_round()
        started = time.perf_counter()
        completions = engine.complete_many(
            [
                CompletionRequest(
                    request_id=f"{request_prefix}-{p.spec.name}-{p.part}-{attempt}",
                    prompt_token_ids=p.prompt.token_ids,
                    max_tokens=budget,
                    json_schema=p.json_schema,
                    # Greedy first; later tries sample, or they would repeat
                    # the same invalid output.
                    temperature=0.0 if attempt == 1 else 0.7,
                    seed=seed + attempt,
                    repetition_penalty=settings.repetition_penalty,
                )
                for p in pending
            ]
        )
        duration_ms += int((time.perf_counter() - started) * 1000)
        still_pending = []
        for section_prompt, completion in zip(pending, completions, strict=True):
            requests += 1
            prompt_tokens += completion.prompt_tokens
            completion_tokens += completion.completion_tokens
            name, part = section_prompt.spec.name, section_prompt.part
            if completion.finish_reason == "length":
                statements, reason = None, f"cut off at {budget} tokens"
            else:
                statements, reason = parse_section(section_prompt, completion.text)
            if statements is None:
                reasons[name].append(f"part {part} attempt {attempt}: {reason}")
                log.warning(
                    "section_invalid",
                    section=name,
                    part=part,
                    generation_attempt=attempt,
                )
                still_pending.append(section_prompt)
            else:
                answers[(name, part)] = statements
        pending = still_pending
    # Prompts come section by section, each section's parts best first.
    specs = {p.spec.name: p.spec for p in prompts}
    parts: dict[str, list[list[Statement]]] = {name: [] for name in specs}
    for p in prompts:
        if (p.spec.name, p.part) in answers:
            parts[p.spec.name].append(answers[(p.spec.name, p.part)])
    results = {
        name: SectionResult(
            name,
            merge_parts(parts[name], limit=spec.max_section_items)
            if parts[name]
            else None,
            reasons[name],
        )
        for name, spec in specs.items()
    }
    largest = max((p.prompt.tokens for p in prompts), default=0) + budget
    totals = GenerationTotals(
        requests, prompt_tokens, completion_tokens, largest, duration_ms
    )
    return results, totals


def merge_parts(parts: Sequence[Sequence[Statement]], *, limit: int) -> list[Statement]:
    """One section from its requests' statements, best request first.

    Takes the first statement of every part, then the second, and so on,
    so that each retrieved excerpt gets a say before any gets two. A
    statement whose words repeat an earlier one (case, spacing and
    punctuation aside) is dropped. At most ``limit`` are kept.
    """
    merged: list[Statement] = []
    seen: set[str] = set()
    for rank in range(max((len(p) for p in parts), default=0)):
        for part in parts:
            if rank >= len(part) or len(merged) >= limit:
                continue
            key = words_key(part[rank].text)
            if key not in seen:
                seen.add(key)
                merged.append(part[rank])
    return merged


def parse_section(
    section_prompt: SectionPrompt, text: str
) -> tuple[list[Statement] | None, str]:
    """A section answer's statements with note ids, or None and why not.

    Reasons name positions and pydantic messages only, never the text.
    """
    name = section_prompt.spec.name
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg})"
    items = data.get(name) if isinstance(data, dict) else None
    if not isinstance(items, list):
        return None, f"no {name} list"
    aliases = section_prompt.prompt.aliases
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("note_ids"), list):
            item["note_ids"] = [
                aliases.get(n, n) if isinstance(n, str) else n for n in item["note_ids"]
            ]
    allowed = set(aliases.values())
    try:
        statements = _STATEMENTS.validate_python(items, context={"note_ids": allowed})
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "<root>"
        return None, f"{exc.error_count()} error(s), first at {where}: {first['msg']}"
    # Validation drops clauses a looping model repeated; count, for the log.
    looped = sum(
        1
        for item, statement in zip(items, statements, strict=True)
        if item.get("text") != statement.text
    )
    if looped:
        log.info(
            "statement_repeats_dropped",
            section=name,
            part=section_prompt.part,
            statements=looped,
        )
    return statements[: section_prompt.spec.max_items], ""


def summarize_chart_chunked(
    chart: Chart,
    *,
    engine: Engine,
    counter: TokenCounter,
    embedder: Embedder | None,
    context_tokens: int,
    settings: PipelineSettings,
    seed: int,
    request_prefix: str,
    on_round: Callable[[], None] = lambda: None,
    specs: Sequence[SectionSpec] = DISCHARGE_SECTIONS,
) -> ChunkedSummary:
    """A discharge summary of a chart too long for one pass.

    Args:
        chart: The stay.
        engine: The generation engine.
        counter: The served model's exact token counts.
        embedder: Dense retrieval; None ranks by BM25 alone.
        context_tokens: The effective context every request must fit.
        settings: Completion budget, top_k, attempts.
        seed: Base sampling seed.
        request_prefix: Makes request ids unique.
        on_round: Called before each round of requests.
        specs: The sections to write.

    Raises:
        NeedsChunkedRouteError: The effective context cannot hold even a
            small chunk with the prompt and completion budget.
        CompletionInvalidError: Hospital course never validated.
    """
    prompts = chart_section_prompts(
        chart,
        counter=counter,
        embedder=embedder,
        context_tokens=context_tokens,
        settings=settings,
        specs=specs,
    )
    results, totals = generate_sections(
        engine,
        prompts,
        settings=settings,
        seed=seed,
        request_prefix=request_prefix,
        on_round=on_round,
    )
    summary, failed = assemble_discharge(results, specs=specs, chart=chart)
    return ChunkedSummary(summary, failed, totals)


def chart_section_prompts(
    chart: Chart,
    *,
    counter: TokenCounter,
    embedder: Embedder | None,
    context_tokens: int,
    settings: PipelineSettings,
    specs: Sequence[SectionSpec] = DISCHARGE_SECTIONS,
) -> list[SectionPrompt]:
    """The chunked route up to generation: the requests of every section
    that has sources, each quoting some of its retrieved chunks and fitting
    the context.

    Raises:
        NeedsChunkedRouteError: The effective context cannot hold even a
            small chunk with the prompt and completion budget.
    """
    preamble = stay_preamble(chart)
    sources = _chart_sources(
        chart,
        counter=counter,
        specs=specs,
        preamble=preamble,
        context_tokens=context_tokens,
        completion_tokens=settings.chunk_completion_tokens,
    )
    return build_section_prompts(
        specs,
        sources,
        embedder=embedder,
        preamble=preamble,
        counter=counter,
        context_tokens=context_tokens,
        settings=settings,
    )


def assemble_discharge(
    results: Mapping[str, SectionResult],
    *,
    specs: Sequence[SectionSpec],
    chart: Chart,
) -> tuple[DischargeSummary, list[str]]:
    """Sections into one summary, validated as the single-pass route does.

    Returns:
        The summary and the optional sections that failed (left empty).

    Raises:
        CompletionInvalidError: A required section has no valid statement.
    """
    sections, failed = section_statements(results, specs=specs, what="chunked route")
    body = {name: [s.model_dump() for s in found] for name, found in sections.items()}
    summary = DischargeSummary.model_validate(
        body, context={"note_ids": set(chart.note_ids)}
    )
    return summary, failed


def section_statements(
    results: Mapping[str, SectionResult],
    *,
    specs: Sequence[SectionSpec],
    what: str,
) -> tuple[dict[str, list[Statement]], list[str]]:
    """Each section's statements, in spec order, each statement said once.

    A statement repeating one of an earlier section (or its own) is dropped
    (``drop_repeated_statements``): separate requests for separate sections
    often return the same sentence from the same excerpt.

    Args:
        results: The merged statements of each section.
        specs: The sections, in summary order.
        what: Names the summary in the error ("chunked route").

    Returns:
        The statements by section, and the optional sections that failed.

    Raises:
        CompletionInvalidError: A required section has no valid statement.
    """
    found: dict[str, list[Statement]] = {}
    failed = []
    for spec in specs:
        result = results.get(spec.name)
        statements = result.statements if result is not None else []
        if statements is None:
            failed.append(spec.name)
            statements = []
        found[spec.name] = statements
    sections = say_each_once(found)
    for spec in specs:
        if spec.required and not sections[spec.name]:
            result = results.get(spec.name)
            why = "; ".join(result.reasons) if result else "no excerpt retrieved"
            raise CompletionInvalidError(
                f"{what}: section {spec.name} has no valid statement ({why})"
            )
    return sections, failed


def say_each_once(
    sections: Mapping[str, list[Statement]],
) -> dict[str, list[Statement]]:
    """A summary's sections without repeated statements, on every route.

    ``drop_repeated_statements``, letting a statement that holds a dose,
    date, number or drug name stand in a second section; logs how many went.
    """
    kept, dropped = drop_repeated_statements(
        sections, may_repeat=lambda statement: has_checkable_fact(statement.text)
    )
    if dropped:
        log.info("duplicate_statements_dropped", statements=dropped)
    return kept


def stay_preamble(chart: Chart) -> str:
    """The stay header lines quoted above the excerpts."""
    lines = [f"Stay {chart.stay_id}"]
    if chart.encounter_class:
        lines.append(f"Encounter: {chart.encounter_class}")
    if chart.reason_for_visit:
        lines.append(f"Reason for visit: {chart.reason_for_visit}")
    if chart.admit_time:
        lines.append(f"Admitted: {chart.admit_time:%Y-%m-%d}")
    if chart.discharge_time:
        lines.append(f"Discharged: {chart.discharge_time:%Y-%m-%d}")
    return "\n".join(lines)


def request_overhead_tokens(
    specs: Iterable[SectionSpec],
    *,
    preamble: str,
    counter: TokenCounter,
    system_prompt: str = SECTION_SYSTEM_PROMPT,
) -> int:
    """Tokens of the longest section request with no excerpts."""
    return max(
        _section_prompt(spec, [], preamble, counter, system_prompt).tokens
        for spec in specs
    )


def _chart_sources(
    chart: Chart,
    *,
    counter: TokenCounter,
    specs: Sequence[SectionSpec],
    preamble: str,
    context_tokens: int,
    completion_tokens: int,
) -> list[Source]:
    overhead = request_overhead_tokens(specs, preamble=preamble, counter=counter)
    chunk_tokens = chunk_budget_tokens(
        context_tokens=context_tokens,
        overhead_tokens=overhead,
        completion_tokens=completion_tokens,
    )
    notes = [(chart.stay_id, note, note_label(note)) for note in chart.notes]
    return note_sources(notes, counter=counter, chunk_tokens=chunk_tokens)


def _section_prompt(
    spec: SectionSpec,
    sources: Sequence[Source],
    preamble: str,
    counter: TokenCounter,
    system_prompt: str,
) -> Prompt:
    aliases: dict[str, str] = {}
    for source in sources:
        for note_id in source.note_ids:
            aliases.setdefault(note_id, f"N{len(aliases) + 1}")
    special = counter.special_tokens
    blocks = []
    neutralized = 0
    for source in sources:
        block, count = _render_source(source, aliases, special)
        blocks.append(block)
        neutralized += count
    excerpts = "\n\n".join(blocks) if blocks else "(no excerpts)"
    user = (
        f"{preamble}\n\nExcerpts:\n\n{excerpts}\n\n"
        f"Write only the section {spec.name}: {spec.instruction}"
        f" At most {spec.max_items} statements."
        f' Answer as {{"{spec.name}": [...]}}, citing notes by their labels.'
    )
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": user},
    ]
    rendered = counter.render_chat(messages, add_generation_prompt=True)
    token_ids = counter.encode(rendered, allow_special=True)
    by_alias = {alias: note_id for note_id, alias in aliases.items()}
    return Prompt(messages, token_ids, by_alias, neutralized)


def _render_source(
    source: Source, aliases: Mapping[str, str], special: frozenset[str]
) -> tuple[str, int]:
    if source.note_id is not None:
        text, count = neutralize_special_tokens(source.text, special)
        copies = (
            f"; also in {len(source.also_in)} other notes" if source.also_in else ""
        )
        header = f"=== {aliases[source.note_id]}: {source.label}{copies} ==="
        return f"{header}\n{text}", count
    lines = [f"=== Summary of {source.label} ==="]
    neutralized = 0
    for statement in source.statements:
        text, count = neutralize_special_tokens(statement.text, special)
        neutralized += count
        cited = ", ".join(aliases[n] for n in statement.note_ids)
        lines.append(f"- {text} [{cited}]")
    return "\n".join(lines), neutralized
