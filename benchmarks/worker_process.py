"""Starting a worker subprocess for a phase, waiting on it, and reading it back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import func, select

from benchmarks.rss import RssSampler
from benchmarks.workload import REPO
from pipelines.store import ChartStore
from schemas.tables import FINAL_STATES, Job, Summary

#: Longest wait for a worker to answer a ping after it starts (the engine
#: loads first; on a busy 2-core machine that takes a minute or two).
READY_TIMEOUT_S = 600


@contextmanager
def worker_process(
    command: Sequence[str],
    *,
    env: dict[str, str],
    log_path: Path,
    sampler: RssSampler,
    label: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a worker command in its own session; stop it and its children after.

    Its stdout and stderr (JSON log lines) go to ``log_path``.
    """
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            list(command),
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sampler.watch(process.pid, label)
        try:
            yield process
        finally:
            sampler.unwatch(label)
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until_ready(
    app: Celery, process: subprocess.Popen[bytes], *, log_path: Path
) -> float:
    """Block until the worker answers a ping; return the seconds it took.

    Raises:
        RuntimeError: The worker exited or never answered.
    """
    started = time.perf_counter()
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if process.poll() is not None:
            tail = log_path.read_text()[-2000:]
            raise RuntimeError(f"worker exited ({process.returncode}):\n{tail}")
        if app.control.ping(timeout=1.0):
            return time.perf_counter() - started
    raise RuntimeError(f"worker did not answer a ping in {READY_TIMEOUT_S} s")


def wait_until_final(
    store: ChartStore, job_ids: Sequence[str], *, timeout_s: float
) -> list[Job]:
    """Poll the jobs until every one is final; return their rows.

    Raises:
        TimeoutError: Some jobs were still open after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = store.jobs_by_id(job_ids)
        if all(job.state in FINAL_STATES for job in jobs):
            return jobs
        if time.monotonic() > deadline:
            open_jobs = sum(1 for job in jobs if job.state not in FINAL_STATES)
            raise TimeoutError(f"{open_jobs} job(s) still open after {timeout_s} s")
        time.sleep(0.25)


def summary_tokens(store: ChartStore, job_ids: Sequence[str]) -> int:
    """Completion tokens of the stored summaries of these jobs."""
    with store.engine.connect() as conn:
        query = select(func.coalesce(func.sum(Summary.completion_tokens), 0))
        found = conn.execute(query.where(Summary.job_id.in_(job_ids))).scalar()
    return int(found or 0)


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    """end - start in seconds, None when either is missing."""
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def read_job_lines(
    log_path: Path, *, event_name: str = "job_completed"
) -> list[dict[str, Any]]:
    """The events of one name (default ``job_completed``) in a JSON log."""
    events = []
    for line in log_path.read_text().splitlines():
        if f'"{event_name}"' not in line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == event_name:
            events.append(event)
    return events


def stage_samples(events: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Milliseconds per stage across jobs, from ``stage_ms`` of job lines."""
    order = ("claim", "chart_load", "tokenize", "route", "engine", "validate")
    stages: dict[str, list[float]] = {name: [] for name in (*order, "write")}
    for event in events:
        for name, value in (event.get("stage_ms") or {}).items():
            stages.setdefault(name, []).append(float(value))
    return {name: values for name, values in stages.items() if values}
