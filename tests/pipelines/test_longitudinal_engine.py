"""A long real record through the real engine to a stored longitudinal summary.

The 10.6k-token Synthea record (59 visits) is more than twice the default
effective context, so every step runs chunked: the real vLLM engine on the
CPU, the real MiniLM embedder, SQLite. Budgets are kept small so the test
takes a few minutes on two cores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pipelines.engine import Completion, CompletionRequest, Engine, InProcessEngine
from pipelines.routing import EffectiveContext
from pipelines.stays import parse_stay_lines
from pipelines.store import ChartStore
from pipelines.summarize import Summarizer
from pipelines.tokens import TokenCounter
from schemas.longitudinal import LongitudinalSummary
from schemas.settings import PipelineSettings, Settings
from schemas.tables import JobState
from tests.conftest import SHARED_DATA

# 11 minutes measured on two cores shared with other vLLM engines (load
# average 20+); the suite's 15-minute default leaves too little margin.
pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

RECORD_PREFIX = "syn-6a4160eb"
CONTEXT_TOKENS = 4096


class RecordingEngine:
    """The real engine, keeping each request's size and each batch's length."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.batches: list[list[int]] = []

    def complete(self, request: CompletionRequest) -> Completion:
        """Pass one request through."""
        return self.complete_many([request])[0]

    def complete_many(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Record prompt plus budget per request, then pass them through together."""
        self.batches.append([len(r.prompt_token_ids) + r.max_tokens for r in requests])
        return self.engine.complete_many(requests)

    def close(self) -> None:
        """Close the real engine."""
        self.engine.close()


def _record() -> dict[str, object]:
    with (SHARED_DATA / "longitudinal.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            if str(record["stay_id"]).startswith(RECORD_PREFIX):
                return dict(record)
    raise AssertionError(f"no {RECORD_PREFIX} record in the shared data")


def test_a_long_real_record_becomes_a_stored_longitudinal_summary(
    sqlite_store: ChartStore, model_dir: Path
) -> None:
    """59 visits, 10.6k tokens: every request fits 4096 tokens; a summary is stored."""
    # Given the record ingested as the patient's stays
    record = _record()
    parsed = parse_stay_lines([json.dumps(record)])
    assert parsed.errors == []
    sqlite_store.ingest(parsed.stays)
    tokens = TokenCounter.from_model_dir(model_dir)
    record_tokens = sum(tokens.count(n.text) for s in parsed.stays for n in s.notes)
    assert record_tokens > 2 * CONTEXT_TOKENS
    settings = Settings(
        pipeline=PipelineSettings(chunk_completion_tokens=256, chunk_top_k=6)
    )
    engine = RecordingEngine(
        InProcessEngine(model_dir=model_dir, settings=settings.vllm)
    )
    [(job_id, _)] = sqlite_store.create_patient_jobs(
        kind="longitudinal", patient_ids=[str(record["patient_id"])], queue="q"
    )

    # When its longitudinal job runs
    started = time.perf_counter()
    try:
        outcome = Summarizer(
            settings=settings,
            store=sqlite_store,
            engine=engine,
            tokens=tokens,
            model_fingerprint="e" * 64,
            context=EffectiveContext(tokens=CONTEXT_TOKENS, source="test"),
        ).process_job(job_id)
    finally:
        engine.close()
    elapsed_s = time.perf_counter() - started

    # Then every request fitted, they went out together, and a summary is stored
    assert outcome.state in (JobState.SUCCEEDED, JobState.NEEDS_REVIEW), outcome.error
    # One request per section and retrieved source, all in the first batch
    assert engine.batches and 4 <= len(engine.batches[0]) <= 4 * 6
    assert all(size <= CONTEXT_TOKENS for batch in engine.batches for size in batch)
    found = sqlite_store.find_patient_summary(str(record["patient_id"]))
    assert found is not None
    summary = LongitudinalSummary.model_validate(found[0].payload)
    stays = {s.stay_id for s in parsed.stays}
    assert summary.problems
    assert all(set(item.stay_ids) <= stays for _, _, item in summary.items())
    print(
        f"\nlongitudinal {RECORD_PREFIX}: {record_tokens} record tokens,"
        f" {elapsed_s:.0f} s, batches {engine.batches},"
        f" prompt {outcome.prompt_tokens} + completion {outcome.completion_tokens}"
        f" tokens, support {outcome.support_rate}, state {outcome.state}"
    )
