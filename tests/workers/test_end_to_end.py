"""Real stays through a real worker: Redis, Celery, vLLM on the CPU, PostgreSQL.

One worker process starts the embedded model once; the test enqueues the
shipped example stays plus two bad ones and checks what lands in the
database, in Redis and in the worker's log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipelines.stays import parse_stay_lines, read_stays_file
from pipelines.store import ChartStore
from schemas.settings import Settings
from schemas.summary import DischargeSummary
from schemas.tables import FINAL_STATES, JobState
from tests.conftest import EXAMPLES, REPO
from tests.helpers import stay_dict
from workers.app import create_app
from workers.constants import QUEUE_REALTIME, TASK_SUMMARIZE
from workers.enqueue import enqueue_stays

pytestmark = [pytest.mark.engine, pytest.mark.services]

#: A string planted in a note; it must never leave the database.
CANARY = "CANARY-7f3a9c-ZEBRA-QUOKKA"
JOBS_TIMEOUT_S = 900


def _env(pg_database: str, redis_url: str, model_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CHARTSUM_DATABASE__URL": pg_database,
            "CHARTSUM_REDIS__URL": redis_url,
            "CHARTSUM_VLLM__MODEL_DIR": str(model_dir),
            "CHARTSUM_LOGGING__JSON_LOGS": "true",
            "CHARTSUM_PIPELINE__WORKER_CONCURRENCY": "8",
        }
    )
    return env


@pytest.fixture
def worker(
    pg_store: ChartStore, redis_url: str, model_dir: Path, tmp_path: Path
) -> Iterator[Path]:
    """A `chartsum worker` process; yields the path of its log."""
    log_path = tmp_path / "worker.log"
    env = _env(pg_store.url, redis_url, model_dir)
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "chartsum", "worker"],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield log_path
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _settings(store: ChartStore, redis_url: str) -> Settings:
    return Settings.model_validate(
        {"database": {"url": store.url}, "redis": {"url": redis_url}}
    )


def _wait_for_final(store: ChartStore, job_ids: list[str], log_path: Path) -> None:
    deadline = time.monotonic() + JOBS_TIMEOUT_S
    while time.monotonic() < deadline:
        jobs = store.jobs_by_id(job_ids)
        if all(job.state in FINAL_STATES for job in jobs):
            return
        time.sleep(2)
    tail = log_path.read_text()[-3000:]
    pytest.fail(f"jobs not final after {JOBS_TIMEOUT_S} s; worker log tail:\n{tail}")


def _bad_stays() -> list[str]:
    # Far past any effective context: must take the chunked route, never be
    # truncated. Fourteen thousand words is about 20k tokens.
    huge = stay_dict("t-huge")
    huge["notes"][0]["text"] = "Vital signs stable overnight. " * 3500
    # Special tokens, NUL bytes and the canary: must still be summarized.
    odd = stay_dict("t-odd")
    odd["notes"][0]["text"] = (
        f"Patient admitted with pneumonia.\x00 {CANARY} <|im_end|><|endoftext|>"
        " Started ceftriaxone 1 g daily. Discharged home in stable condition."
    )
    return [json.dumps(huge), json.dumps(odd)]


def test_example_stays_become_validated_summaries_in_postgresql(
    pg_store: ChartStore, redis_url: str, worker: Path
) -> None:
    """Every stay ends final; stored summaries validate and cite their stay."""
    # Given the shipped examples and two bad stays in PostgreSQL
    examples = read_stays_file(EXAMPLES).stays
    pg_store.ingest(examples)
    pg_store.ingest(parse_stay_lines(_bad_stays()).stays)
    stay_ids = [s.stay_id for s in examples] + ["t-huge", "t-odd"]

    # When they are enqueued through Celery and the worker drains the queue
    app = create_app(_settings(pg_store, redis_url))
    sent = enqueue_stays(pg_store, app, stay_ids=stay_ids)
    job_ids = [job.job_id for job in sent]
    _wait_for_final(pg_store, job_ids, worker)

    # Then the over-long stay went the chunked route and still ended final
    jobs = {job.stay_id: job for job in pg_store.jobs_by_id(job_ids)}
    huge = jobs.pop("t-huge")
    assert huge.route == "chunked"
    assert (huge.prompt_tokens or 0) > (huge.effective_context_tokens or 0)
    assert huge.state in (JobState.SUCCEEDED, JobState.NEEDS_REVIEW), huge.error

    # And every other job ended succeeded, or needs_review with its reason;
    # every stored summary (a flagged one too) validates and cites its stay
    for job in jobs.values():
        assert job.state in (JobState.SUCCEEDED, JobState.NEEDS_REVIEW), job.error
        if job.state == JobState.NEEDS_REVIEW:
            assert job.error_code and job.error
    stored = [
        (job, found)
        for job in jobs.values()
        if (found := pg_store.find_summary(job.id)) is not None
    ]
    succeeded = [job for job in jobs.values() if job.state == JobState.SUCCEEDED]
    assert all(pg_store.find_summary(job.id) for job in succeeded)
    assert len(stored) >= len(jobs) - 1, [j.error for j in jobs.values()]
    for job, found in stored:
        summary, _ = found
        chart = pg_store.load_chart(job.stay_id or "")
        parsed = DischargeSummary.model_validate(
            summary.payload, context={"note_ids": set(chart.note_ids)}
        )
        assert parsed.hospital_course
        assert summary.prompt_tokens == job.prompt_tokens
        assert summary.input_sha256 == chart.content_sha256

    # And a second delivery of a finished job writes no second summary
    done = stored[0][0].id
    app.send_task(TASK_SUMMARIZE, args=[done], queue=QUEUE_REALTIME).get(timeout=120)
    with pg_store.engine.connect() as conn:
        count = conn.exec_driver_sql(
            "SELECT count(*) FROM summaries WHERE job_id = %s", (done,)
        ).scalar_one()
    assert count == 1

    # And the canary never left the database: not in logs, not in Redis
    log_text = worker.read_text()
    assert CANARY not in log_text
    events = [
        json.loads(line) for line in log_text.splitlines() if line.startswith("{")
    ]
    completed = [e for e in events if e.get("event") == "job_completed"]
    assert {e["job_id"] for e in completed} >= set(job_ids)
    assert all("duration_ms" in e and "route" in e for e in completed)
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter():
        dump = client.dump(key) or b""
        assert CANARY.encode() not in dump, key
