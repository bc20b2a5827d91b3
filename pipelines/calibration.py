"""Measuring how much input a served model can really use.

A calibration runs context probes (``pipelines.probes``) over a ladder of
lengths and depth bands through the engine the workers use, scores them by
exact rules, and keeps the *effective length*: the longest tested length at
which every depth band scored at or above a threshold, and every shorter
tested length did too (RULER's convention, made strict: a length that passes
above one that fails is treated as luck, not trusted). The result is keyed
by a fingerprint of everything about the served model that changes what it
can find.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog

from pipelines.calibration_store import CalibrationStore
from pipelines.engine import Completion, CompletionRequest, Engine
from pipelines.probes import Probe, ProbeCorpus, build_probe_set, score_answer
from pipelines.stays import iter_example_paths, read_stays_file
from pipelines.tokens import TokenCounter
from schemas.calibration import (
    ANSWER_RESERVE_TOKENS,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    DEFAULT_TRIALS,
    LADDER_TOKENS,
    QUICK_LADDER_TOKENS,
    QUICK_TRIALS,
    CalibrationResult,
    DepthBand,
    FingerprintParts,
    GridCell,
    ProbeKind,
    ProbeScore,
)
from schemas.settings import VllmSettings

log = structlog.get_logger("chartsum.calibration")

#: Scores this close under the threshold still pass (float sums of
#: fractions such as 17/20 are not exact).
SCORE_EPSILON = 1e-9


@dataclass(frozen=True)
class CalibrationPlan:
    """What one calibration run tests."""

    lengths_tokens: tuple[int, ...]
    trials: int
    threshold: float
    seed: int
    mode: Literal["full", "quick", "custom"]
    bands: tuple[DepthBand, ...] = tuple(DepthBand)
    kinds: tuple[ProbeKind, ...] = tuple(ProbeKind)

    @property
    def probe_count(self) -> int:
        """Probes in the whole grid."""
        cells = len(self.lengths_tokens) * len(self.bands) * len(self.kinds)
        return cells * self.trials


def plan_calibration(
    *,
    max_model_len_tokens: int,
    quick: bool = False,
    lengths_tokens: Sequence[int] | None = None,
    trials: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = DEFAULT_SEED,
) -> CalibrationPlan:
    """The ladder and trials for a run on an engine of this maximum length.

    Args:
        max_model_len_tokens: The engine's maximum prompt plus completion.
        quick: Two rungs (256, 1k) and one trial instead of the full ladder.
        lengths_tokens: Rungs to test instead of the default ladder.
        trials: Trials per cell (default 3, quick 1).
        threshold: Lowest band score that passes, 0 to 1 (default 0.85).
        seed: Base seed of every probe (fixed, so runs repeat).

    Raises:
        ValueError: A rung leaves no room for the answer, or an argument is
            out of range.
    """
    top = max_model_len_tokens - ANSWER_RESERVE_TOKENS
    if lengths_tokens:
        lengths = tuple(sorted(set(lengths_tokens)))
    else:
        ladder = QUICK_LADDER_TOKENS if quick else LADDER_TOKENS
        lengths = tuple(n for n in ladder if n < top)
        lengths += () if quick else (top,)
    if not lengths or lengths[0] < 256 or lengths[-1] > top:
        raise ValueError(
            f"calibration lengths must lie between 256 and {top} tokens"
            f" (max model length {max_model_len_tokens} less"
            f" {ANSWER_RESERVE_TOKENS} for the answer); got {list(lengths)}"
        )
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    trials = trials or (QUICK_TRIALS if quick else DEFAULT_TRIALS)
    if trials < 1:
        raise ValueError(f"trials must be at least 1; got {trials}")
    mode: Literal["full", "quick", "custom"] = "quick" if quick else "full"
    if lengths_tokens or trials != (QUICK_TRIALS if quick else DEFAULT_TRIALS):
        mode = "custom"
    return CalibrationPlan(lengths, trials, threshold, seed, mode)


def served_model_parts(
    *, model_dir: Path, vllm: VllmSettings, model_fingerprint: str
) -> FingerprintParts:
    """What identifies the served model for calibration purposes.

    Args:
        model_dir: The local model folder (its config.json is read for
            quantization and rope scaling).
        vllm: Engine settings; dtype and max model length change behaviour.
        model_fingerprint: ``pipelines.model.model_fingerprint(model_dir)``.
    """
    config: dict[str, Any] = {}
    config_path = model_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
    return FingerprintParts(
        model_fingerprint=model_fingerprint,
        dtype=vllm.dtype,
        max_model_len_tokens=vllm.max_model_len_tokens,
        quantization=_canonical(config.get("quantization_config")),
        rope_scaling=_canonical(config.get("rope_scaling")),
    )


def calibration_fingerprint(parts: FingerprintParts) -> str:
    """The key a calibration is stored under: sha256 of every part."""
    blob = json.dumps(parts.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def effective_length(
    grid: Mapping[int, Mapping[DepthBand, float]], threshold: float
) -> int | None:
    """The longest tested length the model can be trusted with.

    A length passes when every depth band scores at least ``threshold``.
    The effective length is the longest passing length below which every
    tested length passes too; a pass above a failure does not count.

    Args:
        grid: Score by length (tokens), then by depth band.
        threshold: Lowest passing score, 0 to 1; a score equal to it passes.

    Returns:
        The length in tokens, or None when even the shortest length fails.

    Raises:
        ValueError: The grid is empty or a length lacks a band others have.
    """
    if not grid:
        raise ValueError("an empty grid has no effective length")
    bands = set().union(*(scores.keys() for scores in grid.values()))
    effective: int | None = None
    for length in sorted(grid):
        scores = grid[length]
        if set(scores) != bands:
            raise ValueError(f"length {length} lacks a band: {sorted(scores)}")
        if any(score < threshold - SCORE_EPSILON for score in scores.values()):
            break
        effective = length
    return effective


def build_cells(scores: Sequence[ProbeScore]) -> list[GridCell]:
    """Mean scores per (length, band), each kind weighted equally."""
    grouped: dict[tuple[int, DepthBand], dict[ProbeKind, list[float]]] = {}
    for probe in scores:
        cell = grouped.setdefault((probe.length_tokens, probe.band), {})
        cell.setdefault(probe.kind, []).append(probe.score)
    cells = []
    for (length, band), kinds in sorted(grouped.items()):
        by_kind = {kind: sum(v) / len(v) for kind, v in kinds.items()}
        cells.append(
            GridCell(
                length_tokens=length,
                band=band,
                score=sum(by_kind.values()) / len(by_kind),
                probes=sum(len(v) for v in kinds.values()),
                by_kind=by_kind,
            )
        )
    return cells


def build_probes(
    plan: CalibrationPlan, *, corpus: ProbeCorpus, tokens: TokenCounter
) -> list[Probe]:
    """Every probe of the plan, longest first (the tail then runs short ones)."""
    return [
        probe
        for length in sorted(plan.lengths_tokens, reverse=True)
        for trial in range(plan.trials)
        for band in plan.bands
        for probe in build_probe_set(
            corpus,
            tokens=tokens,
            length_tokens=length,
            band=band,
            trial=trial,
            seed=plan.seed,
            kinds=plan.kinds,
        )
    ]


def run_probes(
    engine: Engine,
    probes: Sequence[Probe],
    *,
    concurrency: int,
    on_scored: Callable[[ProbeScore], None] | None = None,
) -> list[ProbeScore]:
    """Send probes to the engine and score them, in the order given.

    Probes that share a haystack run one after another on one thread, so
    the engine's prefix cache holds the haystack for the second and third
    question; ``concurrency`` haystacks are in flight at once and the engine
    batches them. Keep it small on CPUs: prefill is compute-bound, and
    every request in flight must finish within the engine's request
    timeout.

    Args:
        engine: The engine the workers use.
        probes: Built probes.
        concurrency: Haystacks in flight at once.
        on_scored: Called from a worker thread after each probe, e.g. to
            advance a progress bar.

    Raises:
        RetryableError: The engine failed; the calibration is not stored.
    """
    groups: dict[str, list[int]] = {}
    for index, probe in enumerate(probes):
        groups.setdefault(probe.haystack_id, []).append(index)
    results: list[ProbeScore | None] = [None] * len(probes)

    def one_haystack(indexes: list[int]) -> None:
        for index in indexes:
            probe = probes[index]
            completion = engine.complete(
                CompletionRequest(
                    request_id=f"{probe.probe_id}-{uuid.uuid4().hex[:8]}",
                    prompt_token_ids=probe.token_ids,
                    max_tokens=probe.max_tokens,
                    json_schema=probe.json_schema,
                    temperature=0.0,
                    seed=0,
                )
            )
            scored = score_probe(probe, completion)
            results[index] = scored
            if on_scored is not None:
                on_scored(scored)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(one_haystack, g) for g in groups.values()]
        try:
            for future in futures:
                future.result()
        except BaseException:
            # Don't start haystacks nobody will read; those in flight end
            # with the engine.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [r for r in results if r is not None]


def score_probe(probe: Probe, completion: Completion) -> ProbeScore:
    """A probe's score; an answer cut off at its budget scores 0."""
    score, parsed = score_answer(probe.kind, probe.expected, completion.text)
    if completion.finish_reason == "length":
        score, parsed = 0.0, False
    return ProbeScore(
        length_tokens=probe.length_tokens,
        band=probe.band,
        kind=probe.kind,
        trial=probe.trial,
        prompt_tokens=len(probe.token_ids),
        depths=[round(d, 4) for d in probe.depths],
        score=score,
        parsed=parsed,
        finish_reason=completion.finish_reason,
        completion_tokens=completion.completion_tokens,
    )


def run_calibration(
    *,
    engine: Engine,
    tokens: TokenCounter,
    corpus: ProbeCorpus,
    plan: CalibrationPlan,
    parts: FingerprintParts,
    concurrency: int,
    probes: Sequence[Probe] | None = None,
    on_scored: Callable[[ProbeScore], None] | None = None,
) -> CalibrationResult:
    """Build, run and score every probe of a plan; the result is not stored.

    Args:
        engine: The engine the workers use (same chat template, same path).
        tokens: The served model's tokenizer.
        corpus: Note text for the haystacks.
        plan: Lengths, trials, threshold and seed.
        parts: The served model's fingerprint parts.
        concurrency: Haystacks in flight at once.
        probes: The plan's probes if already built (``build_probes``).
        on_scored: Called after each probe is scored.
    """
    started = time.perf_counter()
    log.info(
        "calibration_started",
        probes=plan.probe_count,
        lengths_tokens=list(plan.lengths_tokens),
        corpus=corpus.source,
    )
    if probes is None:
        probes = build_probes(plan, corpus=corpus, tokens=tokens)

    scores = run_probes(engine, probes, concurrency=concurrency, on_scored=on_scored)

    cells = build_cells(scores)
    grid: dict[int, dict[DepthBand, float]] = {}
    for cell in cells:
        grid.setdefault(cell.length_tokens, {})[cell.band] = cell.score
    result = CalibrationResult(
        fingerprint=calibration_fingerprint(parts),
        parts=parts,
        model_name=engine.model_name,
        mode=plan.mode,
        threshold=plan.threshold,
        lengths_tokens=list(plan.lengths_tokens),
        trials=plan.trials,
        seed=plan.seed,
        effective_tokens=effective_length(grid, plan.threshold),
        cells=cells,
        probes=sorted(scores, key=_probe_order),
        corpus=corpus.source,
        corpus_sha256=corpus.sha256,
        corpus_tokens=sum(corpus.paragraph_tokens),
        duration_s=round(time.perf_counter() - started, 1),
        created_at=datetime.now(UTC),
    )
    log.info(
        "calibration_completed",
        effective_tokens=result.effective_tokens,
        duration_ms=int(result.duration_s * 1000),
    )
    return result


def _probe_order(score: ProbeScore) -> tuple[int, int, int, int]:
    bands, kinds = list(DepthBand), list(ProbeKind)
    return (
        score.length_tokens,
        bands.index(score.band),
        kinds.index(score.kind),
        score.trial,
    )


def _canonical(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def load_probe_corpus(
    calibrations: CalibrationStore | None, *, tokens: TokenCounter, top_tokens: int
) -> ProbeCorpus:
    """Haystack text: the ingested notes, topped up with the shipped examples.

    The examples are added when the database holds too little note text to
    fill the longest probe without repeating paragraphs (about four
    characters a token).

    Args:
        calibrations: The store to read ingested notes from, if any.
        tokens: The served model's tokenizer.
        top_tokens: The longest probe length of the run.
    """
    wanted_chars = 4 * top_tokens
    texts = calibrations.note_texts(max_chars=wanted_chars) if calibrations else []
    sources = ["database"] if texts else []
    if sum(len(text) for text in texts) < wanted_chars:
        for path in iter_example_paths():
            for stay in read_stays_file(path).stays:
                texts.extend(note.text for note in stay.notes)
        sources.append("examples")
    return ProbeCorpus.from_texts(texts, tokens=tokens, source="+".join(sources))
