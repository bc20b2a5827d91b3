"""The task adapter: outages become retries, bugs end one job only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from celery.exceptions import Retry

from pipelines.engine import CompletionRequest
from pipelines.errors import (
    EngineDeadError,
    EngineUnavailableError,
    StoreUnavailableError,
)
from pipelines.stays import parse_stay_lines
from pipelines.store import ChartStore
from pipelines.summarize import Summarizer
from schemas.settings import Settings
from tests.helpers import ScriptedEngine, scripted_summarizer, stay_line
from workers import tasks


class _Task:
    """Just enough of a bound Celery task for the adapter."""

    def __init__(self, retries: int) -> None:
        self.request = SimpleNamespace(id=None, retries=retries)
        self.retried_with: dict[str, Any] | None = None

    def retry(self, **kwargs: Any) -> Retry:
        self.retried_with = kwargs
        return Retry("retry")

    def update_state(self, **_kwargs: Any) -> None:
        """Progress states are not under test here."""


class _Summarizer:
    def __init__(self, store: ChartStore, error: Exception) -> None:
        self.store = store
        self.error = error

    def process_job(self, job_id: str, **_kwargs: Any) -> Any:
        raise self.error


def _job(store: ChartStore) -> str:
    store.ingest(parse_stay_lines([stay_line("a")]).stays)
    [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
    return job_id


def test_an_unreachable_database_is_a_retryable_error() -> None:
    """A refused connection surfaces as StoreUnavailableError, never a crash."""
    store = ChartStore("postgresql+psycopg://postgres@127.0.0.1:1/none")

    with pytest.raises(StoreUnavailableError, match="will be retried"):
        store.claim_job("x", lease_s=10)


def test_a_database_outage_schedules_a_retry_with_backoff(
    sqlite_store: ChartStore,
) -> None:
    """The task retries with a doubling delay and leaves the job alone."""
    job_id = _job(sqlite_store)
    task = _Task(retries=2)
    summarizer = _Summarizer(sqlite_store, StoreUnavailableError("db down"))

    with pytest.raises(Retry):
        tasks._run(task, summarizer, job_id)  # type: ignore[arg-type]

    assert task.retried_with is not None
    assert task.retried_with["countdown"] == 20
    job = sqlite_store.get_job(job_id)
    assert job is not None and job.state == "queued"


def _real_summarizer(
    store: ChartStore,
    model_dir: Path,
    answer: Callable[[CompletionRequest], tuple[str, str]],
) -> Summarizer:
    return scripted_summarizer(store, ScriptedEngine(answer), model_dir)


def _raise(error: Exception) -> Callable[[CompletionRequest], tuple[str, str]]:
    def answer(_request: CompletionRequest) -> tuple[str, str]:
        raise error

    return answer


def test_retries_run_out_into_a_failed_job_with_the_reason(
    sqlite_store: ChartStore, model_dir: Path
) -> None:
    """On the last try the job is failed, saying what kept failing."""
    job_id = _job(sqlite_store)
    task = _Task(retries=tasks.MAX_RETRIES)
    summarizer = _real_summarizer(
        sqlite_store, model_dir, _raise(EngineUnavailableError("engine down"))
    )

    result = tasks._run(task, summarizer, job_id)  # type: ignore[arg-type]

    job = sqlite_store.get_job(job_id)
    assert task.retried_with is None
    assert result["state"] == "failed"
    assert job is not None and job.error_code == "retries_exhausted"
    assert "engine down" in (job.error or "")
    assert job.lease_owner is None


def test_an_unexpected_exception_fails_only_its_job_without_quoting_it(
    sqlite_store: ChartStore, model_dir: Path
) -> None:
    """A bug ends the job as internal_error; its message is not copied."""
    job_id = _job(sqlite_store)
    secret = "note text that must not leak"
    summarizer = _real_summarizer(sqlite_store, model_dir, _raise(KeyError(secret)))

    with structlog.testing.capture_logs() as logs:
        result = tasks._run(_Task(retries=0), summarizer, job_id)  # type: ignore[arg-type]

    job = sqlite_store.get_job(job_id)
    assert result["state"] == "failed"
    assert job is not None and job.error_code == "internal_error"
    assert secret not in (job.error or "")
    crashed = [e for e in logs if e["event"] == "job_crashed"]
    assert [e["error_type"] for e in crashed] == ["KeyError"]
    assert secret not in repr(logs)


def test_a_crash_before_the_claim_still_ends_the_job(
    sqlite_store: ChartStore,
) -> None:
    """A bug outside process_job's claim ends the job at the task boundary."""
    job_id = _job(sqlite_store)
    summarizer = _Summarizer(sqlite_store, KeyError("claim bug"))

    result = tasks._run(_Task(retries=0), summarizer, job_id)  # type: ignore[arg-type]

    job = sqlite_store.get_job(job_id)
    assert result["state"] == "failed"
    assert job is not None and job.error_code == "internal_error"


def test_a_dead_engine_hands_the_job_back_and_shuts_the_worker_down(
    sqlite_store: ChartStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is retried elsewhere; the worker asks for one warm shutdown."""
    signals: list[int] = []
    monkeypatch.setattr(tasks.os, "kill", lambda _pid, sig: signals.append(sig))
    monkeypatch.setattr(tasks, "_engine_died", tasks.threading.Event())
    job_id = _job(sqlite_store)
    summarizer = _Summarizer(sqlite_store, EngineDeadError("engine died"))

    for _ in range(2):
        task = _Task(retries=0)
        with pytest.raises(Retry):
            tasks._run(task, summarizer, job_id)  # type: ignore[arg-type]
        assert task.retried_with is not None

    assert signals == [tasks.signal.SIGTERM]
    assert tasks.engine_died()
    job = sqlite_store.get_job(job_id)
    assert job is not None and job.state == "queued"


def test_retry_delays_double_and_stop_at_the_cap() -> None:
    """5 s, 10 s, 20 s, ... never more than ten minutes."""
    delays = [tasks.retry_delay_s(n) for n in range(10)]

    assert delays[:4] == [5, 10, 20, 40]
    assert max(delays) == 600


def test_each_queue_has_its_own_routing_so_a_message_reaches_one_queue() -> None:
    """A task sent to the backfill queue is routed to that queue alone."""
    from workers.app import create_app

    app = create_app()
    queues = {queue.name: queue for queue in app.conf.task_queues}

    keys = {name: queue.routing_key for name, queue in queues.items()}
    exchanges = {name: queue.exchange.name for name, queue in queues.items()}
    assert keys == {name: name for name in queues}
    assert exchanges == {name: name for name in queues}


@pytest.mark.services
def test_a_message_sent_to_the_backfill_queue_lands_only_there(redis_url: str) -> None:
    """In real Redis the backfill list grows by one, the realtime list not at all."""
    import redis

    from workers.app import create_app
    from workers.constants import QUEUE_BACKFILL, QUEUE_REALTIME, TASK_SUMMARIZE

    app = create_app(Settings.model_validate({"redis": {"url": redis_url}}))
    client = redis.Redis.from_url(redis_url)

    app.send_task(TASK_SUMMARIZE, args=["job-x"], queue=QUEUE_BACKFILL)

    assert (client.llen(QUEUE_BACKFILL), client.llen(QUEUE_REALTIME)) == (1, 0)
    client.close()


def test_a_dead_engine_on_the_last_try_ends_the_job_and_still_shuts_down(
    sqlite_store: ChartStore, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job fails for good; the worker still restarts for a new engine."""
    signals: list[int] = []
    monkeypatch.setattr(tasks.os, "kill", lambda _pid, sig: signals.append(sig))
    monkeypatch.setattr(tasks, "_engine_died", tasks.threading.Event())
    job_id = _job(sqlite_store)
    summarizer = _real_summarizer(
        sqlite_store, model_dir, _raise(EngineDeadError("engine died"))
    )
    task = _Task(retries=tasks.MAX_RETRIES)

    with pytest.raises(EngineDeadError):
        tasks._run(task, summarizer, job_id)  # type: ignore[arg-type]

    job = sqlite_store.get_job(job_id)
    assert task.retried_with is None
    assert signals == [tasks.signal.SIGTERM]
    assert job is not None
    assert (job.state, job.error_code) == ("failed", "retries_exhausted")


@pytest.mark.parametrize("error", [EngineUnavailableError, EngineDeadError])
def test_a_database_down_at_the_last_write_leaves_the_job_to_the_sweeper(
    sqlite_store: ChartStore,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: type[Exception],
) -> None:
    """No retry is scheduled; a dead engine is still reported, so it restarts."""
    monkeypatch.setattr(tasks.os, "kill", lambda _pid, _sig: None)
    monkeypatch.setattr(tasks, "_engine_died", tasks.threading.Event())
    job_id = _job(sqlite_store)
    summarizer = _real_summarizer(sqlite_store, model_dir, _raise(error("down")))

    def database_down(*_args: Any, **_kwargs: Any) -> bool:
        raise StoreUnavailableError("database down")

    monkeypatch.setattr(sqlite_store, "fail_job", database_down)
    task = _Task(retries=tasks.MAX_RETRIES)

    with pytest.raises(error if error is EngineDeadError else StoreUnavailableError):
        tasks._run(task, summarizer, job_id)  # type: ignore[arg-type]

    job = sqlite_store.get_job(job_id)
    assert task.retried_with is None
    assert job is not None and job.state == "running"
    assert tasks.engine_died() is (error is EngineDeadError)


def test_a_crash_outside_the_claim_spares_a_job_another_delivery_holds(
    sqlite_store: ChartStore,
) -> None:
    """The task-level fallback ends only jobs no live lease protects."""
    job_id = _job(sqlite_store)
    held = sqlite_store.claim_job(job_id, lease_s=600)
    assert held is not None
    summarizer = _Summarizer(sqlite_store, KeyError("claim bug"))

    tasks._run(_Task(retries=0), summarizer, job_id)  # type: ignore[arg-type]

    job = sqlite_store.get_job(job_id)
    assert job is not None
    assert (job.state, job.lease_owner) == ("running", held.lease_owner)
