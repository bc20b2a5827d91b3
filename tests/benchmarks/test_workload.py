"""The engine-only phases send exactly what the pipeline sends."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from benchmarks.workload import build_requests, load_stays
from pipelines.routing import EffectiveContext
from pipelines.store import ChartStore
from pipelines.summarize import Summarizer
from pipelines.tokens import TokenCounter
from schemas.settings import Settings
from tests.helpers import ScriptedEngine, summary_json


def test_benchmark_requests_equal_the_pipelines_first_request(
    sqlite_store: ChartStore, model_dir: Path
) -> None:
    """Prompt ids, budget, schema and sampling match a job's first attempt."""
    settings = Settings()
    tokens = TokenCounter.from_model_dir(model_dir)
    context = EffectiveContext(tokens=8192, source="test")
    stay = load_stays(include_shared=False, limit=1)[0]
    sqlite_store.ingest([stay])
    engine = ScriptedEngine(lambda _request: (summary_json("N1"), "stop"))
    summarizer = Summarizer(
        settings=settings,
        store=sqlite_store,
        engine=engine,
        tokens=tokens,
        model_fingerprint="f" * 64,
        context=context,
        embedder=lambda: None,
    )
    [(job_id, _)] = sqlite_store.create_jobs(
        kind="discharge", stay_ids=[stay.stay_id], queue="q"
    )

    summarizer.process_job(job_id)
    work, skipped = build_requests(
        sqlite_store,
        [stay.stay_id],
        settings=settings,
        tokens=tokens,
        context=context,
    )

    assert skipped == []
    sent = dataclasses.replace(engine.requests[0], request_id="x")
    assert dataclasses.replace(work[0].request, request_id="x") == sent
