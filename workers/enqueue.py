"""Sending jobs: a durable row first, then a task that carries only its id."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

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


def enqueue_backfill(
    store: ChartStore,
    app: Celery,
    *,
    stay_ids: Sequence[str],
    queue: str = "backfill",
    kind: str = SummaryKind.DISCHARGE,
    batch_size: int = 5000,
) -> list[SentJob]:
    """Enqueue a large backfill: like ``enqueue_stays``, batch by batch.

    Each batch's job rows are written in one transaction, then its tasks
    are sent over one broker connection, without task results (the job row
    is the record; Flower still sees the task events). ``enqueue_stays`` in
    one call would send a 100k-stay list as a single query, past
    PostgreSQL's limit of 65,535 bound parameters, and reacquire a
    connection per task. A failure part-way leaves earlier batches sent and
    the current batch's rows queued; running the backfill again resends
    those (open jobs are reused).

    Args:
        store: The database holding the stays.
        app: The Celery app to send through.
        stay_ids: Stays to summarize.
        queue: "backfill" (default) or "realtime".
        kind: Summary kind.
        batch_size: Stays per transaction and per broker round (default 5000).

    Raises:
        StayNotFoundError: A stay id of the current batch is not stored; its
            batch and later ones are not sent.
    """
    queue_name = QUEUES[queue]
    sent: list[SentJob] = []
    with app.producer_or_acquire() as producer:
        for start in range(0, len(stay_ids), batch_size):
            batch = stay_ids[start : start + batch_size]
            jobs = store.create_jobs(kind=kind, stay_ids=batch, queue=queue_name)
            with _publish_batch(producer, max_size=batch_size):
                for stay_id, (job_id, created) in zip(batch, jobs, strict=True):
                    # No task result: the job row holds the outcome, and
                    # keeping results would subscribe this process to one
                    # Redis channel per task (100k for a large backfill).
                    app.send_task(
                        TASK_SUMMARIZE,
                        args=[job_id],
                        queue=queue_name,
                        producer=producer,
                        ignore_result=True,
                    )
                    sent.append(SentJob(job_id, stay_id, created))
    log.info(
        "jobs_enqueued",
        queue=queue_name,
        jobs=len(sent),
        created=sum(1 for job in sent if job.created),
    )
    return sent


def backfill_sender(app: Celery) -> Callable[[str, str], None]:
    """How ``run_backfill`` sends each job: its task, without a task result.

    The job row records the outcome; a result per task would subscribe the
    sending process to one Redis channel per job.
    """

    def send(job_id: str, queue: str) -> None:
        app.send_task(TASK_SUMMARIZE, args=[job_id], queue=queue, ignore_result=True)

    return send


def _publish_batch(producer: Any, *, max_size: int) -> AbstractContextManager[Any]:
    # kombu 5.7+ pipelines a batch's messages (and their task-sent events)
    # into a few Redis round trips; older kombu sends each one at once.
    batch = getattr(producer, "batch", None)
    return batch(max_size=max_size) if batch is not None else nullcontext()


@dataclass(frozen=True)
class SentPatientJob:
    """A patient-level job that was sent, and whether this call created it."""

    job_id: str
    patient_id: str
    created: bool


def enqueue_patients(
    store: ChartStore,
    app: Celery,
    *,
    patient_ids: Sequence[str],
    queue: str = "realtime",
    kind: str = SummaryKind.LONGITUDINAL,
) -> list[SentPatientJob]:
    """Create (or reuse) a longitudinal job per patient and send its task.

    The job has the patient id and no stay id; the worker reads all of the
    patient's stored stays when it runs, reusing their discharge summaries.

    Args:
        store: The database holding the patients' stays.
        app: The Celery app to send through.
        patient_ids: Patients to summarize across their stays.
        queue: "realtime" or "backfill".
        kind: Summary kind (longitudinal).

    Raises:
        StayNotFoundError: A patient has no stored stay; nothing is sent.
    """
    queue_name = QUEUES[queue]
    jobs = store.create_patient_jobs(
        kind=kind, patient_ids=patient_ids, queue=queue_name
    )
    sent = []
    for patient_id, (job_id, created) in zip(patient_ids, jobs, strict=True):
        app.send_task(TASK_SUMMARIZE, args=[job_id], queue=queue_name)
        sent.append(SentPatientJob(job_id, patient_id, created))
    log.info(
        "jobs_enqueued",
        queue=queue_name,
        kind=kind,
        jobs=len(sent),
        created=sum(1 for job in sent if job.created),
    )
    return sent
