"""Backfills: re-summarizing history, resumable and idempotent.

A backfill is identified by its arguments. Its row keeps a cursor (the last
stay id handled, stays being walked in id order) and its counts, committed
page by page; running the same backfill again resumes after the cursor, and
once finished it queues nothing new. Stays with a job still queued or
running are skipped, so a backfill never doubles live work.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import and_, exists, func, or_, select

from pipelines.store import ChartStore, utcnow
from schemas.tables import Backfill, Job, JobState, Stay, Summary, SummaryKind

log = structlog.get_logger("chartsum.backfill")

#: Stays read and queued per transaction; also the resume granularity.
PAGE_SIZE = 500

#: Sends one job's task: (job id, queue name). Raises if the broker is down.
SendJob = Callable[[str, str], None]
#: Told after each page: (queued, skipped, failed) so far.
ProgressHook = Callable[[int, int, int], None]


@dataclass(frozen=True)
class BackfillRequest:
    """What to re-summarize.

    Attributes:
        since: Stays discharged at or after this time (admitted, when the
            discharge time is unknown).
        until: ... and before this time.
        kind: Summary kind.
        missing_only: Only stays without a succeeded summary of the kind.
        model_changed_from: When set (the current model fingerprint), stays
            whose newest summary was made by another model.
    """

    since: datetime
    until: datetime
    kind: str = "discharge"
    missing_only: bool = False
    model_changed_from: str | None = None

    @property
    def backfill_id(self) -> str:
        """A stable id: the same arguments give the same backfill."""
        payload = json.dumps(asdict(self), default=str, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BackfillCounts:
    """The outcome of a backfill run (cumulative over resumes)."""

    backfill_id: str
    queued: int
    skipped: int
    failed: int
    already_finished: bool = False


def count_backfill_stays(store: ChartStore, request: BackfillRequest) -> int:
    """How many stays (longitudinal: patients) fall in the backfill's window."""
    counted = (
        func.count(func.distinct(Stay.patient_id))
        if request.kind == SummaryKind.LONGITUDINAL
        else func.count()
    )
    with store.session() as session:
        return int(
            session.execute(
                select(counted).select_from(Stay).where(_in_window(request))
            ).scalar_one()
        )


def run_backfill(
    store: ChartStore,
    request: BackfillRequest,
    *,
    send: SendJob,
    queue: str,
    rate_limit_per_s: float = 0.0,
    progress: ProgressHook | None = None,
) -> BackfillCounts:
    """Queue a job for every stay the request selects, resuming if interrupted.

    Args:
        store: The database.
        request: The selection.
        send: Sends a job's task; a failure counts the stay as failed (its
            job stays queued, and the periodic sweep sends it later).
        queue: Queue name for the jobs.
        rate_limit_per_s: Most jobs sent per second; 0 means no limit.
        progress: Called after each page with the running counts.
    """
    backfill_id = request.backfill_id
    row = _open_backfill(store, request)
    if row.finished_at is not None:
        return BackfillCounts(
            backfill_id, row.queued, row.skipped, row.failed, already_finished=True
        )
    queued, skipped, failed = row.queued, row.skipped, row.failed
    cursor = row.cursor
    interval_s = 1.0 / rate_limit_per_s if rate_limit_per_s > 0 else 0.0
    next_send = time.monotonic()
    longitudinal = request.kind == SummaryKind.LONGITUDINAL
    while True:
        if longitudinal:
            page = _next_patient_page(store, request, after=cursor)
        else:
            page = _next_page(store, request, after=cursor)
        if not page:
            break
        wanted_ids = [key for key, wanted in page if wanted]
        skipped += len(page) - len(wanted_ids)
        # One transaction writes the page's job rows; then each is sent.
        if longitudinal:
            jobs = store.create_patient_jobs(
                kind=request.kind,
                patient_ids=wanted_ids,
                queue=queue,
                origin=backfill_id,
            )
        else:
            jobs = store.create_jobs(
                kind=request.kind, stay_ids=wanted_ids, queue=queue, origin=backfill_id
            )
        for job_id, created in jobs:
            if not created and not _ours_and_unsent(store, job_id, backfill_id):
                skipped += 1
                continue
            next_send = _wait_for_rate(next_send, interval_s)
            try:
                send(job_id, queue)
                queued += 1
            except Exception as exc:  # the broker is down or refused
                failed += 1
                log.warning(
                    "backfill_send_failed", job_id=job_id, error=type(exc).__name__
                )
        cursor = page[-1][0]
        _save_progress(store, backfill_id, cursor, queued, skipped, failed)
        if progress is not None:
            progress(queued, skipped, failed)
    _save_progress(store, backfill_id, cursor, queued, skipped, failed, done=True)
    log.info(
        "backfill_completed",
        backfill_id=backfill_id,
        queued=queued,
        skipped=skipped,
        failed=failed,
    )
    return BackfillCounts(backfill_id, queued, skipped, failed)


def _ours_and_unsent(store: ChartStore, job_id: str, backfill_id: str) -> bool:
    # A job this backfill created whose send was interrupted: send it now
    # (a duplicate message is harmless, the job's lease decides).
    job = store.get_job(job_id)
    return job is not None and job.origin == backfill_id and job.state == "queued"


def _in_window(request: BackfillRequest):  # type: ignore[no-untyped-def]
    when = func.coalesce(Stay.discharge_time, Stay.admit_time)
    return and_(when >= request.since, when < request.until)


def _next_page(
    store: ChartStore, request: BackfillRequest, *, after: str | None
) -> list[tuple[str, bool]]:
    """The next stays in id order, each with whether the request wants it."""
    wanted = _wanted(
        request,
        job_of=Job.stay_id == Stay.id,
        summary_of=Summary.stay_id == Stay.id,
    )
    query = (
        select(Stay.id, wanted)
        .where(_in_window(request))
        .order_by(Stay.id)
        .limit(PAGE_SIZE)
    )
    if after is not None:
        query = query.where(Stay.id > after)
    with store.session() as session:
        return [(stay_id, bool(flag)) for stay_id, flag in session.execute(query)]


def _next_patient_page(
    store: ChartStore, request: BackfillRequest, *, after: str | None
) -> list[tuple[str, bool]]:
    """The next patients with a stay in the window, in id order, each with
    whether the request wants a longitudinal summary for them.
    """
    patients = select(Stay.patient_id).where(_in_window(request)).distinct()
    if after is not None:
        patients = patients.where(Stay.patient_id > after)
    page = patients.order_by(Stay.patient_id).limit(PAGE_SIZE).subquery()
    patient_id = page.c.patient_id
    wanted = _wanted(
        request,
        job_of=(Job.patient_id == patient_id) & Job.stay_id.is_(None),
        summary_of=Summary.patient_id == patient_id,
    )
    query = select(patient_id, wanted).order_by(patient_id)
    with store.session() as session:
        return [(key, bool(flag)) for key, flag in session.execute(query)]


def _wanted(request: BackfillRequest, *, job_of: Any, summary_of: Any) -> Any:
    """Whether the request wants a new job for a stay or patient.

    ``job_of`` and ``summary_of`` tie a job and a summary row to the stay or
    patient being selected. Never when a job of its own is still open (a
    queued job of this very backfill may still need its message); then, if
    asked, only without a summary or with one by another model.
    """
    open_job = exists().where(
        job_of,
        Job.kind == request.kind,
        Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
        ~((Job.origin == request.backfill_id) & (Job.state == JobState.QUEUED)),
    )
    done = exists().where(summary_of, Summary.kind == request.kind)
    reasons = []
    if request.missing_only:
        reasons.append(~done)
    if request.model_changed_from is not None:
        newest = (
            select(Summary.model_fingerprint)
            .where(summary_of, Summary.kind == request.kind)
            .order_by(Summary.created_at.desc(), Summary.id.desc())
            .limit(1)
            .scalar_subquery()
        )
        reasons.append(done & (newest != request.model_changed_from))
    return ~open_job & or_(*reasons) if reasons else ~open_job


def _open_backfill(store: ChartStore, request: BackfillRequest) -> Backfill:
    with store.session() as session:
        row = session.get(Backfill, request.backfill_id)
        if row is None:
            row = Backfill(
                id=request.backfill_id,
                arguments=json.loads(json.dumps(asdict(request), default=str)),
                cursor=None,
                queued=0,
                skipped=0,
                failed=0,
            )
            session.add(row)
        found: Backfill = row
        return found


def _save_progress(
    store: ChartStore,
    backfill_id: str,
    cursor: str | None,
    queued: int,
    skipped: int,
    failed: int,
    *,
    done: bool = False,
) -> None:
    with store.session() as session:
        row = session.get(Backfill, backfill_id)
        assert row is not None
        row.cursor, row.queued, row.skipped, row.failed = (
            cursor,
            queued,
            skipped,
            failed,
        )
        if done:
            row.finished_at = utcnow()


def _wait_for_rate(next_send: float, interval_s: float) -> float:
    if interval_s <= 0:
        return next_send
    delay_s = next_send - time.monotonic()
    if delay_s > 0:
        time.sleep(delay_s)
    return max(next_send, time.monotonic()) + interval_s
