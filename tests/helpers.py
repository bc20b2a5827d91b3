"""Shared test doubles and builders."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import update

from pipelines.engine import Completion, CompletionRequest
from pipelines.routing import EffectiveContext
from pipelines.stays import Chart, ChartNote
from pipelines.store import ChartStore
from pipelines.summarize import Summarizer
from pipelines.tokens import TokenCounter
from schemas.settings import Settings
from schemas.tables import Job

SYNTHETIC_NOTE = (
    "# Chief Complaint\n- Cough\n\n# Assessment and Plan\n"
    "Patient is presenting with acute bronchitis. Started amoxicillin 500 mg."
)


def stay_dict(stay_id: str = "t-stay-1", **changes: Any) -> dict[str, Any]:
    """A minimal valid stay record in the input format."""
    record: dict[str, Any] = {
        "schema_version": "1.0",
        "stay_id": stay_id,
        "patient_id": "t-patient-1",
        "encounter_class": "inpatient",
        "reason_for_visit": "Acute bronchitis",
        "admit_time": "2020-01-01T10:00:00+00:00",
        "discharge_time": "2020-01-03T10:00:00+00:00",
        "notes": [
            {
                "note_id": f"{stay_id}-n1",
                "note_type": "History and physical note",
                "charted_at": "2020-01-01T10:00:00+00:00",
                "text": SYNTHETIC_NOTE,
            }
        ],
    }
    record.update(changes)
    return record


def notes_chart(
    notes: Sequence[ChartNote],
    *,
    stay_id: str = "s1",
    admit_time: datetime | None = None,
    discharge_time: datetime | None = None,
) -> Chart:
    """A loaded stay of patient p1 made of these notes, for pipeline tests."""
    return Chart(
        stay_id=stay_id,
        patient_id="p1",
        content_sha256="0" * 64,
        encounter_class="inpatient",
        reason_for_visit=None,
        admit_time=admit_time,
        discharge_time=discharge_time,
        record={},
        notes=tuple(notes),
    )


def stay_line(stay_id: str = "t-stay-1", **changes: Any) -> str:
    """A stay record as one JSON line."""
    return json.dumps(stay_dict(stay_id, **changes))


def summary_json(note_id: str, **sections: Any) -> str:
    """A valid discharge summary citing ``note_id``."""
    statement = {"text": "Admitted for acute bronchitis.", "note_ids": [note_id]}
    body: dict[str, Any] = {"hospital_course": [statement]}
    body.update(sections)
    return json.dumps(body)


class ScriptedEngine:
    """An engine double that answers from a script, for pure-logic tests.

    Args:
        answers: Called with each request; returns (text, finish_reason) or
            raises.
    """

    model_name = "scripted"

    def __init__(self, answers: Callable[[CompletionRequest], tuple[str, str]]) -> None:
        self.answers = answers
        self.requests: list[CompletionRequest] = []
        #: Size of each complete_many call, to check requests go together.
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def complete(self, request: CompletionRequest) -> Completion:
        """Record the request and answer it from the script."""
        with self._lock:
            self.requests.append(request)
        text, finish_reason = self.answers(request)
        return Completion(text, finish_reason, len(request.prompt_token_ids), 7, 1)

    def complete_many(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Answer each request in order."""
        with self._lock:
            self.batches.append(len(requests))
        return [self.complete(request) for request in requests]

    def close(self) -> None:
        """Nothing to release."""


def section_answer(
    text: str | Mapping[str, str] = "Admitted for acute bronchitis.",
) -> Callable[[CompletionRequest], tuple[str, str]]:
    """A script for chunked-route requests: one statement citing the first note.

    The section and the allowed note labels are read from the request's
    JSON schema, as the engine's constrained decoding would. ``text`` is
    the statement, or the statement of each section by name (a summary
    keeps a sentence repeated across sections once).
    """

    def answer(request: CompletionRequest) -> tuple[str, str]:
        assert request.json_schema is not None
        section = request.json_schema["required"][0]
        items = request.json_schema["properties"][section]["items"]
        alias = items["properties"]["note_ids"]["items"]["enum"][0]
        said = text if isinstance(text, str) else text[section]
        return json.dumps({section: [{"text": said, "note_ids": [alias]}]}), "stop"

    return answer


def space_out_jobs(store: ChartStore, job_ids: Sequence[str]) -> None:
    """Give the jobs creation times a minute apart, in this order.

    SQLite's clock has whole seconds, so jobs made in one test would
    otherwise tie on ``created_at``.
    """
    with store.engine.begin() as conn:
        for minutes, job_id in enumerate(job_ids):
            conn.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(created_at=datetime(2026, 1, 1, 0, minutes, tzinfo=UTC))
            )


def scripted_summarizer(
    store: ChartStore,
    engine: ScriptedEngine,
    model_dir: Path,
    *,
    settings: Settings | None = None,
    context_tokens: int = 8192,
) -> Summarizer:
    """A worker's Summarizer on a scripted engine and the embedded tokenizer."""
    return Summarizer(
        settings=settings or Settings(),
        store=store,
        engine=engine,
        tokens=TokenCounter.from_model_dir(model_dir),
        model_fingerprint="f" * 64,
        context=EffectiveContext(tokens=context_tokens, source="test"),
        embedder=lambda: None,
    )
