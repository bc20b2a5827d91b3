"""Sending jobs: a durable row first, then a task that carries only its id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from celery import Celery

from pipelines.store import ChartStore
from schemas.tables import SummaryKind
from workers.constants import QUEUE_BACKFILL, QUEUE_REALTIME, TASK_SUMMARIZE

log = structlog.get_logger("chartsum.enqueue")

QUEUES = {"realtime": QUEUE_REALTIME, "backfill": QUEUE_BACKFILL}


@dataclass(frozen=True)
class SentJob:
    """A job that was sent, and whether this call created it."""

    job_id: str
    stay_id: str
    created: bool


def enqueue_stays(
    store: ChartStore,
    app: Celery,
    *,
    stay_ids: Sequence[str],
    queue: str = "realtime",
    kind: str = SummaryKind.DISCHARGE,
) -> list[SentJob]:
    """Create (or reuse) a job per stay and send its task.

    A stay that already has a queued or running job of this kind gets that
    job sent again rather than a second job: the job's lease makes the extra
    delivery harmless, and a job whose message was lost gets moving again.

    Args:
        store: The database holding the stays.
        app: The Celery app to send through.
        stay_ids: Stays to summarize.
        queue: "realtime" (EHR, at discharge) or "backfill".
        kind: Summary kind.

    Raises:
        StayNotFoundError: A stay id is not stored; nothing is sent.
    """
    queue_name = QUEUES[queue]
    jobs = store.create_jobs(kind=kind, stay_ids=stay_ids, queue=queue_name)
    sent = []
    for stay_id, (job_id, created) in zip(stay_ids, jobs, strict=True):
        app.send_task(TASK_SUMMARIZE, args=[job_id], queue=queue_name)
        sent.append(SentJob(job_id, stay_id, created))
    log.info(
        "jobs_enqueued",
        queue=queue_name,
        jobs=len(sent),
        created=sum(1 for job in sent if job.created),
    )
    return sent
