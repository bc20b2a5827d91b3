"""Celery task entry points: thin adapters around pipelines.summarize.

A task loads nothing but the job id, binds log context, calls one pipeline
function and turns the outcome into success, retry or failure. Arguments and
results hold ids and counts only, so Redis and Flower never see note text.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from celery import Celery, Task

from pipelines.errors import RetryableError
from pipelines.summarize import Summarizer
from schemas.settings import Settings
from schemas.tables import JobState
from workers.constants import (
    MAX_RETRIES,
    RETRY_BACKOFF_MAX_S,
    RETRY_BACKOFF_S,
    TASK_SUMMARIZE,
)

log = structlog.get_logger("chartsum.worker")

_lock = threading.Lock()
_summarizer: Summarizer | None = None


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


def _run(task: Task, summarizer: Summarizer, job_id: str) -> dict[str, Any]:
    try:
        outcome = summarizer.process_job(job_id)
    except RetryableError as exc:
        retries = task.request.retries
        if retries >= MAX_RETRIES:
            summarizer.store.fail_job(
                job_id,
                state=JobState.FAILED,
                error_code="retries_exhausted",
                error=f"gave up after {retries + 1} tries: {exc}",
            )
            log.error("job_retries_exhausted", retries=retries)
            return {"job_id": job_id, "state": JobState.FAILED, "ran": True}
        delay_s = retry_delay_s(retries)
        log.warning("job_retry_scheduled", delay_s=delay_s, retries=retries)
        raise task.retry(exc=exc, countdown=delay_s) from None
    except Exception as exc:
        # A bug, not a bad stay: end this job, keep the worker and the rest of
        # the queue going. The traceback goes to the log; the job row gets
        # only the exception type (its message could quote input).
        log.exception("job_crashed")
        summarizer.store.fail_job(
            job_id,
            state=JobState.FAILED,
            error_code="internal_error",
            error=(
                f"internal error ({type(exc).__name__}); see the worker log"
                f" for job {job_id}"
            ),
        )
        return {"job_id": job_id, "state": JobState.FAILED, "ran": True}
    return outcome.as_result()
