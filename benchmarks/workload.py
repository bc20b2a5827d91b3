"""The benchmark's stays, its own database, and the requests the pipeline sends.

Every phase works on the same stays. The engine-only phases send exactly
what ``Summarizer`` sends on a job's first generation attempt: the same
prompt token ids, completion budget, JSON schema and sampling settings.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pipelines.engine import CompletionRequest
from pipelines.prompts import build_discharge_prompt
from pipelines.routing import EffectiveContext, Route, choose_route
from pipelines.stays import iter_example_paths, read_stays_file
from pipelines.store import ChartStore
from pipelines.tokens import TokenCounter
from schemas.settings import Settings
from schemas.stay import StayRecord
from schemas.summary import discharge_json_schema

REPO = Path(__file__).resolve().parents[1]
#: The Synthea and transcription stays shared beside the repository.
SHARED_STAYS = REPO.parent / "shared" / "data" / "stays.jsonl"


@dataclass(frozen=True)
class StayRequest:
    """One stay and the first request the pipeline would send for it."""

    stay_id: str
    request: CompletionRequest


def load_stays(*, include_shared: bool, limit: int | None = None) -> list[StayRecord]:
    """The shipped example stays, then the shared ones, without repeats.

    Args:
        include_shared: Add ``../shared/data/stays.jsonl`` when it exists.
        limit: Keep only the first N stays; None keeps all.
    """
    paths = [next(iter_example_paths())]
    if include_shared and SHARED_STAYS.is_file():
        paths.append(SHARED_STAYS)
    seen: dict[str, StayRecord] = {}
    for path in paths:
        for record in read_stays_file(path).stays:
            seen.setdefault(record.stay_id, record)
    stays = list(seen.values())
    return stays[:limit] if limit else stays


def build_requests(
    store: ChartStore,
    stay_ids: Sequence[str],
    *,
    settings: Settings,
    tokens: TokenCounter,
    context: EffectiveContext,
) -> tuple[list[StayRequest], list[str]]:
    """The pipeline's first-attempt request per single-pass stay.

    Mirrors ``Summarizer.explain_route`` and the first try of
    ``Summarizer._generate``; keep the two in step.

    Returns:
        The requests, and the ids of stays the pipeline would not send to
        the engine (they need the chunked route).
    """
    requests: list[StayRequest] = []
    skipped: list[str] = []
    budget = settings.pipeline.max_completion_tokens
    for stay_id in stay_ids:
        chart = store.load_chart(stay_id)
        prompt = build_discharge_prompt(chart, tokens=tokens)
        decision = choose_route(
            prompt_tokens=prompt.tokens,
            completion_budget_tokens=budget,
            context=context,
        )
        if decision.route is not Route.SINGLE_PASS:
            skipped.append(stay_id)
            continue
        request = CompletionRequest(
            request_id=f"bench-{stay_id}",
            prompt_token_ids=prompt.token_ids,
            max_tokens=budget,
            json_schema=discharge_json_schema(list(prompt.aliases)),
            temperature=0.0,
            seed=settings.vllm.seed + 1,
            repetition_penalty=settings.pipeline.repetition_penalty,
        )
        requests.append(StayRequest(stay_id, request))
    return requests, skipped


@contextmanager
def bench_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one run, dropped afterwards.

    Args:
        admin_url: A libpq URL of a database the user may create others from.

    Yields:
        The new database's SQLAlchemy URL.
    """
    name = f"chartsum_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
