"""Celery task entry points: thin adapters around pipelines.summarize.

A task loads nothing but the job id, binds log context, calls one pipeline
function and turns the outcome into success, retry or failure. Arguments and
results hold ids and counts only, so Redis and Flower never see note text.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import structlog
from celery import Celery, Task

from pipelines.errors import EngineDeadError, RetryableError
from pipelines.summarize import Summarizer, crash_error
from schemas.settings import Settings
from schemas.tables import JobState
from workers.constants import (
    MAX_RETRIES,
    QUEUE_BACKFILL,
    RETRY_BACKOFF_MAX_S,
    RETRY_BACKOFF_S,
    TASK_NIGHTLY_BACKFILL,
    TASK_SUMMARIZE,
    TASK_SWEEP,
)

log = structlog.get_logger("chartsum.worker")

_lock = threading.Lock()
_summarizer: Summarizer | None = None
_engine_died = threading.Event()


def engine_died() -> bool:
    """Whether a task of this process saw its in-process engine die."""
    return _engine_died.is_set()


def _shut_down_for_dead_engine() -> None:
    """Ask this worker for a warm shutdown, once.

    The engine cannot come back inside this process, so every job it took
    would only fail and retry. SIGTERM is Celery's warm shutdown: jobs in
    flight end (and retry elsewhere), nothing new is taken, and ``chartsum
    worker`` exits with EXIT_ENGINE_DEAD so its supervisor restarts it.
    """
    with _lock:  # several job threads may see the death at once
        if _engine_died.is_set():
            return
        _engine_died.set()
    log.critical("engine_dead_worker_shutting_down")
    os.kill(os.getpid(), signal.SIGTERM)


def install_summarizer(summarizer: Summarizer) -> None:
    """Use this summarizer for every task of the process (built at worker start)."""
    global _summarizer
    with _lock:
        _summarizer = summarizer


def get_summarizer(settings: Settings) -> Summarizer:
    """The process's summarizer, built on first use when the CLI did not."""
    global _summarizer
    with _lock:
        if _summarizer is None:
            from pipelines.runtime import build_summarizer

            _summarizer = build_summarizer(settings)
        return _summarizer


def retry_delay_s(retries: int) -> int:
    """Seconds before retry number ``retries + 1``: doubling, capped."""
    return int(min(RETRY_BACKOFF_S * 2**retries, RETRY_BACKOFF_MAX_S))


def register(app: Celery) -> None:
    """Register chartsum's tasks on an app."""

    @app.task(
        name=TASK_SUMMARIZE,
        shared=False,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=MAX_RETRIES,
        throws=(RetryableError,),
    )
    def summarize(self: Task, job_id: str) -> dict[str, Any]:
        """Summarize one job by id; see pipelines.summarize.Summarizer.process_job."""
        settings: Settings = self.app.conf.chartsum_settings
        structlog.contextvars.bind_contextvars(
            task_id=self.request.id, task_name=self.name, job_id=job_id
        )
        try:
            summarizer = get_summarizer(settings)
            return _run(self, summarizer, job_id)
        finally:
            structlog.contextvars.clear_contextvars()

    @app.task(name=TASK_SWEEP, bind=True, ignore_result=True, shared=False)
    def sweep_jobs(self: Task) -> dict[str, int]:
        """Send again every job no delivery will finish on its own."""
        from pipelines.operations import find_stuck_jobs, touch_jobs
        from pipelines.runtime import open_store

        settings: Settings = self.app.conf.chartsum_settings
        store = open_store(settings)
        try:
            stuck = find_stuck_jobs(
                store, queued_stale_s=settings.operations.queued_stale_s
            )
            for job in stuck:
                self.app.send_task(TASK_SUMMARIZE, args=[job.job_id], queue=job.queue)
            touch_jobs(store, [job.job_id for job in stuck])
        finally:
            store.close()
        if stuck:
            log.warning("stuck_jobs_resent", jobs=len(stuck))
        return {"resent": len(stuck)}

    @app.task(name=TASK_NIGHTLY_BACKFILL, bind=True, shared=False)
    def nightly_backfill(self: Task) -> dict[str, Any]:
        """Queue summaries missing, or made by another model, for recent stays."""
        from datetime import timedelta

        from pipelines.backfill import BackfillRequest, run_backfill
        from pipelines.model import model_fingerprint
        from pipelines.runtime import open_store
        from pipelines.store import utcnow
        from workers.enqueue import backfill_sender

        settings: Settings = self.app.conf.chartsum_settings
        today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
        request = BackfillRequest(
            since=today - timedelta(days=settings.operations.nightly_backfill_days),
            until=today,
            missing_only=True,
            model_changed_from=model_fingerprint(settings.model_dir),
        )
        store = open_store(settings)
        try:
            counts = run_backfill(
                store,
                request,
                send=backfill_sender(self.app),
                queue=QUEUE_BACKFILL,
                rate_limit_per_s=settings.operations.backfill_rate_limit_per_s,
            )
        finally:
            store.close()
        return {
            "backfill_id": counts.backfill_id,
            "queued": counts.queued,
            "skipped": counts.skipped,
            "failed": counts.failed,
        }


def _run(task: Task, summarizer: Summarizer, job_id: str) -> dict[str, Any]:
    def report(stage: str, meta: dict[str, Any]) -> None:
        # A custom task state Flower shows for running jobs: ids and counts.
        if task.request.id is not None:
            task.update_state(
                state="PROGRESS", meta={"job_id": job_id, "stage": stage, **meta}
            )

    retries = task.request.retries
    last_try = retries >= MAX_RETRIES
    try:
        outcome = summarizer.process_job(job_id, on_progress=report, last_try=last_try)
    except RetryableError as exc:
        if isinstance(exc, EngineDeadError):
            _shut_down_for_dead_engine()
        if last_try:
            # Only a dead engine, or a database that failed the final write
            # too, gets here. The job row says how it ended; if the write
            # failed, its lease runs out and the sweeper sends it again.
            raise
        delay_s = retry_delay_s(retries)
        log.warning("job_retry_scheduled", delay_s=delay_s, retries=retries)
        raise task.retry(exc=exc, countdown=delay_s) from None
    except Exception as exc:
        # A bug outside the claimed part of process_job (which ends its own
        # claimed jobs): end this job unless a delivery holds a live lease
        # on it, and keep the worker and the rest of the queue going.
        crashed = crash_error(exc, job_id)
        summarizer.store.fail_job(
            job_id,
            state=JobState.FAILED,
            error_code=crashed.code,
            error=str(crashed),
            unleased_only=True,
        )
        return {"job_id": job_id, "state": JobState.FAILED, "ran": True}
    return outcome.as_result()
