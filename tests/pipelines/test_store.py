"""The store on PostgreSQL and SQLite: idempotent ingest, leases, one summary."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from pipelines.errors import StayNotFoundError
from pipelines.stays import parse_stay_lines
from pipelines.store import ChartStore, NewSummary, utcnow
from schemas.tables import Job, JobState, Summary
from tests.helpers import space_out_jobs, stay_dict, stay_line


def _ingest(store: ChartStore, *lines: str) -> None:
    store.ingest(parse_stay_lines(lines).stays)


def _summary(job_id: str, stay_id: str = "a") -> NewSummary:
    return NewSummary(
        job_id=job_id,
        kind="discharge",
        stay_id=stay_id,
        patient_id="t-patient-1",
        schema_version="discharge-1",
        payload={"hospital_course": []},
        model_name="m",
        model_fingerprint="f" * 64,
        route="single_pass",
        prompt_tokens=10,
        completion_tokens=5,
        input_sha256="0" * 64,
        generation_ms=1,
        total_ms=2,
    )


def test_ingesting_the_same_stays_twice_changes_nothing(store: ChartStore) -> None:
    """Re-ingesting is a no-op; a changed stay is updated in place."""
    parsed = parse_stay_lines([stay_line("a"), stay_line("b")])

    first = store.ingest(parsed.stays)
    second = store.ingest(parsed.stays)
    changed = parse_stay_lines([json.dumps(stay_dict("a", reason_for_visit="X"))])
    third = store.ingest(changed.stays)

    assert (first.added, second.unchanged) == (2, 2)
    assert (third.updated, third.added) == (1, 0)
    assert store.load_chart("a").reason_for_visit == "X"
    assert store.stay_ids() == ["a", "b"]


def test_a_stay_never_moves_to_another_patient(store: ChartStore) -> None:
    """A re-ingested stay with another patient id is refused, the stored one kept."""
    _ingest(store, stay_line("a"))
    moved = stay_dict("a", patient_id="someone-else", reason_for_visit="X")

    counts = store.ingest(parse_stay_lines([json.dumps(moved)]).stays)

    assert (counts.updated, counts.added) == (0, 0)
    assert [stay_id for stay_id, _ in counts.rejected] == ["a"]
    assert "another patient_id" in counts.rejected[0][1]
    chart = store.load_chart("a")
    assert (chart.patient_id, chart.reason_for_visit) == (
        "t-patient-1",
        "Acute bronchitis",
    )


def test_a_summary_knows_when_its_stay_changed_after_it(store: ChartStore) -> None:
    """Re-ingesting other content marks the stay's earlier summary stale."""
    _ingest(store, stay_line("a"))
    [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
    digest = store.load_chart("a").content_sha256
    made = dataclasses.replace(_summary(job_id), input_sha256=digest)
    store.complete_job(made)
    found = store.find_summary("a")
    assert found is not None
    assert not store.stay_changed_since(found[0])

    _ingest(store, json.dumps(stay_dict("a", reason_for_visit="X")))

    assert store.stay_changed_since(found[0])


def test_a_chart_keeps_note_order_ids_and_text(store: ChartStore) -> None:
    """Notes come back in input order with their exact text."""
    record = stay_dict("a")
    record["notes"].append(
        {"note_id": "a-n2", "text": "Second note <|im_end|> kept as written."}
    )
    store.ingest(parse_stay_lines([json.dumps(record)]).stays)

    chart = store.load_chart("a")

    assert chart.note_ids == ["a-n1", "a-n2"]
    assert chart.notes[1].text == "Second note <|im_end|> kept as written."


def test_a_missing_stay_raises_a_clear_error(store: ChartStore) -> None:
    """Loading or enqueueing an unknown stay names it."""
    with pytest.raises(StayNotFoundError, match="nope"):
        store.load_chart("nope")
    with pytest.raises(StayNotFoundError, match="ingest them first"):
        store.create_jobs(kind="discharge", stay_ids=["nope"], queue="q")


def test_an_open_job_is_reused_rather_than_duplicated(store: ChartStore) -> None:
    """Enqueueing a stay twice while its job is open gives the same job."""
    _ingest(store, stay_line("a"))

    [(first, created)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
    [(again, created_again)] = store.create_jobs(
        kind="discharge", stay_ids=["a"], queue="q"
    )

    assert (created, created_again, again) == (True, False, first)


def test_only_one_of_many_racing_deliveries_claims_a_job(store: ChartStore) -> None:
    """Eight threads claiming the same job at once: exactly one wins."""
    _ingest(store, stay_line("a"))
    [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")

    with ThreadPoolExecutor(max_workers=8) as pool:
        claims = list(pool.map(lambda _: store.claim_job(job_id, lease_s=60), range(8)))

    winners = [claim for claim in claims if claim is not None]
    assert len(winners) == 1
    assert winners[0].attempt == 1


def test_an_expired_lease_lets_a_redelivery_take_over(store: ChartStore) -> None:
    """A job whose worker died is claimable again once its lease ran out."""
    _ingest(store, stay_line("a"))
    [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
    assert store.claim_job(job_id, lease_s=60) is not None
    assert store.claim_job(job_id, lease_s=60) is None

    with store.engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
    again = store.claim_job(job_id, lease_s=60)

    assert again is not None and again.attempt == 2


def test_a_job_delivered_twice_stores_one_summary(store: ChartStore) -> None:
    """Completing the same job again writes nothing new."""
    _ingest(store, stay_line("a"))
    [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")

    first = store.complete_job(_summary(job_id))
    second = store.complete_job(_summary(job_id))

    with store.engine.connect() as conn:
        count = conn.execute(
            select(func.count()).select_from(Summary).where(Summary.job_id == job_id)
        ).scalar_one()
    assert (first, second, count) == (True, False, 1)
    assert store.claim_job(job_id, lease_s=60) is None
    found = store.find_summary("a")
    assert found is not None and found[1].state == JobState.SUCCEEDED


def test_a_failed_job_keeps_its_reason_and_is_never_reclaimed(
    store: ChartStore,
) -> None:
    """fail_job ends the job; a later delivery does not run it."""
    _ingest(store, stay_line("a"))
    [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
    claim = store.claim_job(job_id, lease_s=60)
    assert claim is not None

    store.fail_job(job_id, state=JobState.FAILED, error_code="X", error="why")

    job = store.get_job(job_id)
    assert job is not None
    assert (job.state, job.error_code, job.error) == ("failed", "X", "why")
    assert store.claim_job(job_id, lease_s=60) is None


def test_a_released_job_can_be_claimed_again(store: ChartStore) -> None:
    """After a retryable failure the job is queued and claimable."""
    _ingest(store, stay_line("a"))
    [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
    claim = store.claim_job(job_id, lease_s=60)
    assert claim is not None

    store.release_job(job_id, owner=claim.lease_owner, error="engine down")

    again = store.claim_job(job_id, lease_s=60)
    assert again is not None and again.attempt == 2


def test_the_migrations_build_the_schema_the_models_describe(store: ChartStore) -> None:
    """Alembic finds nothing to add or drop after `migrate`: no drift."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from schemas.tables import Base

    with store.engine.connect() as conn:
        drift = compare_metadata(MigrationContext.configure(conn), Base.metadata)

    assert drift == []


def test_listing_the_latest_jobs_keeps_the_newest_per_stay(store: ChartStore) -> None:
    """On both databases: a re-summarized stay lists only its newer job."""
    from pipelines.operations import list_jobs

    store.ingest(parse_stay_lines([stay_line("a"), stay_line("b")]).stays)
    [(old, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
    store.fail_job(old, state=JobState.FAILED, error_code="x", error="x")
    [(new, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
    [(other, _)] = store.create_jobs(kind="discharge", stay_ids=["b"], queue="q")
    space_out_jobs(store, [old, new, other])

    every = [row.job_id for row in list_jobs(store)]
    latest = [row.job_id for row in list_jobs(store, latest=True)]
    failed_latest = list_jobs(store, latest=True, states=["failed"])

    assert every == [other, new, old]
    assert latest == [other, new]
    assert failed_latest == []
