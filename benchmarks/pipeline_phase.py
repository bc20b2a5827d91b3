"""Phase 2: the full pipeline, from first enqueue to last stored summary.

A real ``chartsum worker`` subprocess (Celery threads pool, one in-process
engine) consumes jobs that ``enqueue_stays`` sends through Redis, and writes
summaries to PostgreSQL. Stage times come from the database rows and from
the ``stage_ms`` field of each job's ``job_completed`` log line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.rss import RssSampler
from benchmarks.stats import PhaseResult
from benchmarks.worker_process import (
    read_job_lines,
    seconds_between,
    stage_samples,
    summary_tokens,
    wait_until_final,
    wait_until_ready,
    worker_process,
)
from pipelines.store import ChartStore
from schemas.settings import Settings
from schemas.tables import Job
from workers.app import create_app
from workers.constants import QUEUE_REALTIME
from workers.enqueue import enqueue_stays

#: Longest wait for all of a phase's jobs to end.
JOBS_TIMEOUT_S = 3600


@dataclass
class PipelineRun:
    """What a pipeline run measured."""

    result: PhaseResult
    #: Milliseconds per stage across jobs, queue wait first.
    stage_ms: dict[str, list[float]]
    #: Each job's created_at -> finished_at (ms).
    job_ms: list[float]


def run_pipeline(
    stay_ids: Sequence[str],
    *,
    name: str,
    command: Sequence[str],
    store: ChartStore,
    settings: Settings,
    env: dict[str, str],
    sampler: RssSampler,
    log_path: Path,
) -> PipelineRun:
    """Start a worker, enqueue one job per stay, and wait for every summary.

    Args:
        stay_ids: Stays to summarize.
        name: The phase's name in the report.
        command: The worker command (``chartsum worker`` or the instant one).
        store: The benchmark database.
        settings: Settings of the run (Redis and database of the benchmark).
        env: Environment of the worker; carries the same settings.
        sampler: Records the worker tree's peak memory.
        log_path: Where the worker's JSON log goes.
    """
    app = create_app(settings)
    with worker_process(
        command, env=env, log_path=log_path, sampler=sampler, label=name
    ) as process:
        ready_s = wait_until_ready(app, process, log_path=log_path)
        started = time.time()
        sent = enqueue_stays(store, app, stay_ids=stay_ids, queue="realtime")
        enqueue_s = time.time() - started
        job_ids = [job.job_id for job in sent]
        jobs = wait_until_final(store, job_ids, timeout_s=JOBS_TIMEOUT_S)
    app.close()
    return _read_run(
        jobs,
        name=name,
        started=started,
        store=store,
        log_path=log_path,
        max_tokens=settings.pipeline.max_completion_tokens,
        notes=[f"worker ready after {ready_s:.0f} s; enqueue took {enqueue_s:.2f} s"],
    )


def worker_command(
    concurrency: int,
    *,
    entry: Sequence[str] = ("chartsum", "worker"),
) -> list[str]:
    """A worker on the realtime queue with this concurrency.

    Args:
        concurrency: Worker threads.
        entry: Module to run and its arguments (default ``chartsum worker``,
            which logs at the level the benchmark sets, INFO).
    """
    return [
        sys.executable,
        "-m",
        *entry,
        f"--concurrency={concurrency}",
        f"--queues={QUEUE_REALTIME}",
    ]


def _read_run(
    jobs: Sequence[Job],
    *,
    name: str,
    started: float,
    store: ChartStore,
    log_path: Path,
    max_tokens: int,
    notes: list[str],
) -> PipelineRun:
    finished = [job.finished_at.timestamp() for job in jobs if job.finished_at]
    states: dict[str, int] = {}
    for job in jobs:
        states[job.state] = states.get(job.state, 0) + 1
    attempts = sum(job.generation_attempts for job in jobs)
    events = {event.get("job_id"): event for event in read_job_lines(log_path)}
    queue_wait_ms: list[float] = []
    job_ms: list[float] = []
    other_ms: list[float] = []
    for job in jobs:
        wait_s = seconds_between(job.created_at, job.started_at)
        total_s = seconds_between(job.created_at, job.finished_at)
        if wait_s is None or total_s is None:
            continue
        queue_wait_ms.append(wait_s * 1000)
        job_ms.append(total_s * 1000)
        stages = (events.get(job.id) or {}).get("stage_ms") or {}
        if stages:
            other_ms.append((total_s - wait_s) * 1000 - sum(stages.values()))
    stage_ms = {"queue wait": queue_wait_ms, **stage_samples(list(events.values()))}
    stage_ms["other (Celery, ack)"] = other_ms
    # A cut-off attempt generated exactly max_tokens; an attempt that was
    # invalid JSON logs no count, so its tokens are missing from the total.
    cut_off = len(read_job_lines(log_path, event_name="completion_cut_off"))
    invalid = len(read_job_lines(log_path, event_name="completion_invalid"))
    stored = summary_tokens(store, [job.id for job in jobs])
    result = PhaseResult(
        name=name,
        stays=len(jobs),
        wall_s=(max(finished) - started) if finished else 0.0,
        completion_tokens=stored + cut_off * max_tokens,
        latencies_ms=[(t - started) * 1000 for t in finished],
        notes=[
            *notes,
            "job states: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())),
            f"generation attempts: {attempts} for {len(jobs)} jobs; completion"
            f" tokens = {stored} stored + {cut_off} cut off x {max_tokens}"
            + (f"; {invalid} invalid attempt(s) not counted" if invalid else ""),
        ],
    )
    return PipelineRun(result, stage_ms, job_ms)
