"""The database behind one small class: stays in, jobs and summaries out.

Every write is idempotent, because delivery is at least once: ingesting the
same stay twice changes nothing, a job is claimed under a lease, and a job
has at most one summary (a unique key, not a check-then-insert).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import case, create_engine, event, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pipelines.errors import StayNotFoundError, StoreUnavailableError
from pipelines.stays import Chart, ChartNote, canonical_sha256
from schemas.stay import StayRecord
from schemas.tables import (
    FINAL_STATES,
    Job,
    JobState,
    Note,
    Patient,
    Stay,
    Summary,
)

#: Ids per IN (...) lookup; well under PostgreSQL's parameter limit.
ID_SLICE = 10_000

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "migrations"


@dataclass(frozen=True)
class IngestCounts:
    """What an ingest did, stay by stay."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    #: (stay id, reason) for each stay not stored.
    rejected: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ClaimedJob:
    """A job this delivery holds the lease on."""

    job_id: str
    kind: str
    stay_id: str | None
    patient_id: str | None
    attempt: int
    lease_owner: str


@dataclass(frozen=True)
class NewSummary:
    """A validated summary ready to be written with its job."""

    job_id: str
    kind: str
    stay_id: str | None
    patient_id: str | None
    schema_version: str
    payload: dict[str, Any]
    model_name: str
    model_fingerprint: str
    route: str
    prompt_tokens: int
    completion_tokens: int
    input_sha256: str
    generation_ms: int
    total_ms: int
    support_rate: float | None = None
    support: dict[str, Any] | None = None


def utcnow() -> datetime:
    """The current time in UTC (one clock for leases everywhere)."""
    return datetime.now(UTC)


class ChartStore:
    """Stays, notes, jobs and summaries in PostgreSQL or SQLite.

    Args:
        url: SQLAlchemy URL (``postgresql+psycopg://...`` or ``sqlite:///...``).
        pool_size: Connections kept open per process (PostgreSQL only).
    """

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        self.engine = _make_engine(url, pool_size=pool_size)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe to repeat)."""
        from alembic import command
        from alembic.config import Config

        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection_url"] = self.url
        with self._translate_errors():
            command.upgrade(config, "head")

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def ingest(self, stays: Sequence[StayRecord]) -> IngestCounts:
        """Store stays with their notes; unchanged stays are left as they are.

        A stay whose content changed gets its notes replaced, so its next
        summary is made from the new chart (summaries keep the hash of the
        chart they were made from).
        """
        added = updated = unchanged = 0
        rejected: list[tuple[str, str]] = []
        with self._session() as session:
            for record in stays:
                digest = canonical_sha256(record)
                existing = session.get(Stay, record.stay_id)
                if existing is not None and existing.content_sha256 == digest:
                    unchanged += 1
                    continue
                if existing is not None and existing.patient_id != record.patient_id:
                    # Moving a stay (and its summaries) to another patient is
                    # how charts get mixed up: refuse it and keep the stored one.
                    rejected.append(
                        (
                            record.stay_id,
                            "stored for another patient_id; a stay never moves"
                            " between patients (fix the source, or give the stay"
                            " a new id)",
                        )
                    )
                    continue
                _upsert_patient(session, record)
                row = _stay_row(record, digest)
                if existing is not None:
                    # Update in place: jobs and summaries keep pointing at it.
                    session.query(Note).filter_by(stay_id=record.stay_id).delete()
                    for column in Stay.__table__.columns.keys():  # noqa: SIM118
                        if column not in ("id", "ingested_at"):
                            setattr(existing, column, getattr(row, column))
                    updated += 1
                else:
                    session.add(row)
                    added += 1
                session.flush()
                session.add_all(_note_rows(record))
        return IngestCounts(added, updated, unchanged, rejected)

    def stay_changed_since(self, summary: Summary) -> bool:
        """Whether a stay summary's chart was re-ingested with other content."""
        with self._session() as session:
            digest = session.scalar(
                select(Stay.content_sha256).where(Stay.id == summary.stay_id)
            )
        return digest is not None and digest != summary.input_sha256

    def stay_ids(self) -> list[str]:
        """Every stored stay id, sorted."""
        with self._session() as session:
            return list(session.scalars(select(Stay.id).order_by(Stay.id)))

    def load_chart(self, stay_id: str) -> Chart:
        """A stay with its notes in chart order.

        Raises:
            StayNotFoundError: No stay has this id.
        """
        with self._session() as session:
            stay = session.get(Stay, stay_id)
            if stay is None:
                raise StayNotFoundError(f"stay {stay_id} is not in the database")
            notes = session.scalars(
                select(Note).filter_by(stay_id=stay_id).order_by(Note.position)
            )
            chart_notes = tuple(
                ChartNote(n.id, n.note_type, n.charted_at, n.text) for n in notes
            )
            return Chart(
                stay_id=stay.id,
                patient_id=stay.patient_id,
                content_sha256=stay.content_sha256,
                encounter_class=stay.encounter_class,
                reason_for_visit=stay.reason_for_visit,
                admit_time=stay.admit_time,
                discharge_time=stay.discharge_time,
                record=stay.record,
                notes=chart_notes,
            )

    def create_jobs(
        self,
        *,
        kind: str,
        stay_ids: Sequence[str],
        queue: str,
        origin: str | None = None,
    ) -> list[tuple[str, bool]]:
        """Create one job per stay, reusing a job still queued or running.

        Returns:
            (job id, created) per stay, in the order given.

        Raises:
            StayNotFoundError: A stay id is not stored; no job is created.
        """
        results: list[tuple[str, bool]] = []
        with self._session() as session:
            known: set[str] = set()
            open_jobs: dict[str | None, str] = {}
            # PostgreSQL takes at most 65,535 bound parameters per statement:
            # look ids up in slices so a 100k backfill works.
            for start in range(0, len(stay_ids), ID_SLICE):
                ids = list(stay_ids[start : start + ID_SLICE])
                known.update(session.scalars(select(Stay.id).where(Stay.id.in_(ids))))
                open_jobs.update(
                    session.execute(
                        select(Job.stay_id, Job.id).where(
                            Job.stay_id.in_(ids),
                            Job.kind == kind,
                            Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
                        )
                    ).all()
                )
            missing = [stay_id for stay_id in stay_ids if stay_id not in known]
            if missing:
                raise StayNotFoundError(
                    f"{len(missing)} stay id(s) not in the database, e.g."
                    f" {missing[0]}; ingest them first"
                )
            now = utcnow()
            new_rows: list[dict[str, Any]] = []
            for stay_id in stay_ids:
                if stay_id in open_jobs:
                    results.append((open_jobs[stay_id], False))
                    continue
                job_id = str(uuid.uuid4())
                new_rows.append(
                    {
                        "id": job_id,
                        "kind": kind,
                        "stay_id": stay_id,
                        "state": JobState.QUEUED,
                        "queue": queue,
                        "origin": origin,
                        "attempts": 0,
                        "lost_deliveries": 0,
                        "generation_attempts": 0,
                        "updated_at": now,
                    }
                )
                open_jobs[stay_id] = job_id
                results.append((job_id, True))
            # One executemany (batched VALUES lists) instead of one ORM
            # object per row: a 100k backfill spends its time sending, not here.
            for start in range(0, len(new_rows), ID_SLICE):
                session.execute(insert(Job), new_rows[start : start + ID_SLICE])
        return results

    def claim_job(
        self,
        job_id: str,
        *,
        lease_s: int,
        owner: str | None = None,
        max_lost_deliveries: int = 3,
    ) -> ClaimedJob | None:
        """Take the lease on a job for this delivery.

        A job can be claimed when it is queued, or running with an expired
        lease (its worker died: a lost delivery). One UPDATE decides, so two
        deliveries of the same job cannot both win. A job that has already
        lost ``max_lost_deliveries`` deliveries is set aside as failed
        instead: it probably kills its worker, and the queue must go on.

        Returns:
            The claimed job, or None when the job is final, leased by another
            delivery, set aside, or unknown.
        """
        owner = owner or uuid.uuid4().hex
        now = utcnow()
        with self._session() as session:
            expired = (Job.state == JobState.RUNNING) & (Job.lease_until < now)
            session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    expired,
                    Job.lost_deliveries + 1 >= max_lost_deliveries,
                )
                .values(
                    state=JobState.FAILED,
                    lost_deliveries=Job.lost_deliveries + 1,
                    error_code="too_many_lost_deliveries",
                    error=(
                        f"set aside: {max_lost_deliveries} deliveries ended"
                        " without finishing (worker killed or lost); check the"
                        " worker logs for this job id before re-enqueueing"
                    ),
                    lease_owner=None,
                    lease_until=None,
                    finished_at=now,
                    updated_at=now,
                )
            )
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, (Job.state == JobState.QUEUED) | expired)
                .values(
                    state=JobState.RUNNING,
                    attempts=Job.attempts + 1,
                    lost_deliveries=Job.lost_deliveries
                    + case((Job.state == JobState.RUNNING, 1), else_=0),
                    lease_owner=owner,
                    lease_until=now + timedelta(seconds=lease_s),
                    started_at=func.coalesce(Job.started_at, now),
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            job = session.get(Job, job_id)
            assert job is not None
            return ClaimedJob(
                job.id, job.kind, job.stay_id, job.patient_id, job.attempts, owner
            )

    def renew_lease(self, job_id: str, *, owner: str, lease_s: int) -> bool:
        """Extend a running job's lease to ``lease_s`` seconds from now.

        One UPDATE, which changes nothing unless the job is still running
        under ``owner``: a lease that another delivery took over, or a job
        that ended, stays as it is.

        Args:
            job_id: The job whose lease to extend.
            owner: The lease owner of the delivery running the job.
            lease_s: Seconds the lease lasts from now.

        Returns:
            True if ``owner`` still holds the lease (now extended), False if
            it lost it.

        Raises:
            StoreUnavailableError: The database could not be reached.
        """
        now = utcnow()
        with self._session() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.state == JobState.RUNNING,
                    Job.lease_owner == owner,
                )
                .values(lease_until=now + timedelta(seconds=lease_s))
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def release_job(self, job_id: str, *, owner: str, error: str) -> None:
        """Hand a job back to the queue after a failure that may pass."""
        with self._session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner)
                .values(
                    state=JobState.QUEUED,
                    lease_owner=None,
                    lease_until=None,
                    error_code="retrying",
                    error=error,
                    updated_at=utcnow(),
                )
            )

    def record_route(
        self,
        job_id: str,
        *,
        route: str,
        prompt_tokens: int,
        completion_budget_tokens: int,
        effective_context_tokens: int,
        context_source: str,
    ) -> None:
        """Keep why the job took its route, for operators and `chartsum route`."""
        with self._session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    route=route,
                    prompt_tokens=prompt_tokens,
                    completion_budget_tokens=completion_budget_tokens,
                    effective_context_tokens=effective_context_tokens,
                    context_source=context_source,
                )
            )

    def count_generation_attempt(self, job_id: str) -> None:
        """Add one to the job's generation attempts."""
        with self._session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(generation_attempts=Job.generation_attempts + 1)
            )

    def complete_job(self, summary: NewSummary, *, owner: str | None = None) -> bool:
        """Write the summary and mark its job succeeded, in one transaction.

        Args:
            summary: The summary, with its job id.
            owner: The lease owner of the delivery writing it. When given,
                nothing is written unless that delivery still holds the
                lease of a running job; None (operators, tests) writes to
                any job that has not ended.

        Returns:
            True if this call wrote the summary; False if the job had already
            ended (a redelivered job: nothing is written twice) or ``owner``
            lost the lease.
        """
        with self._session() as session:
            ended = _end_job(
                session,
                summary.job_id,
                owner=owner,
                state=JobState.SUCCEEDED,
                error_code=None,
                error=None,
            )
            return ended and _insert_summary(session, self.engine, summary)

    def fail_job(
        self,
        job_id: str,
        *,
        state: JobState,
        error_code: str,
        error: str,
        owner: str | None = None,
        unleased_only: bool = False,
    ) -> bool:
        """End a job that cannot succeed, with a reason an operator can act on.

        Args:
            job_id: The job to end.
            state: Its final state.
            error_code: A short, stable code for the reason.
            error: The reason, cut to 2,000 characters.
            owner: The lease owner of the delivery ending it. When given,
                the job is ended only while that delivery holds its lease;
                None ends any job that is not final yet.
            unleased_only: With no owner, end the job only while no delivery
                holds a live lease on it (queued, or its lease ran out).

        Returns:
            True if this call ended the job.
        """
        with self._session() as session:
            return _end_job(
                session,
                job_id,
                owner=owner,
                state=state,
                error_code=error_code,
                error=error[:2000],
                unleased_only=unleased_only,
            )

    def get_job(self, job_id: str) -> Job | None:
        """One job row, detached from its session."""
        with self._session() as session:
            return session.get(Job, job_id)

    def newest_job_of(self, key: str) -> Job | None:
        """The newest job of a stay id, or of a patient id (patient-level)."""
        with self._session() as session:
            return session.scalars(
                select(Job)
                .where(
                    (Job.stay_id == key)
                    | ((Job.patient_id == key) & Job.stay_id.is_(None))
                )
                .order_by(Job.created_at.desc(), Job.id.desc())
                .limit(1)
            ).first()

    def jobs_by_id(self, job_ids: Sequence[str]) -> list[Job]:
        """Several job rows, in no particular order."""
        with self._session() as session:
            return list(session.scalars(select(Job).where(Job.id.in_(job_ids))))

    def find_summary(self, key: str) -> tuple[Summary, Job] | None:
        """The summary of a job id, or the newest summary of a stay id."""
        with self._session() as session:
            query = select(Summary, Job).join(Job, Job.id == Summary.job_id)
            row = session.execute(query.where(Summary.job_id == key)).first()
            if row is None:
                row = session.execute(
                    query.where(Summary.stay_id == key).order_by(
                        Summary.created_at.desc(), Summary.id.desc()
                    )
                ).first()
            return None if row is None else (row[0], row[1])

    def session(self) -> Any:
        """A transaction for queries this class does not offer (operations).

        Connection failures surface as StoreUnavailableError.
        """
        return self._session()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._translate_errors(), self._sessions.begin() as session:
            yield session

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        # Connection-level failures may pass (database restarting, network
        # blip): the job is retried. Anything else is a bug and propagates.
        try:
            yield
        except DBAPIError as exc:
            if not (isinstance(exc, OperationalError) or exc.connection_invalidated):
                raise
            raise StoreUnavailableError(
                f"database unavailable ({type(exc.orig).__name__}); the job"
                " will be retried"
            ) from exc

    # Longitudinal summaries and review outcomes (issue 4).

    def patient_ids(self) -> list[str]:
        """Every stored patient id that has a stay, sorted."""
        with self._session() as session:
            query = select(Stay.patient_id).distinct().order_by(Stay.patient_id)
            return list(session.scalars(query))

    def create_patient_jobs(
        self,
        *,
        kind: str,
        patient_ids: Sequence[str],
        queue: str,
        origin: str | None = None,
    ) -> list[tuple[str, bool]]:
        """Create one patient-level job per patient, reusing an open one.

        Returns:
            (job id, created) per patient, in the order given.

        Raises:
            StayNotFoundError: A patient has no stored stay; no job is created.
        """
        results: list[tuple[str, bool]] = []
        with self._session() as session:
            known = set(
                session.scalars(
                    select(Stay.patient_id).where(Stay.patient_id.in_(patient_ids))
                )
            )
            missing = [p for p in patient_ids if p not in known]
            if missing:
                raise StayNotFoundError(
                    f"{len(missing)} patient id(s) have no stay in the database,"
                    f" e.g. {missing[0]}; ingest their stays first"
                )
            open_jobs = dict(
                session.execute(
                    select(Job.patient_id, Job.id).where(
                        Job.patient_id.in_(patient_ids),
                        Job.stay_id.is_(None),
                        Job.kind == kind,
                        Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
                    )
                ).all()
            )
            for patient_id in patient_ids:
                if patient_id in open_jobs:
                    results.append((open_jobs[patient_id], False))
                    continue
                job_id = str(uuid.uuid4())
                session.add(
                    Job(
                        id=job_id,
                        kind=kind,
                        stay_id=None,
                        patient_id=patient_id,
                        state=JobState.QUEUED,
                        queue=queue,
                        origin=origin,
                        attempts=0,
                        lost_deliveries=0,
                        generation_attempts=0,
                        updated_at=utcnow(),
                    )
                )
                open_jobs[patient_id] = job_id
                results.append((job_id, True))
        return results

    def load_patient_charts(self, patient_id: str) -> list[Chart]:
        """Every stay of a patient with its notes, in time order.

        Stays without an admission time come last, by id.

        Raises:
            StayNotFoundError: The patient has no stored stay.
        """
        with self._session() as session:
            stays = list(session.scalars(select(Stay).filter_by(patient_id=patient_id)))
            if not stays:
                raise StayNotFoundError(
                    f"patient {patient_id} has no stay in the database"
                )
            notes: dict[str, list[ChartNote]] = {stay.id: [] for stay in stays}
            for note in session.scalars(
                select(Note)
                .where(Note.stay_id.in_(list(notes)))
                .order_by(Note.stay_id, Note.position)
            ):
                notes[note.stay_id].append(
                    ChartNote(note.id, note.note_type, note.charted_at, note.text)
                )
            charts = [
                Chart(
                    stay_id=stay.id,
                    patient_id=stay.patient_id,
                    content_sha256=stay.content_sha256,
                    encounter_class=stay.encounter_class,
                    reason_for_visit=stay.reason_for_visit,
                    admit_time=stay.admit_time,
                    discharge_time=stay.discharge_time,
                    record=stay.record,
                    notes=tuple(notes[stay.id]),
                )
                for stay in stays
            ]
        return sorted(
            charts,
            key=lambda c: (c.admit_time is None, _utc(c.admit_time), c.stay_id),
        )

    def current_discharge_summaries(
        self, charts: Sequence[Chart]
    ) -> dict[str, dict[str, Any]]:
        """The newest succeeded discharge summary of each chart, if current.

        A summary made from an older version of the chart (its input hash
        differs) is not returned: it may describe notes that changed.

        Returns:
            Summary payload by stay id, for the stays that have one.
        """
        digest = {chart.stay_id: chart.content_sha256 for chart in charts}
        found: dict[str, dict[str, Any]] = {}
        with self._session() as session:
            rows = session.execute(
                select(Summary.stay_id, Summary.payload, Summary.input_sha256)
                .join(Job, Job.id == Summary.job_id)
                .where(
                    Summary.stay_id.in_(list(digest)),
                    Summary.kind == "discharge",
                    Job.state == JobState.SUCCEEDED,
                )
                .order_by(Summary.created_at.desc(), Summary.id.desc())
            )
            for stay_id, payload, input_sha256 in rows:
                if stay_id not in found and input_sha256 == digest[stay_id]:
                    found[stay_id] = payload
        return found

    def complete_job_for_review(
        self,
        summary: NewSummary,
        *,
        error_code: str,
        error: str,
        owner: str | None = None,
    ) -> bool:
        """Write a summary flagged for review; its job ends needs_review.

        Same transaction, idempotence and lease check as complete_job.
        ``error`` names what needs review (section names, statement
        positions), never text.

        Returns:
            True if this call wrote the summary.
        """
        with self._session() as session:
            ended = _end_job(
                session,
                summary.job_id,
                owner=owner,
                state=JobState.NEEDS_REVIEW,
                error_code=error_code,
                error=error[:2000],
            )
            return ended and _insert_summary(session, self.engine, summary)

    def find_patient_summary(self, patient_id: str) -> tuple[Summary, Job] | None:
        """The newest longitudinal summary of a patient."""
        with self._session() as session:
            row = session.execute(
                select(Summary, Job)
                .join(Job, Job.id == Summary.job_id)
                .where(
                    Summary.patient_id == patient_id,
                    Summary.kind == "longitudinal",
                )
                .order_by(Summary.created_at.desc(), Summary.id.desc())
            ).first()
            return None if row is None else (row[0], row[1])


def _utc(moment: datetime | None) -> datetime:
    # SQLite hands back naive datetimes; PostgreSQL aware ones.
    if moment is None:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _make_engine(url: str, *, pool_size: int) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the embedded run's reader threads work beside one
            # writer; foreign keys are off by default in SQLite.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(
        url, pool_size=pool_size, pool_pre_ping=True, pool_recycle=1800
    )


def _end_job(
    session: Session,
    job_id: str,
    *,
    owner: str | None,
    state: JobState,
    error_code: str | None,
    error: str | None,
    unleased_only: bool = False,
) -> bool:
    """Set a job's final state; True if this call did.

    With an owner, only a running job whose lease that owner still holds is
    ended, so a delivery that lost its lease cannot overwrite the outcome
    of the one that took over. ``unleased_only`` (without an owner) spares
    a job some delivery holds a live lease on.
    """
    now = utcnow()
    query = update(Job).where(Job.id == job_id)
    if owner is None:
        query = query.where(Job.state.not_in(list(FINAL_STATES)))
        if unleased_only:
            query = query.where(Job.lease_owner.is_(None) | (Job.lease_until < now))
    else:
        query = query.where(Job.state == JobState.RUNNING, Job.lease_owner == owner)
    result = session.execute(
        query.values(
            state=state,
            error_code=error_code,
            error=error,
            lease_owner=None,
            lease_until=None,
            finished_at=now,
            updated_at=now,
        ).execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _insert_summary(session: Session, engine: Engine, summary: NewSummary) -> bool:
    """Insert a summary unless its job has one; True if this call did."""
    insert = _insert_for(engine)
    result = session.execute(
        insert(Summary)
        .values(**summary.__dict__)
        .on_conflict_do_nothing(index_elements=["job_id"])
        .returning(Summary.id)
    )
    return result.first() is not None


def _insert_for(engine: Engine) -> Any:
    return pg_insert if engine.dialect.name == "postgresql" else sqlite_insert


def _upsert_patient(session: Session, record: StayRecord) -> None:
    if session.get(Patient, record.patient_id) is not None:
        return
    patient = record.patient
    session.add(
        Patient(
            id=record.patient_id,
            sex=patient.sex if patient else None,
            birth_date=patient.birth_date if patient else None,
        )
    )
    session.flush()


def _stay_row(record: StayRecord, digest: str) -> Stay:
    kept = record.model_dump(mode="json", exclude={"notes"})
    return Stay(
        id=record.stay_id,
        patient_id=record.patient_id,
        source=record.source,
        encounter_class=record.encounter_class,
        encounter_type=record.encounter_type,
        reason_for_visit=record.reason_for_visit,
        admit_time=record.admit_time,
        discharge_time=record.discharge_time,
        record=kept,
        content_sha256=digest,
        note_count=len(record.notes),
        char_count=sum(len(note.text) for note in record.notes),
        updated_at=utcnow(),
    )


def _note_rows(record: StayRecord) -> list[Note]:
    return [
        Note(
            stay_id=record.stay_id,
            id=note.note_id,
            position=position,
            note_type=note.note_type,
            author_role=note.author_role,
            charted_at=note.charted_at,
            text=note.text,
            sha256=hashlib.sha256(note.text.encode("utf-8")).hexdigest(),
        )
        for position, note in enumerate(record.notes)
    ]
