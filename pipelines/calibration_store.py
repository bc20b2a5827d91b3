"""Calibrations in the database, beside the stays ChartStore keeps.

Shares ChartStore's connection pool; kept apart so calibration storage can
change without touching the job path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import case, func, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pipelines.errors import StoreUnavailableError
from pipelines.store import ChartStore
from schemas.calibration import CalibrationResult
from schemas.tables import Calibration, Note


class CalibrationStore:
    """Stored calibration results, looked up by model fingerprint.

    Args:
        store: The chart store whose database holds the calibrations.
    """

    def __init__(self, store: ChartStore) -> None:
        self._sessions = sessionmaker(store.engine, expire_on_commit=False)

    def save(self, result: CalibrationResult) -> CalibrationResult:
        """Store a calibration; returns it with its new id."""
        row = Calibration(
            fingerprint=result.fingerprint,
            model_name=result.model_name[:500],
            mode=result.mode,
            effective_tokens=result.effective_tokens,
            result=result.model_dump(mode="json", exclude={"id"}),
            duration_ms=int(result.duration_s * 1000),
        )
        with self._session() as session:
            session.add(row)
            session.flush()
            calibration_id = row.id
        return result.model_copy(update={"id": calibration_id})

    def find(self, fingerprint: str) -> CalibrationResult | None:
        """The calibration to route by: the newest full run, else the newest.

        A quick run counts only until a full one exists for the same
        fingerprint, because it tests fewer lengths with one trial.
        """
        full_first = case((Calibration.mode == "full", 0), else_=1)
        query = (
            select(Calibration)
            .where(Calibration.fingerprint == fingerprint)
            .order_by(full_first, Calibration.id.desc())
            .limit(1)
        )
        with self._session() as session:
            row = session.scalars(query).first()
            return _result(row) if row is not None else None

    def get(self, calibration_id: int) -> CalibrationResult | None:
        """One calibration by id."""
        with self._session() as session:
            row = session.get(Calibration, calibration_id)
            return _result(row) if row is not None else None

    def list_all(self) -> list[CalibrationResult]:
        """Every stored calibration, newest first."""
        with self._session() as session:
            rows = session.scalars(select(Calibration).order_by(Calibration.id.desc()))
            return [_result(row) for row in rows]

    def note_texts(self, *, max_chars: int) -> list[str]:
        """Ingested note texts, in a stable order, up to about ``max_chars``.

        They are haystack material for calibration probes only; the text
        never leaves the process.
        """
        query = select(Note.text).order_by(Note.sha256, Note.stay_id, Note.id)
        texts: list[str] = []
        total = 0
        with self._session() as session:
            for text in session.scalars(query.execution_options(yield_per=200)):
                texts.append(text)
                total += len(text)
                if total >= max_chars:
                    break
        return texts

    def count_notes(self) -> int:
        """How many notes are ingested."""
        with self._session() as session:
            return int(session.scalar(select(func.count()).select_from(Note)) or 0)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except (OperationalError, DBAPIError) as exc:
            raise StoreUnavailableError(
                f"calibration store unavailable ({type(exc).__name__}); try again"
            ) from exc


def _result(row: Calibration) -> CalibrationResult:
    return CalibrationResult.model_validate({**row.result, "id": row.id})
