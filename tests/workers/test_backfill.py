"""Backfills and the stuck-job sweep against real PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

import pipelines.backfill as backfill_module
from pipelines.backfill import BackfillRequest, run_backfill
from pipelines.operations import find_stuck_jobs, touch_jobs
from pipelines.stays import parse_stay_lines
from pipelines.store import ChartStore, NewSummary, utcnow
from schemas.tables import Job
from tests.helpers import stay_dict

WINDOW = BackfillRequest(
    since=datetime(2020, 1, 1, tzinfo=UTC), until=datetime(2021, 1, 1, tzinfo=UTC)
)


def _ingest_days(store: ChartStore, count: int) -> list[str]:
    lines = []
    for day in range(count):
        when = datetime(2020, 3, 1, tzinfo=UTC) + timedelta(days=day)
        lines.append(
            json.dumps(
                stay_dict(
                    f"b-{day:03d}",
                    admit_time=(when - timedelta(days=2)).isoformat(),
                    discharge_time=when.isoformat(),
                )
            )
        )
    outside = stay_dict(
        "b-old",
        admit_time="2019-04-28T00:00:00+00:00",
        discharge_time="2019-05-01T00:00:00+00:00",
    )
    lines.append(json.dumps(outside))
    store.ingest(parse_stay_lines(lines).stays)
    return [f"b-{day:03d}" for day in range(count)]


def _finish(store: ChartStore, job_id: str, stay_id: str, fingerprint: str) -> None:
    store.complete_job(
        NewSummary(
            job_id=job_id,
            kind="discharge",
            stay_id=stay_id,
            patient_id="t-patient-1",
            schema_version="discharge-1",
            payload={},
            model_name="m",
            model_fingerprint=fingerprint,
            route="single_pass",
            prompt_tokens=1,
            completion_tokens=1,
            input_sha256="0" * 64,
            generation_ms=1,
            total_ms=1,
        )
    )


def test_a_backfill_run_twice_queues_nothing_new(pg_store: ChartStore) -> None:
    """The second run of the same backfill finds it finished and sends nothing."""
    stays = _ingest_days(pg_store, 5)
    sent: list[str] = []

    first = run_backfill(
        pg_store, WINDOW, send=lambda job_id, _q: sent.append(job_id), queue="q"
    )
    second = run_backfill(
        pg_store, WINDOW, send=lambda job_id, _q: sent.append(job_id), queue="q"
    )

    assert (first.queued, first.skipped, first.failed) == (len(stays), 0, 0)
    assert second.already_finished and len(sent) == len(stays)


def test_an_interrupted_backfill_resumes_without_duplicates(
    pg_store: ChartStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped mid-way, the rerun sends every stay's job and makes no second job."""
    monkeypatch.setattr(backfill_module, "PAGE_SIZE", 2)
    stays = _ingest_days(pg_store, 7)
    sent: list[str] = []

    def send_then_crash(job_id: str, _queue: str) -> None:
        if len(sent) == 5:
            raise KeyboardInterrupt
        sent.append(job_id)

    with pytest.raises(KeyboardInterrupt):
        run_backfill(pg_store, WINDOW, send=send_then_crash, queue="q")
    resumed = run_backfill(
        pg_store, WINDOW, send=lambda job_id, _q: sent.append(job_id), queue="q"
    )

    jobs = pg_store.jobs_by_id(list(set(sent)))
    assert sorted(job.stay_id or "" for job in jobs) == stays
    # The interrupted page is walked again: its jobs are sent once more (a
    # harmless duplicate message, the lease decides) and the job whose send
    # was interrupted is sent for the first time. Never more than a page.
    assert len(set(sent)) == len(stays)
    assert len(sent) - len(set(sent)) <= backfill_module.PAGE_SIZE
    assert resumed.skipped == 0


def test_missing_only_and_model_changed_select_the_right_stays(
    pg_store: ChartStore,
) -> None:
    """Summarized stays are skipped, unless an older model made the summary."""
    stays = _ingest_days(pg_store, 3)
    jobs = pg_store.create_jobs(kind="discharge", stay_ids=stays[:2], queue="q")
    _finish(pg_store, jobs[0][0], stays[0], "old-model")
    _finish(pg_store, jobs[1][0], stays[1], "new-model")
    sent: list[str] = []

    def send(job_id: str, _queue: str) -> None:
        sent.append(job_id)

    missing = run_backfill(
        pg_store,
        BackfillRequest(since=WINDOW.since, until=WINDOW.until, missing_only=True),
        send=send,
        queue="q",
    )
    changed = run_backfill(
        pg_store,
        BackfillRequest(
            since=WINDOW.since, until=WINDOW.until, model_changed_from="new-model"
        ),
        send=send,
        queue="q",
    )

    queued_stays = [job.stay_id for job in pg_store.jobs_by_id(sent)]
    assert (missing.queued, changed.queued) == (1, 1)
    assert sorted(queued_stays) == [stays[0], stays[2]]


def test_a_send_failure_is_counted_and_leaves_the_job_for_the_sweep(
    pg_store: ChartStore,
) -> None:
    """A broker outage during backfill fails the send, not the job row."""
    _ingest_days(pg_store, 2)

    def broker_down(_job_id: str, _queue: str) -> None:
        raise ConnectionError("redis down")

    counts = run_backfill(pg_store, WINDOW, send=broker_down, queue="q")

    assert (counts.queued, counts.failed) == (0, 2)
    with pg_store.engine.begin() as conn:
        conn.execute(update(Job).values(updated_at=utcnow() - timedelta(hours=2)))
    stuck = find_stuck_jobs(pg_store, queued_stale_s=3600)
    assert len(stuck) == 2 and {job.queue for job in stuck} == {"q"}


def test_the_sweep_finds_expired_leases_and_forgets_touched_jobs(
    pg_store: ChartStore,
) -> None:
    """A job whose worker died is found; a job just re-sent is left alone."""
    stays = _ingest_days(pg_store, 2)
    [(running, _), (queued, _)] = pg_store.create_jobs(
        kind="discharge", stay_ids=stays, queue="q"
    )
    assert pg_store.claim_job(running, lease_s=60) is not None
    with pg_store.engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == running)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
        conn.execute(
            update(Job)
            .where(Job.id == queued)
            .values(updated_at=utcnow() - timedelta(hours=2))
        )

    found = {job.job_id for job in find_stuck_jobs(pg_store, queued_stale_s=3600)}
    touch_jobs(pg_store, [queued])
    after = {job.job_id for job in find_stuck_jobs(pg_store, queued_stale_s=3600)}

    assert found == {running, queued}
    assert after == {running}


def test_a_job_that_keeps_losing_its_worker_is_set_aside(
    pg_store: ChartStore,
) -> None:
    """After max_lost_deliveries lost deliveries the job fails with its reason."""
    [stay] = _ingest_days(pg_store, 1)
    [(job_id, _)] = pg_store.create_jobs(kind="discharge", stay_ids=[stay], queue="q")

    claims = []
    for _ in range(4):
        claims.append(pg_store.claim_job(job_id, lease_s=60, max_lost_deliveries=3))
        with pg_store.engine.begin() as conn:
            conn.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(lease_until=utcnow() - timedelta(seconds=1))
            )

    job = pg_store.get_job(job_id)
    assert job is not None
    assert [claim is not None for claim in claims] == [True, True, True, False]
    assert (job.state, job.error_code) == ("failed", "too_many_lost_deliveries")


def test_a_longitudinal_backfill_queues_one_job_per_patient_once(
    pg_store: ChartStore,
) -> None:
    """Patients with a stay in the window get one patient job; reruns add none."""
    in_window = "2020-06-01T00:00:00+00:00"
    lines = [
        json.dumps(stay_dict(f"p1-{n}", patient_id="p1", discharge_time=in_window))
        for n in range(3)
    ]
    lines.append(
        json.dumps(stay_dict("p2-0", patient_id="p2", discharge_time=in_window))
    )
    lines.append(
        json.dumps(
            stay_dict(
                "p3-0",
                patient_id="p3",
                admit_time="2018-12-30T00:00:00+00:00",
                discharge_time="2019-01-01T00:00:00+00:00",
            )
        )
    )
    pg_store.ingest(parse_stay_lines(lines).stays)
    request = BackfillRequest(
        since=WINDOW.since, until=WINDOW.until, kind="longitudinal", missing_only=True
    )
    sent: list[str] = []

    counts = run_backfill(
        pg_store, request, send=lambda job_id, _q: sent.append(job_id), queue="q"
    )

    jobs = [pg_store.get_job(job_id) for job_id in sent]
    assert (counts.queued, counts.skipped, counts.failed) == (2, 0, 0)
    assert sorted(j.patient_id for j in jobs if j is not None) == ["p1", "p2"]
    assert all(j is not None and j.stay_id is None for j in jobs)
    assert backfill_module.count_backfill_stays(pg_store, request) == 2

    again = BackfillRequest(
        since=WINDOW.since,
        until=WINDOW.until,
        kind="longitudinal",
        missing_only=True,
        model_changed_from="x" * 64,
    )
    rerun = run_backfill(
        pg_store, again, send=lambda job_id, _q: sent.append(job_id), queue="q"
    )
    assert (rerun.queued, rerun.skipped) == (0, 2)
