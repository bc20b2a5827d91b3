"""What operators need from the database: stuck jobs, counts, failures.

The sweep finds jobs that no delivery will finish on its own: running with
an expired lease (the worker died and Redis has not redelivered yet), or
queued for longer than any message should wait (the message was lost, for
example when Redis restarted without persistence). Sending their task again
is always safe: the job's lease decides who runs it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update

from pipelines.store import ChartStore, utcnow
from schemas.tables import Job, JobState, Summary


@dataclass(frozen=True)
class StuckJob:
    """A job the sweep sends again."""

    job_id: str
    queue: str
    state: str


@dataclass(frozen=True)
class FailedJob:
    """A recent failure, as `chartsum status` shows it."""

    job_id: str
    stay_id: str | None
    state: str
    error_code: str | None
    error: str | None
    finished_at: datetime | None


@dataclass(frozen=True)
class JobRow:
    """One job as `chartsum jobs` lists it: ids, state and counts only."""

    job_id: str
    kind: str
    #: The stay id, or the patient id of a patient-level job.
    subject: str | None
    state: str
    route: str | None
    support_rate: float | None
    error_code: str | None
    created_at: datetime
    finished_at: datetime | None


def list_jobs(
    store: ChartStore,
    *,
    states: Collection[str] = (),
    error_code: str | None = None,
    kind: str | None = None,
    limit: int = 50,
    latest: bool = False,
) -> list[JobRow]:
    """The newest jobs, filtered, with their summary's support rate.

    Args:
        store: The database.
        states: Only jobs in these states; all states when empty.
        error_code: Only jobs that ended with this code (``low_support``).
        kind: Only jobs of this kind (``discharge``, ``longitudinal``).
        limit: Most jobs returned.
        latest: Only the newest job of each stay (or patient) and kind,
            before the other filters: a stay summarized again leaves its
            older job out of the review queue.
    """
    subject = func.coalesce(Job.stay_id, Job.patient_id)
    query = (
        select(
            Job.id,
            Job.kind,
            subject,
            Job.state,
            Job.route,
            Summary.support_rate,
            Job.error_code,
            Job.created_at,
            Job.finished_at,
        )
        .outerjoin(Summary, Summary.job_id == Job.id)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
    )
    if latest:
        rank = func.row_number().over(
            partition_by=(subject, Job.kind),
            order_by=(Job.created_at.desc(), Job.id.desc()),
        )
        ranked = select(Job.id, rank.label("rank")).subquery()
        query = query.where(Job.id.in_(select(ranked.c.id).where(ranked.c.rank == 1)))
    if states:
        query = query.where(Job.state.in_(list(states)))
    if error_code is not None:
        query = query.where(Job.error_code == error_code)
    if kind is not None:
        query = query.where(Job.kind == kind)
    with store.session() as session:
        rows = session.execute(query).all()
    return [JobRow(*row) for row in rows]


def find_stuck_jobs(
    store: ChartStore, *, queued_stale_s: int, limit: int = 1000
) -> list[StuckJob]:
    """Jobs to send again: expired leases, and queued jobs left too long.

    Args:
        store: The database.
        queued_stale_s: A queued job untouched this long is taken as lost.
        limit: Most jobs returned per sweep.
    """
    now = utcnow()
    expired = (Job.state == JobState.RUNNING) & (Job.lease_until < now)
    stale = (Job.state == JobState.QUEUED) & (
        func.coalesce(Job.updated_at, Job.created_at)
        < now - timedelta(seconds=queued_stale_s)
    )
    with store.session() as session:
        rows = session.execute(
            select(Job.id, Job.queue, Job.state)
            .where(expired | stale)
            .order_by(Job.created_at)
            .limit(limit)
        ).all()
    return [StuckJob(job_id, queue, state) for job_id, queue, state in rows]


def touch_jobs(store: ChartStore, job_ids: list[str]) -> None:
    """Mark queued jobs as just sent, so the next sweep waits for them again."""
    if not job_ids:
        return
    with store.session() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.state == JobState.QUEUED)
            .values(updated_at=utcnow())
        )


def count_jobs_by_state(store: ChartStore) -> dict[str, int]:
    """How many jobs are in each state."""
    with store.session() as session:
        rows = session.execute(
            select(Job.state, func.count()).group_by(Job.state)
        ).all()
    return {state: count for state, count in rows}


def recent_failures(store: ChartStore, *, limit: int = 10) -> list[FailedJob]:
    """The newest jobs that ended failed or needs_review, with their reasons."""
    with store.session() as session:
        rows = session.execute(
            select(
                Job.id,
                Job.stay_id,
                Job.state,
                Job.error_code,
                Job.error,
                Job.finished_at,
            )
            .where(Job.state.in_([JobState.FAILED, JobState.NEEDS_REVIEW]))
            .order_by(Job.finished_at.desc())
            .limit(limit)
        ).all()
    return [FailedJob(*row) for row in rows]
