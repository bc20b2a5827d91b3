"""SQLAlchemy tables: the storage format, kept apart from the wire format.

Every change here needs an Alembic revision in ``schemas/migrations``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# PostgreSQL gets JSONB (indexable, compact); SQLite plain JSON text.
Json = JSON().with_variant(JSONB(), "postgresql")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobState(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    NEEDS_REVIEW = "needs_review"
    FAILED = "failed"


#: States a job never leaves.
FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.NEEDS_REVIEW, JobState.FAILED})


class SummaryKind(StrEnum):
    """What a summary covers."""

    DISCHARGE = "discharge"
    LONGITUDINAL = "longitudinal"


class Base(DeclarativeBase):
    """Declarative base with stable constraint names (Alembic needs them)."""

    metadata = MetaData(naming_convention=NAMING)


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


class Patient(Base):
    """A patient, known only by an opaque id."""

    __tablename__ = "patients"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    sex: Mapped[str | None] = mapped_column(String(32))
    birth_date: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = _now()


class Stay(Base):
    """One inpatient stay and its structured items."""

    __tablename__ = "stays"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.id"), index=True)
    source: Mapped[str | None] = mapped_column(String(200))
    encounter_class: Mapped[str | None] = mapped_column(String(200))
    encounter_type: Mapped[str | None] = mapped_column(String(500))
    reason_for_visit: Mapped[str | None] = mapped_column(String(500))
    admit_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    discharge_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Structured items (diagnoses, medications, ...) and unknown fields, as given.
    record: Mapped[dict[str, Any]] = mapped_column(Json)
    #: sha256 of the canonical record; a change means the chart changed.
    content_sha256: Mapped[str] = mapped_column(String(64))
    note_count: Mapped[int] = mapped_column(Integer)
    char_count: Mapped[int] = mapped_column(Integer)
    ingested_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class Note(Base):
    """One clinical document of a stay."""

    __tablename__ = "notes"

    stay_id: Mapped[str] = mapped_column(
        ForeignKey("stays.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    note_type: Mapped[str | None] = mapped_column(String(200))
    author_role: Mapped[str | None] = mapped_column(String(200))
    charted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    text: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))


class Job(Base):
    """A durable request to produce one summary."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_kind", "state", "kind"),
        Index("ix_jobs_stay_kind", "stay_id", "kind"),
        Index("ix_jobs_state_updated", "state", "updated_at"),
        # `chartsum jobs`: newest first.
        Index("ix_jobs_created", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    stay_id: Mapped[str | None] = mapped_column(ForeignKey("stays.id"))
    patient_id: Mapped[str | None] = mapped_column(ForeignKey("patients.id"))
    state: Mapped[str] = mapped_column(String(32), default=JobState.QUEUED)
    queue: Mapped[str] = mapped_column(String(64))
    #: Deliveries that claimed the job (a redelivery after a crash counts).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Deliveries that took over a job whose previous delivery never finished
    #: (its worker died); too many and the job is set aside as failed.
    lost_deliveries: Mapped[int] = mapped_column(Integer, default=0)
    #: Where the job came from: "realtime", "backfill" or a backfill id.
    origin: Mapped[str | None] = mapped_column(String(64))
    generation_attempts: Mapped[int] = mapped_column(Integer, default=0)
    route: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_budget_tokens: Mapped[int | None] = mapped_column(Integer)
    effective_context_tokens: Mapped[int | None] = mapped_column(Integer)
    #: Where the effective context came from: a calibration id or "default".
    context_source: Mapped[str | None] = mapped_column(String(200))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Last change of state or lease; the sweep finds stuck jobs by it.
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Backfill(Base):
    """A backfill run, so that running it again resumes instead of repeating."""

    __tablename__ = "backfills"

    #: Derived from the backfill's arguments: the same arguments, the same row.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    arguments: Mapped[dict[str, Any]] = mapped_column(Json)
    #: Last stay id handled, in id order; resuming starts after it.
    cursor: Mapped[str | None] = mapped_column(String(128))
    queued: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()


class Summary(Base):
    """A validated summary; at most one per job, so redelivery cannot duplicate it."""

    __tablename__ = "summaries"
    __table_args__ = (
        UniqueConstraint("job_id"),
        Index("ix_summaries_stay_kind", "stay_id", "kind"),
        ForeignKeyConstraint(["job_id"], ["jobs.id"]),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(32))
    stay_id: Mapped[str | None] = mapped_column(String(128))
    patient_id: Mapped[str | None] = mapped_column(String(128))
    schema_version: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(Json)
    model_name: Mapped[str] = mapped_column(String(500))
    model_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    route: Mapped[str] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    #: sha256 of the chart the summary was made from.
    input_sha256: Mapped[str] = mapped_column(String(64))
    generation_ms: Mapped[int] = mapped_column(Integer)
    total_ms: Mapped[int] = mapped_column(Integer)
    #: Share of statements whose facts appear in their cited notes (0-1);
    #: None for summaries stored before the check existed.
    support_rate: Mapped[float | None] = mapped_column(Float)
    #: Per-statement support: section, index, supported, missing facts.
    support: Mapped[dict[str, Any] | None] = mapped_column(Json)
    created_at: Mapped[datetime] = _now()


class Calibration(Base):
    """A measured effective context of one served model, with its full grid.

    Looked up by ``fingerprint`` (see ``pipelines.calibration``); the newest
    full run wins over quick ones.
    """

    __tablename__ = "calibrations"
    __table_args__ = (Index("ix_calibrations_fingerprint_mode", "fingerprint", "mode"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(500))
    #: "full", "quick" or "custom" (a ladder or trial count given by hand).
    mode: Mapped[str] = mapped_column(String(16))
    #: None when even the shortest tested length failed.
    effective_tokens: Mapped[int | None] = mapped_column(Integer)
    #: The whole CalibrationResult (schemas.calibration) as JSON, without id.
    result: Mapped[dict[str, Any]] = mapped_column(Json)
    duration_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now()
