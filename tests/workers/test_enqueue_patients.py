"""Longitudinal jobs: one per patient, reused while open, task carries the id."""

from __future__ import annotations

from typing import Any

import pytest

from pipelines.errors import StayNotFoundError
from pipelines.stays import parse_stay_lines
from pipelines.store import ChartStore
from tests.helpers import stay_line
from workers.constants import TASK_SUMMARIZE
from workers.enqueue import enqueue_patients


class RecordingApp:
    """A Celery app double that keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], str]] = []

    def send_task(self, name: str, *, args: list[Any], queue: str) -> None:
        """Record one send."""
        self.sent.append((name, args, queue))


def test_a_patient_job_is_created_once_and_sent_with_its_id_only(
    store: ChartStore,
) -> None:
    """Two enqueues while the job is open send the same job id twice."""
    store.ingest(parse_stay_lines([stay_line("a"), stay_line("b")]).stays)
    app = RecordingApp()

    first = enqueue_patients(store, app, patient_ids=["t-patient-1"])  # type: ignore[arg-type]
    second = enqueue_patients(store, app, patient_ids=["t-patient-1"])  # type: ignore[arg-type]

    assert first[0].created and not second[0].created
    assert first[0].job_id == second[0].job_id
    assert [s[0] for s in app.sent] == [TASK_SUMMARIZE, TASK_SUMMARIZE]
    assert app.sent[0][1] == [first[0].job_id]
    job = store.get_job(first[0].job_id)
    assert job is not None
    assert (job.kind, job.stay_id, job.patient_id) == (
        "longitudinal",
        None,
        "t-patient-1",
    )


def test_a_patient_without_stays_is_refused(store: ChartStore) -> None:
    """Nothing is created or sent for an unknown patient."""
    app = RecordingApp()

    with pytest.raises(StayNotFoundError, match="ingest their stays first"):
        enqueue_patients(store, app, patient_ids=["nobody"])  # type: ignore[arg-type]

    assert app.sent == []
