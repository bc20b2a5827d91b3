"""Planted-fact recall: chunked route vs single pass, on the real engine.

Each trial builds a stay from consecutive real Synthea notes (the ctakes
longitudinal record in ../shared/data) up to a target length, plants one
medication fact in a note of the middle third, and summarizes the stay both
ways: one single-pass request (the production prompt, schema and budget)
and the chunked route (retrieval, dedupe, and per section one request per
retrieved chunk, or per group of ``--sources-per-request`` chunks). A fact
is recalled when the planted drug's name appears in the validated summary;
an invalid or cut-off summary counts as a miss, and is also reported.

    python -m benchmarks.chunked_recall --lengths 2000,4000,6000 --trials 3 \
        --routes chunked,single_pass --sources-per-request 1,4

It first prints, for each trial, which section requests of the chunked
route quote the planted sentence at all (chunking, dedupe, retrieval and
packing only; ``--prompts-only`` stops there), then the model's recall.

``--section discharge_medications`` sends only that section's chunked
requests (one batch, greedy, no retries): it reports how many of the
requests that quote the planted sentence name the drug, and the section's
recall after the merge. Cheap enough for a larger sample:

    python -m benchmarks.chunked_recall --seeds 7,8 --trials 3 \
        --section discharge_medications

Prints one JSON line per length and route; nothing about note text.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipelines.chunked import (
    DISCHARGE_SECTIONS,
    SectionPrompt,
    chart_section_prompts,
    merge_parts,
    parse_section,
    shared_embedder,
    summarize_chart_chunked,
)
from pipelines.engine import CompletionRequest, InProcessEngine
from pipelines.errors import ChartsumError
from pipelines.prompts import build_discharge_prompt
from pipelines.stays import Chart, ChartNote
from pipelines.summarize import resolve_aliases
from pipelines.tokens import TokenCounter
from schemas.settings import Settings
from schemas.summary import DischargeSummary, Statement, discharge_json_schema

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "longitudinal.jsonl"
FACTS = [
    (
        "dabigatran",
        "Dabigatran 150 mg twice daily was started for atrial fibrillation.",
    ),
    ("rivaroxaban", "Rivaroxaban 20 mg daily was started for a deep vein thrombosis."),
    ("sotalol", "Sotalol 80 mg twice daily was started for atrial flutter."),
    ("apixaban", "Apixaban 5 mg twice daily was started for a pulmonary embolism."),
    (
        "dofetilide",
        "Dofetilide 500 mcg twice daily was started for atrial fibrillation.",
    ),
    ("ticagrelor", "Ticagrelor 90 mg twice daily was started after a stent."),
]


@dataclass(frozen=True)
class Trial:
    """One planted stay."""

    length_tokens: int
    drug: str
    chart: Chart


def make_trial(
    notes: list[dict[str, str]],
    *,
    length_tokens: int,
    fact: tuple[str, str],
    counter: TokenCounter,
    rng: random.Random,
    name: str = "",
) -> Trial:
    """Consecutive real notes up to a length, the fact planted mid-stay."""
    start = rng.randrange(len(notes) // 2)
    picked: list[dict[str, str]] = []
    total = 0
    for note in notes[start:] + notes[:start]:
        size = counter.count(note["text"])
        if total + size > length_tokens:
            break
        picked.append(note)
        total += size
    middle = len(picked) // 2
    chart_notes = []
    for i, note in enumerate(picked):
        text = note["text"]
        if i == middle:
            text = f"{text}\n\n# Medications\n{fact[1]}\n"
        chart_notes.append(ChartNote(f"n{i}", note.get("note_type"), None, text))
    chart = Chart(
        stay_id=f"bench-{length_tokens}-{fact[0]}{'-' + name if name else ''}",
        patient_id="bench",
        content_sha256="0" * 64,
        encounter_class="inpatient",
        reason_for_visit=None,
        admit_time=None,
        discharge_time=None,
        record={},
        notes=tuple(chart_notes),
    )
    return Trial(length_tokens, fact[0], chart)


def single_pass(
    trials: list[Trial],
    engine: InProcessEngine,
    counter: TokenCounter,
    settings: Settings,
) -> list[tuple[bool, bool]]:
    """(recalled, valid) per trial, all requests sent together."""
    prompts = [build_discharge_prompt(t.chart, tokens=counter) for t in trials]
    budget = settings.pipeline.max_completion_tokens
    completions = engine.complete_many(
        [
            CompletionRequest(
                request_id=f"sp-{i}",
                prompt_token_ids=p.token_ids,
                max_tokens=budget,
                json_schema=discharge_json_schema(list(p.aliases)),
                seed=settings.vllm.seed,
                repetition_penalty=settings.pipeline.repetition_penalty,
            )
            for i, p in enumerate(prompts)
        ]
    )
    results = []
    for trial, prompt, completion in zip(trials, prompts, completions, strict=True):
        try:
            summary = DischargeSummary.model_validate(
                resolve_aliases(json.loads(completion.text), prompt.aliases),
                context={"note_ids": set(trial.chart.note_ids)},
            )
        except (ValueError, json.JSONDecodeError):
            results.append((False, False))
            continue
        text = " ".join(s.text for _, _, s in summary.statements()).lower()
        results.append((trial.drug in text, True))
    return results


def chunked(
    trials: list[Trial],
    engine: InProcessEngine,
    counter: TokenCounter,
    settings: Settings,
    context_tokens: int,
) -> list[tuple[bool, bool]]:
    """(recalled, valid) per trial; trials run on threads so the engine batches."""
    embedder = shared_embedder()

    def one(item: tuple[int, Trial]) -> tuple[bool, bool]:
        index, trial = item
        try:
            result = summarize_chart_chunked(
                trial.chart,
                engine=engine,
                counter=counter,
                embedder=embedder,
                context_tokens=context_tokens,
                settings=settings.pipeline,
                seed=settings.vllm.seed,
                request_prefix=f"ch-{index}",
            )
        except (ChartsumError, ValueError):
            return False, False
        statements = result.summary.statements()
        text = " ".join(s.text for _, _, s in statements).lower()
        return trial.drug in text, True

    with ThreadPoolExecutor(max_workers=max(1, len(trials))) as pool:
        return list(pool.map(one, enumerate(trials)))


def one_section(
    trials: list[Trial],
    prompts: Mapping[str, list[SectionPrompt]],
    engine: InProcessEngine,
    settings: Settings,
    section: str,
) -> dict[str, int]:
    """One section's chunked requests for every trial, sent as one batch.

    ``prompts`` are each trial's chunked-route requests, by stay id.
    Counts the requests that quote the planted sentence, those of them whose
    valid answer names the drug, and the trials whose merged section does.
    """
    spec = next(s for s in DISCHARGE_SECTIONS if s.name == section)
    facts = dict(FACTS)
    flat = [
        (trial, prompt)
        for trial in trials
        for prompt in prompts[trial.chart.stay_id]
        if prompt.spec.name == section
    ]
    completions = engine.complete_many(
        [
            CompletionRequest(
                request_id=f"sec-{i}",
                prompt_token_ids=prompt.prompt.token_ids,
                max_tokens=settings.pipeline.chunk_completion_tokens,
                json_schema=prompt.json_schema,
                seed=settings.vllm.seed,
                repetition_penalty=settings.pipeline.repetition_penalty,
            )
            for i, (_, prompt) in enumerate(flat)
        ]
    )
    counts = {"requests": len(flat), "invalid": 0, "fact_requests": 0}
    counts["fact_requests_naming_drug"] = 0
    parts: dict[str, list[list[Statement]]] = {t.chart.stay_id: [] for t in trials}
    for (trial, prompt), completion in zip(flat, completions, strict=True):
        statements = None
        if completion.finish_reason != "length":
            statements, _ = parse_section(prompt, completion.text)
        if statements is None:
            counts["invalid"] += 1
            continue
        parts[trial.chart.stay_id].append(statements)
        if quotes(prompt, facts[trial.drug]):
            counts["fact_requests"] += 1
            named = any(trial.drug in s.text.lower() for s in statements)
            counts["fact_requests_naming_drug"] += named
    counts["trials"] = len(trials)
    counts["recalled"] = sum(
        any(
            t.drug in s.text.lower()
            for s in merge_parts(parts[t.chart.stay_id], limit=spec.max_section_items)
        )
        for t in trials
    )
    return counts


def quotes(prompt: SectionPrompt, fact_text: str) -> bool:
    """Whether a request's messages hold the planted sentence."""
    return any(fact_text in m["content"] for m in prompt.prompt.messages)


def main() -> None:
    """Run the benchmark and print one JSON line per length and route."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="2000,4000,6000")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--routes", default="single_pass,chunked")
    parser.add_argument(
        "--sources-per-request",
        default="1",
        help="Chunked route: excerpts per request, one run per value (1,4).",
    )
    parser.add_argument(
        "--seeds",
        default="7",
        help="Random draws of trials; each seed adds lengths x trials stays.",
    )
    parser.add_argument(
        "--section",
        help="Only this chunked-route section, one batch (a cheaper, larger sample).",
    )
    parser.add_argument(
        "--prompts-only",
        action="store_true",
        help="Only check whether the fact reaches a section prompt; no engine.",
    )
    args = parser.parse_args()
    settings = Settings()
    counter = TokenCounter.from_model_dir(settings.model_dir)
    record = next(
        json.loads(line)
        for line in DATA.open(encoding="utf-8")
        if line.startswith("{") and '"ctk-a3ac2430-all"' in line[:400]
    )
    trials = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rng = random.Random(seed)
        trials += [
            make_trial(
                record["notes"],
                length_tokens=int(length),
                # Seed 7 keeps the drugs of the first published run.
                fact=FACTS[(i + j + seed - 7) % len(FACTS)],
                counter=counter,
                rng=rng,
                name=f"s{seed}-{j}",
            )
            for i, length in enumerate(args.lengths.split(","))
            for j in range(args.trials)
        ]
    facts = dict(FACTS)
    # The chunked route's own chunking, dedupe, retrieval and packing,
    # stopped before generation: whether the fact can reach the model at all.
    prompts = {
        trial.chart.stay_id: chart_section_prompts(
            trial.chart,
            counter=counter,
            embedder=shared_embedder(),
            context_tokens=args.context,
            settings=settings.pipeline,
        )
        for trial in trials
    }
    for trial in trials:
        sections = [
            prompt.spec.name
            for prompt in prompts[trial.chart.stay_id]
            if quotes(prompt, facts[trial.drug])
        ]
        print(
            json.dumps(
                {
                    "route": "chunked (prompts only, no model)",
                    "length_tokens": trial.length_tokens,
                    "fact_reaches_sections": sections,
                }
            ),
            flush=True,
        )
    if args.prompts_only:
        return
    engine = InProcessEngine(model_dir=settings.model_dir, settings=settings.vllm)
    if args.section:
        try:
            started = time.perf_counter()
            counts = one_section(trials, prompts, engine, settings, args.section)
            counts["wall_s"] = round(time.perf_counter() - started)
            print(json.dumps({"route": "chunked", "section": args.section, **counts}))
        finally:
            engine.close()
        return
    # One route at a time, so each one's wall time is its own and a long
    # single-pass request never waits behind hundreds of short ones.
    try:
        for route in args.routes.split(","):
            for per_request in _route_variants(route, args.sources_per_request):
                started = time.perf_counter()
                if route == "single_pass":
                    results = single_pass(trials, engine, counter, settings)
                else:
                    pipeline = settings.pipeline.model_copy(
                        update={"chunk_sources_per_request": per_request}
                    )
                    results = chunked(
                        trials,
                        engine,
                        counter,
                        settings.model_copy(update={"pipeline": pipeline}),
                        args.context,
                    )
                elapsed_s = round(time.perf_counter() - started)
                _print_recall(route, per_request, trials, results, elapsed_s)
    finally:
        engine.close()


def _route_variants(route: str, per_request: str) -> list[int | None]:
    if route == "single_pass":
        return [None]
    return [int(n) for n in per_request.split(",")]


def _print_recall(
    route: str,
    per_request: int | None,
    trials: list[Trial],
    results: list[tuple[bool, bool]],
    elapsed_s: int,
) -> None:
    for length in dict.fromkeys(t.length_tokens for t in trials):
        rows = [
            r for t, r in zip(trials, results, strict=True) if t.length_tokens == length
        ]
        line = {
            "route": route,
            "length_tokens": length,
            "trials": len(rows),
            "recalled": sum(r[0] for r in rows),
            "valid": sum(r[1] for r in rows),
            "route_wall_s": elapsed_s,
        }
        if per_request is not None:
            line["sources_per_request"] = per_request
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
