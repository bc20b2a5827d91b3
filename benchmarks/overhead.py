"""chartsum's own cost per job, and its enqueue rate, with no model at all.

Every measurement here uses ``InstantEngine``: what remains is claiming the
job, loading the chart, tokenizing, routing, validating and writing, plus
Celery and Redis when jobs go through a worker.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from sqlalchemy import delete

from benchmarks.instant import InstantEngine, copy_stay
from benchmarks.worker_process import read_job_lines, stage_samples
from pipelines.logs import configure_logging
from pipelines.routing import EffectiveContext
from pipelines.store import ChartStore
from pipelines.summarize import Summarizer
from pipelines.tokens import TokenCounter
from schemas.settings import LoggingSettings, Settings
from schemas.tables import Job, Note, Stay
from workers.constants import QUEUE_BACKFILL
from workers.enqueue import backfill_sender, enqueue_backfill, enqueue_stays


@dataclass
class InProcessOverhead:
    """Jobs run one after another on one thread, engine answering at once."""

    jobs: int
    wall_s: float
    stage_ms: dict[str, list[float]]

    @property
    def ms_per_job(self) -> float:
        """Wall milliseconds per job."""
        return self.wall_s * 1000 / self.jobs if self.jobs else math.nan


@dataclass
class EnqueueRate:
    """How fast jobs were created and sent."""

    path: str
    jobs: int
    wall_s: float
    note: str = ""

    @property
    def jobs_per_s(self) -> float:
        """Jobs created and sent per second."""
        return self.jobs / self.wall_s if self.wall_s > 0 else math.nan


def copy_stays(
    store: ChartStore, templates: Sequence[str], *, count: int, prefix: str
) -> list[str]:
    """``count`` stays copied round-robin from the templates, interleaved."""
    per_template = math.ceil(count / len(templates))
    groups = [
        copy_stay(store, template_id=t, count=per_template, prefix=f"{prefix}{i}-")
        for i, t in enumerate(templates)
    ]
    mixed = [stay for row in zip(*groups, strict=True) for stay in row]
    return mixed[:count]


def run_in_process(
    stay_ids: Sequence[str],
    *,
    store: ChartStore,
    settings: Settings,
    tokens: TokenCounter,
    fingerprint: str,
    context: EffectiveContext,
    log_path: Path,
) -> InProcessOverhead:
    """Run one job per stay through ``Summarizer.process_job``, one at a time.

    Job lines are logged as JSON to ``log_path`` (the rendering cost is
    part of the overhead) and read back for the stage times.
    """
    summarizer = Summarizer(
        settings=settings,
        store=store,
        engine=InstantEngine(),
        tokens=tokens,
        model_fingerprint=fingerprint,
        context=context,
    )
    jobs = store.create_jobs(kind="discharge", stay_ids=stay_ids, queue="bench")
    with _job_log_to(log_path):
        started = time.perf_counter()
        for job_id, _ in jobs:
            summarizer.process_job(job_id)
        wall_s = time.perf_counter() - started
    stages = stage_samples(read_job_lines(log_path))
    return InProcessOverhead(len(jobs), wall_s, stages)


@contextmanager
def _job_log_to(path: Path) -> Iterator[None]:
    configure_logging(LoggingSettings(level="INFO", json_logs=True))
    handler = logging.getLogger().handlers[0]
    with path.open("w") as stream:
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        try:
            yield
        finally:
            handler.setStream(sys.stderr)
            configure_logging(LoggingSettings(level="WARNING", json_logs=False))


def measure_enqueue(
    store: ChartStore,
    app: Celery,
    templates: Sequence[str],
    *,
    jobs: int,
    sample_jobs: int,
) -> list[EnqueueRate]:
    """Enqueue a backfill of ``jobs`` stays both ways, then remove it again.

    ``enqueue_stays`` is timed on all of them; past PostgreSQL's limit of
    65,535 bound parameters it fails at once, and is then timed on
    ``sample_jobs`` instead. ``enqueue_backfill`` is timed on all. Nothing
    consumes the backfill queue meanwhile; it is purged after each try.
    """
    prefix = "bf"
    stay_ids = copy_stays(store, templates, count=jobs, prefix=prefix)
    rates = []
    try:
        rates.append(_timed_enqueue("enqueue_stays", store, app, stay_ids))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:100]
        rates.append(EnqueueRate("enqueue_stays", jobs, 0.0, f"fails: {reason}"))
        _clear_backfill(store, app)
        sample = stay_ids[:sample_jobs]
        rates.append(_timed_enqueue("enqueue_stays", store, app, sample))
    _clear_backfill(store, app)
    rates.append(_timed_enqueue("enqueue_backfill", store, app, stay_ids))
    _clear_backfill(store, app)
    rates.append(_timed_run_backfill(store, app))
    _clear_backfill(store, app)
    with store.engine.begin() as conn:
        conn.execute(delete(Note).where(Note.stay_id.like(f"{prefix}%")))
        conn.execute(delete(Stay).where(Stay.id.like(f"{prefix}%")))
    return rates


def _timed_enqueue(
    path: str, store: ChartStore, app: Celery, stay_ids: Sequence[str]
) -> EnqueueRate:
    send = enqueue_backfill if path == "enqueue_backfill" else enqueue_stays
    started = time.perf_counter()
    send(store, app, stay_ids=stay_ids, queue="backfill")
    return EnqueueRate(path, len(stay_ids), time.perf_counter() - started)


def _timed_run_backfill(store: ChartStore, app: Celery) -> EnqueueRate:
    """``chartsum backfill``'s own path: pages of stays, rows, one send each."""
    from datetime import UTC, datetime

    from pipelines.backfill import BackfillRequest, run_backfill

    request = BackfillRequest(
        since=datetime(1900, 1, 1, tzinfo=UTC), until=datetime(2200, 1, 1, tzinfo=UTC)
    )
    started = time.perf_counter()
    counts = run_backfill(
        store,
        request,
        send=backfill_sender(app),
        queue=QUEUE_BACKFILL,
    )
    wall_s = time.perf_counter() - started
    note = f"{counts.queued} queued, {counts.skipped} skipped (the templates included)"
    return EnqueueRate("run_backfill (chartsum backfill)", counts.queued, wall_s, note)


def _clear_backfill(store: ChartStore, app: Celery) -> None:
    app.control.purge()
    _delete_jobs(store)


def _delete_jobs(store: ChartStore) -> None:
    with store.engine.begin() as conn:
        # Every job the enqueue paths made (run_backfill also takes stays
        # that are not copies); the other measurements use other queues.
        conn.execute(delete(Job).where(Job.queue == QUEUE_BACKFILL))
