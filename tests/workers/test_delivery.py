"""At-least-once delivery under failure, with real parts.

A real vLLM server (the embedded model on the CPU), real Celery workers in
server mode, real PostgreSQL, and a Redis server of the test's own that the
test may kill. What must hold: every job ends final, and no job ever has
more than one summary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from pipelines.stays import read_stays_file
from pipelines.store import ChartStore
from schemas.settings import Settings
from schemas.tables import FINAL_STATES, Summary
from tests.conftest import EXAMPLES, REPO
from workers.app import create_app
from workers.constants import QUEUE_REALTIME, TASK_SWEEP
from workers.enqueue import enqueue_stays

pytestmark = [pytest.mark.engine, pytest.mark.services]

FINAL_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def vllm_server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The embedded model behind vLLM's OpenAI-compatible server."""
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model",
                str(model_dir),
                "--served-model-name",
                "chartsum-test",
                "--max-model-len",
                "8192",
                "--enforce-eager",
                "--kv-cache-memory-bytes",
                str(1 << 30),
                "--structured-outputs-config.backend",
                "xgrammar",
                "--structured-outputs-config.disable_any_whitespace",
                "true",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)


class RedisServer:
    """A redis-server of the test's own, which the test may kill and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(50):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        pytest.fail("redis-server did not start")

    def kill(self) -> None:
        assert self.process is not None
        _stop(self.process, signal.SIGKILL)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis, started for one test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


def _settings(store: ChartStore, redis: RedisServer, vllm_url: str) -> dict[str, str]:
    return {
        "CHARTSUM_DATABASE__URL": store.url,
        "CHARTSUM_REDIS__URL": redis.url,
        "CHARTSUM_REDIS__VISIBILITY_TIMEOUT_S": "30",
        "CHARTSUM_VLLM__MODE": "server",
        "CHARTSUM_VLLM__SERVER_URL": vllm_url,
        "CHARTSUM_VLLM__SERVED_MODEL_NAME": "chartsum-test",
        "CHARTSUM_PIPELINE__MAX_COMPLETION_TOKENS": "384",
        "CHARTSUM_PIPELINE__MAX_GENERATION_ATTEMPTS": "2",
        # Longer than one job takes here (no lease renewal yet), short enough
        # for a killed worker's job to be taken over within the test.
        "CHARTSUM_PIPELINE__JOB_LEASE_S": "90",
        "CHARTSUM_OPERATIONS__QUEUED_STALE_S": "10",
        "CHARTSUM_LOGGING__JSON_LOGS": "true",
    }


def _start_worker(
    env: dict[str, str], log: Path, model_dir: Path
) -> subprocess.Popen[bytes]:
    full = dict(os.environ, **env, CHARTSUM_VLLM__MODEL_DIR=str(model_dir))
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "chartsum", "worker", "--concurrency=4"],
            cwd=REPO,
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _app(env: dict[str, str]):  # type: ignore[no-untyped-def]
    settings = Settings.model_validate(
        {
            "database": {"url": env["CHARTSUM_DATABASE__URL"]},
            "redis": {"url": env["CHARTSUM_REDIS__URL"]},
        }
    )
    return create_app(settings)


def _wait_final_sweeping(
    store: ChartStore, job_ids: list[str], env: dict[str, str], log: Path
) -> None:
    """Wait for every job to be final, sending the sweep now and then."""
    app = _app(env)
    deadline = time.monotonic() + FINAL_TIMEOUT_S
    next_sweep = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all(j.state in FINAL_STATES for j in store.jobs_by_id(job_ids)):
            return
        if time.monotonic() > next_sweep:
            # Redis may be restarting: then the next round tries again.
            with contextlib.suppress(Exception):
                app.send_task(TASK_SWEEP, queue=QUEUE_REALTIME)
            next_sweep = time.monotonic() + 15
        time.sleep(2)
    pytest.fail(f"jobs not final in time; worker log:\n{log.read_text()[-3000:]}")


def _summaries_per_job(store: ChartStore, job_ids: list[str]) -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(Summary.job_id, func.count())
            .where(Summary.job_id.in_(job_ids))
            .group_by(Summary.job_id)
        ).all()
    return {job_id: count for job_id, count in rows}


def test_a_worker_killed_mid_job_loses_nothing_and_duplicates_nothing(
    pg_store: ChartStore,
    own_redis: RedisServer,
    vllm_server: str,
    model_dir: Path,
    tmp_path: Path,
) -> None:
    """SIGKILL during generation: another worker finishes the job, once."""
    # Given three stays being worked on by one worker
    env = _settings(pg_store, own_redis, vllm_server)
    stays = read_stays_file(EXAMPLES).stays[:3]
    pg_store.ingest(stays)
    log = tmp_path / "workers.log"
    first = _start_worker(env, log, model_dir)
    sent = enqueue_stays(pg_store, _app(env), stay_ids=[s.stay_id for s in stays])
    job_ids = [job.job_id for job in sent]
    deadline = time.monotonic() + 300
    while not any(j.state == "running" for j in pg_store.jobs_by_id(job_ids)):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)

    # When that worker is killed with SIGKILL and another one takes over
    _stop(first, signal.SIGKILL)
    second = _start_worker(env, log, model_dir)
    try:
        _wait_final_sweeping(pg_store, job_ids, env, log)
    finally:
        _stop(second)

    # Then every job is final, one summary at most, and a delivery was lost
    jobs = pg_store.jobs_by_id(job_ids)
    assert all(job.state in FINAL_STATES for job in jobs)
    assert all(count == 1 for count in _summaries_per_job(pg_store, job_ids).values())
    assert any(job.lost_deliveries >= 1 for job in jobs)
    # A summary is stored for each succeeded job and each one flagged for
    # low support, and for no other.
    stored = [
        job.id
        for job in jobs
        if job.state == "succeeded"
        or (job.state == "needs_review" and job.error_code == "low_support")
    ]
    assert set(_summaries_per_job(pg_store, job_ids)) == set(stored)


def test_a_redis_restart_mid_run_loses_no_job(
    pg_store: ChartStore,
    own_redis: RedisServer,
    vllm_server: str,
    model_dir: Path,
    tmp_path: Path,
) -> None:
    """Redis dies with the queue in memory; the sweep re-sends from PostgreSQL."""
    # Given jobs queued in a Redis that keeps nothing on disk
    env = _settings(pg_store, own_redis, vllm_server)
    stays = read_stays_file(EXAMPLES).stays[3:6]
    pg_store.ingest(stays)
    sent = enqueue_stays(pg_store, _app(env), stay_ids=[s.stay_id for s in stays])
    job_ids = [job.job_id for job in sent]

    # When Redis is killed before any worker runs, and restarted empty
    own_redis.kill()
    own_redis.start()
    log = tmp_path / "workers.log"
    worker = _start_worker(env, log, model_dir)
    try:
        _wait_final_sweeping(pg_store, job_ids, env, log)
    finally:
        _stop(worker)

    # Then every job still ended, with one summary at most
    jobs = pg_store.jobs_by_id(job_ids)
    assert all(job.state in FINAL_STATES for job in jobs)
    assert all(count == 1 for count in _summaries_per_job(pg_store, job_ids).values())
