"""Lease renewal: a running job keeps its lease; a lost lease writes nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from sqlalchemy import func, select, update

from pipelines.engine import CompletionRequest
from pipelines.errors import EngineUnavailableError, StoreUnavailableError
from pipelines.stays import parse_stay_lines
from pipelines.store import ChartStore, ClaimedJob, utcnow
from pipelines.summarize import JobOutcome, LeaseRenewer, Summarizer
from schemas.settings import PipelineSettings, Settings
from schemas.tables import Job, JobState, Summary
from tests.helpers import ScriptedEngine, scripted_summarizer, stay_line, summary_json
from tests.pipelines.test_store import _summary

#: Short enough that a job outlives it within a test; long enough that a
#: renewal every third of it never misses, even on a busy machine.
SHORT_LEASE_S = 2


def _job(store: ChartStore) -> str:
    store.ingest(parse_stay_lines([stay_line("a")]).stays)
    [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
    return job_id


def _claim(store: ChartStore, job_id: str, *, lease_s: int = 60) -> ClaimedJob:
    claim = store.claim_job(job_id, lease_s=lease_s)
    assert claim is not None
    return claim


def _expire_lease(store: ChartStore, job_id: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )


def _lease_until(store: ChartStore, job_id: str) -> datetime | None:
    job = store.get_job(job_id)
    assert job is not None
    moment = job.lease_until
    # SQLite hands back naive datetimes; PostgreSQL aware ones.
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def _count_summaries(store: ChartStore, job_id: str) -> int:
    with store.engine.connect() as conn:
        count: int = conn.execute(
            select(func.count()).select_from(Summary).where(Summary.job_id == job_id)
        ).scalar_one()
    return count


def _wait_for(condition: Callable[[], bool], *, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _renewer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "chartsum-lease-renewer"]


def _summarizer(
    store: ChartStore, engine: ScriptedEngine, model_dir: Path, *, lease_s: int
) -> Summarizer:
    settings = Settings(pipeline=PipelineSettings(job_lease_s=lease_s))
    return scripted_summarizer(store, engine, model_dir, settings=settings)


# The store's side.


def test_renewing_a_held_lease_moves_its_end_forward(store: ChartStore) -> None:
    """The owner's renewal sets the lease to end lease_s from now."""
    job_id = _job(store)
    claim = _claim(store, job_id, lease_s=1)
    before = _lease_until(store, job_id)

    renewed = store.renew_lease(job_id, owner=claim.lease_owner, lease_s=600)

    after = _lease_until(store, job_id)
    assert renewed is True
    assert before is not None and after is not None
    assert after - before > timedelta(seconds=500)
    assert after > utcnow() + timedelta(seconds=590)


def test_a_renewal_by_another_owner_changes_nothing(store: ChartStore) -> None:
    """Only the delivery holding the lease may extend it."""
    job_id = _job(store)
    _claim(store, job_id, lease_s=60)
    before = _lease_until(store, job_id)

    renewed = store.renew_lease(job_id, owner="someone-else", lease_s=600)

    assert renewed is False
    assert _lease_until(store, job_id) == before


def test_a_renewal_after_the_job_ended_returns_false(store: ChartStore) -> None:
    """A succeeded job gets no lease back from a late renewal."""
    job_id = _job(store)
    claim = _claim(store, job_id)
    assert store.complete_job(_summary(job_id), owner=claim.lease_owner)

    renewed = store.renew_lease(job_id, owner=claim.lease_owner, lease_s=600)

    job = store.get_job(job_id)
    assert renewed is False
    assert job is not None
    assert (job.state, job.lease_owner, job.lease_until) == ("succeeded", None, None)


def test_a_renewal_after_a_takeover_returns_false(store: ChartStore) -> None:
    """The first delivery cannot extend the lease the second one took."""
    job_id = _job(store)
    first = _claim(store, job_id)
    _expire_lease(store, job_id)
    second = _claim(store, job_id)
    before = _lease_until(store, job_id)

    renewed = store.renew_lease(job_id, owner=first.lease_owner, lease_s=600)

    job = store.get_job(job_id)
    assert renewed is False
    assert job is not None and job.lease_owner == second.lease_owner
    assert _lease_until(store, job_id) == before


def test_a_delivery_that_lost_its_lease_cannot_end_the_job(
    store: ChartStore,
) -> None:
    """Completing, flagging or failing under a lost lease writes nothing."""
    job_id = _job(store)
    first = _claim(store, job_id)
    _expire_lease(store, job_id)
    second = _claim(store, job_id)

    completed = store.complete_job(_summary(job_id), owner=first.lease_owner)
    flagged = store.complete_job_for_review(
        _summary(job_id), error_code="low_support", error="x", owner=first.lease_owner
    )
    failed = store.fail_job(
        job_id,
        state=JobState.FAILED,
        error_code="X",
        error="why",
        owner=first.lease_owner,
    )

    job = store.get_job(job_id)
    assert (completed, flagged, failed) == (False, False, False)
    assert job is not None
    assert (job.state, job.lease_owner) == ("running", second.lease_owner)
    assert _count_summaries(store, job_id) == 0
    assert store.complete_job(_summary(job_id), owner=second.lease_owner) is True
    assert _count_summaries(store, job_id) == 1


def test_a_renewal_during_an_outage_is_a_store_unavailable_error(
    tmp_path: Path,
) -> None:
    """A database that cannot be opened surfaces as StoreUnavailableError."""
    store = ChartStore(f"sqlite:///{tmp_path / 'missing' / 'chartsum.db'}")

    try:
        with pytest.raises(StoreUnavailableError):
            store.renew_lease("x", owner="o", lease_s=60)
    finally:
        store.close()


# The renewer's side.


class _FlakyStore:
    """A store double whose renewals follow a script, then succeed."""

    def __init__(self, script: list[Exception | bool]) -> None:
        self.script = script
        self.calls = 0

    def renew_lease(self, job_id: str, *, owner: str, lease_s: int) -> bool:
        self.calls += 1
        step = self.script.pop(0) if self.script else True
        if isinstance(step, Exception):
            raise step
        return step


def _held_claim(job_id: str = "j-1", owner: str = "o-1") -> ClaimedJob:
    return ClaimedJob(job_id, "discharge", "a", "t-patient-1", 1, owner)


@pytest.fixture
def renewers() -> Iterator[list[LeaseRenewer]]:
    """Renewers made by a test; every held job is dropped at its end."""
    made: list[LeaseRenewer] = []
    yield made
    for renewer in made:
        # Reaching into the renewer: only its own owners can drop a job.
        for job_id, owner in dict(renewer._held).items():
            renewer.drop(_held_claim(job_id, owner))


def test_an_outage_or_a_bug_during_renewal_is_logged_and_retried(
    renewers: list[LeaseRenewer],
) -> None:
    """The renewer logs each failed renewal and keeps renewing at the next tick."""
    flaky = _FlakyStore(
        [StoreUnavailableError("database unavailable"), RuntimeError("bug")]
    )
    renewer = LeaseRenewer(flaky, lease_s=60, interval_s=0.02)  # type: ignore[arg-type]
    renewers.append(renewer)

    with structlog.testing.capture_logs() as logs:
        renewer.hold(_held_claim())
        _wait_for(lambda: flaky.calls >= 4)
        renewer.drop(_held_claim())

    events = [(e["event"], e["log_level"], e.get("job_id")) for e in logs]
    assert events[:2] == [
        ("job_lease_renewal_failed", "warning", "j-1"),
        ("job_lease_renewal_crashed", "error", "j-1"),
    ]
    assert "bug" not in str(logs)
    assert renewer.held_job_ids() == []


def test_dropping_an_earlier_delivery_keeps_renewing_the_later_one(
    renewers: list[LeaseRenewer],
) -> None:
    """Two deliveries of one job in one process: the stale drop is ignored."""
    flaky = _FlakyStore([])
    renewer = LeaseRenewer(flaky, lease_s=60, interval_s=0.02)  # type: ignore[arg-type]
    renewers.append(renewer)
    earlier, later = _held_claim(owner="o-1"), _held_claim(owner="o-2")

    renewer.hold(earlier)
    renewer.hold(later)
    renewer.drop(earlier)
    calls = flaky.calls
    _wait_for(lambda: flaky.calls >= calls + 2)

    assert renewer.held_job_ids() == ["j-1"]
    renewer.drop(later)
    assert renewer.held_job_ids() == []


def test_a_lost_lease_is_logged_once_and_no_longer_renewed(
    renewers: list[LeaseRenewer],
) -> None:
    """After a renewal finds the lease gone, the job is not renewed again."""
    flaky = _FlakyStore([False])
    renewer = LeaseRenewer(flaky, lease_s=60, interval_s=0.02)  # type: ignore[arg-type]
    renewers.append(renewer)

    with structlog.testing.capture_logs() as logs:
        renewer.hold(_held_claim())
        _wait_for(lambda: renewer.held_job_ids() == [])
        time.sleep(0.1)

    assert flaky.calls == 1
    assert [(e["event"], e["job_id"]) for e in logs] == [("job_lease_lost", "j-1")]


def test_one_thread_renews_every_held_job_and_ends_when_none_is_left(
    renewers: list[LeaseRenewer],
) -> None:
    """Several held jobs share one thread, which is gone once they are dropped."""
    flaky = _FlakyStore([])
    renewer = LeaseRenewer(flaky, lease_s=60, interval_s=0.02)  # type: ignore[arg-type]
    renewers.append(renewer)
    before = len(_renewer_threads())

    claims = [_held_claim(f"j-{n}", f"o-{n}") for n in range(5)]
    for claim in claims:
        renewer.hold(claim)
    _wait_for(lambda: flaky.calls >= 10)
    during = len(_renewer_threads())
    for claim in claims:
        renewer.drop(claim)

    assert during == before + 1
    _wait_for(lambda: len(_renewer_threads()) == before, timeout_s=2.0)


# The summarizer's side.


def test_a_job_longer_than_its_lease_is_not_taken_over(
    store: ChartStore, model_dir: Path
) -> None:
    """A redelivery after the lease would have run out finds it renewed."""
    # Given a job whose engine call outlasts its lease
    job_id = _job(store)
    engine_s = SHORT_LEASE_S + 1.5

    def slow_answer(_request: CompletionRequest) -> tuple[str, str]:
        time.sleep(engine_s)
        return summary_json("N1"), "stop"

    engine = ScriptedEngine(slow_answer)
    worker = _summarizer(store, engine, model_dir, lease_s=SHORT_LEASE_S)
    outcomes: list[JobOutcome] = []
    running = threading.Thread(
        target=lambda: outcomes.append(worker.process_job(job_id))
    )
    running.start()
    _wait_for(lambda: len(engine.requests) == 1)

    # When a second worker gets the same job after the claimed lease ran out
    time.sleep(SHORT_LEASE_S + 0.5)
    assert running.is_alive(), "the engine call must outlast the lease"
    redelivered = _summarizer(
        store, engine, model_dir, lease_s=SHORT_LEASE_S
    ).process_job(job_id)
    running.join(timeout=30)

    # Then the first delivery keeps the job and stores the only summary
    job = store.get_job(job_id)
    assert (redelivered.ran, redelivered.state) == (False, "running")
    assert [o.state for o in outcomes] == [JobState.SUCCEEDED]
    assert job is not None
    assert (job.state, job.attempts, job.lost_deliveries) == ("succeeded", 1, 0)
    assert len(engine.requests) == 1
    assert _count_summaries(store, job_id) == 1
    assert worker.leases.held_job_ids() == []


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (summary_json("N1"), "summary"),
        ('{"hospital_course": [', "failure"),
    ],
    ids=["summary", "failure"],
)
def test_a_delivery_that_lost_its_lease_leaves_the_job_to_the_new_owner(
    sqlite_store: ChartStore, model_dir: Path, answer: str, result: str
) -> None:
    """Its summary or failure is discarded with a warning; nothing is written."""
    job_id = _job(sqlite_store)
    taken_over: list[ClaimedJob] = []

    def answer_after_takeover(_request: CompletionRequest) -> tuple[str, str]:
        if not taken_over:
            _expire_lease(sqlite_store, job_id)
            taken_over.append(_claim(sqlite_store, job_id))
        return answer, "stop" if result == "summary" else "length"

    engine = ScriptedEngine(answer_after_takeover)
    worker = _summarizer(sqlite_store, engine, model_dir, lease_s=60)

    with structlog.testing.capture_logs() as logs:
        outcome = worker.process_job(job_id)

    job = sqlite_store.get_job(job_id)
    assert (outcome.ran, outcome.state) == (False, "running")
    assert job is not None
    assert (job.state, job.lease_owner) == ("running", taken_over[0].lease_owner)
    assert job.error_code is None
    assert _count_summaries(sqlite_store, job_id) == 0
    discarded = [e for e in logs if e["event"] == "job_result_discarded"]
    assert [(e["result"], e["log_level"]) for e in discarded] == [(result, "warning")]


@pytest.mark.parametrize(
    ("error", "last_try", "result"),
    [
        (KeyError("bug"), False, "failure"),
        (EngineUnavailableError("engine down"), True, "failure"),
    ],
    ids=["crash", "last_try"],
)
def test_a_delivery_that_lost_its_lease_never_fails_the_job_of_the_new_owner(
    sqlite_store: ChartStore,
    model_dir: Path,
    error: Exception,
    last_try: bool,
    result: str,
) -> None:
    """A crash or a last retry after a takeover writes nothing to the job."""
    job_id = _job(sqlite_store)
    taken_over: list[ClaimedJob] = []

    def fail_after_takeover(_request: CompletionRequest) -> tuple[str, str]:
        _expire_lease(sqlite_store, job_id)
        taken_over.append(_claim(sqlite_store, job_id))
        raise error

    worker = _summarizer(
        sqlite_store, ScriptedEngine(fail_after_takeover), model_dir, lease_s=60
    )

    with structlog.testing.capture_logs() as logs:
        outcome = worker.process_job(job_id, last_try=last_try)

    job = sqlite_store.get_job(job_id)
    assert (outcome.ran, outcome.state) == (False, "running")
    assert job is not None
    assert (job.state, job.lease_owner) == ("running", taken_over[0].lease_owner)
    assert job.error_code is None
    discarded = [e for e in logs if e["event"] == "job_result_discarded"]
    assert [e["result"] for e in discarded] == [result]
