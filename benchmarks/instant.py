"""The pipeline with the engine replaced by an instant responder.

Used only by the benchmark, to see what chartsum itself costs per job
(claim, chart load, tokenize, route, validate, write, Celery and Redis)
and how fast a large backfill is enqueued.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pipelines.engine import Completion, CompletionRequest
from pipelines.store import ChartStore
from schemas.tables import Note, Stay

#: Completion tokens the instant responder claims per answer.
INSTANT_COMPLETION_TOKENS = 40


class InstantEngine:
    """An engine that answers at once with a valid one-statement summary.

    It cites the first note label the request's schema allows, so the
    summary passes validation like a real one.
    """

    model_name = "instant-responder"

    def complete(self, request: CompletionRequest) -> Completion:
        """A valid summary, no model involved."""
        label = _first_label(request)
        text = json.dumps(
            {
                "hospital_course": [
                    {"text": "Admitted and treated.", "note_ids": [label]}
                ]
            }
        )
        return Completion(
            text=text,
            finish_reason="stop",
            prompt_tokens=len(request.prompt_token_ids),
            completion_tokens=INSTANT_COMPLETION_TOKENS,
            duration_ms=0,
        )

    def complete_many(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Answer each request at once."""
        return [self.complete(request) for request in requests]

    def close(self) -> None:
        """Nothing to release."""


def _first_label(request: CompletionRequest) -> str:
    schema = request.json_schema or {}
    try:
        items = schema["$defs"]["Statement"]["properties"]["note_ids"]["items"]
        return str(items["enum"][0])
    except (KeyError, IndexError):
        return "N1"


def copy_stay(
    store: ChartStore, *, template_id: str, count: int, prefix: str
) -> list[str]:
    """Store ``count`` copies of a stay (with its notes) under new ids.

    Done in one SQL statement per table (PostgreSQL only): ingesting 100k
    stays through ``ChartStore.ingest`` would take longer than the enqueue
    it prepares for.

    Returns:
        The new stay ids, ``{prefix}{n:06d}``.
    """
    new_id = f"'{prefix}' || lpad(g::text, 6, '0')"
    with store.engine.begin() as conn:
        for source, key in (("stays", "id"), ("notes", "stay_id")):
            model = Stay if source == "stays" else Note
            columns = [c.name for c in model.__table__.columns]
            chosen = ", ".join(new_id if name == key else name for name in columns)
            conn.exec_driver_sql(
                f"INSERT INTO {source} ({', '.join(columns)})"
                f" SELECT {chosen} FROM {source}, generate_series(1, %(count)s) g"
                f" WHERE {source}.{key} = %(template)s",
                {"count": count, "template": template_id},
            )
    return [f"{prefix}{n:06d}" for n in range(1, count + 1)]
