"""Operator commands: backfill, status, flower, beat."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import sys
import textwrap
from datetime import UTC, datetime
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from chartsum.console import console
from schemas.settings import Settings
from schemas.tables import JobState, SummaryKind

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


def _parse_date(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO date") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@click.command()
@click.option("--since", required=True, help="ISO date: stays discharged from.")
@click.option("--until", required=True, help="ISO date: ... up to (exclusive).")
@click.option(
    "--kind", type=click.Choice(["discharge", "longitudinal"]), default="discharge"
)
@click.option("--missing-only", is_flag=True, help="Only stays with no summary.")
@click.option(
    "--model-changed",
    is_flag=True,
    help="Stays whose newest summary came from another model fingerprint.",
)
@click.option(
    "--rate",
    type=float,
    default=None,
    help="Most jobs queued per second (default from settings; 0: no limit).",
)
@click.pass_context
def backfill(
    ctx: click.Context,
    since: str,
    until: str,
    kind: str,
    missing_only: bool,
    model_changed: bool,
    rate: float | None,
) -> None:
    """Queue summaries for past stays on the backfill queue (resumable)."""
    from pipelines.backfill import (
        BackfillRequest,
        count_backfill_stays,
        run_backfill,
    )
    from pipelines.model import model_fingerprint
    from pipelines.runtime import open_store
    from workers.app import create_app
    from workers.constants import QUEUE_BACKFILL
    from workers.enqueue import backfill_sender

    settings = _settings(ctx)
    start, end = _parse_date(since), _parse_date(until)
    if start >= end:
        raise click.UsageError(f"--since {since} is not before --until {until}")
    request = BackfillRequest(
        since=start,
        until=end,
        kind=kind,
        missing_only=missing_only,
        model_changed_from=(
            model_fingerprint(settings.model_dir) if model_changed else None
        ),
    )
    store = open_store(settings)
    app = create_app(settings)
    total = count_backfill_stays(store, request)

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("backfill", total=total, counts="")

        def progress(queued: int, skipped: int, failed: int) -> None:
            counts = f"queued {queued}, skipped {skipped}, failed {failed}"
            bar.update(task, completed=queued + skipped + failed, counts=counts)

        counts = run_backfill(
            store,
            request,
            send=backfill_sender(app),
            queue=QUEUE_BACKFILL,
            rate_limit_per_s=(
                settings.operations.backfill_rate_limit_per_s if rate is None else rate
            ),
            progress=progress,
        )
    note = (
        " (already finished earlier: nothing new queued)"
        if counts.already_finished
        else ""
    )
    click.echo(
        f"backfill {counts.backfill_id}: {counts.queued} queued,"
        f" {counts.skipped} skipped, {counts.failed} failed{note}"
    )
    if counts.failed:
        sys.exit(1)


@click.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Queue depths, jobs by state, recent failures and engine health."""
    import redis

    from pipelines.operations import count_jobs_by_state, recent_failures
    from pipelines.runtime import open_store
    from workers.constants import QUEUE_BACKFILL, QUEUE_CALIBRATION, QUEUE_REALTIME

    settings = _settings(ctx)
    store = open_store(settings)
    queues = Table(title="queues")
    queues.add_column("queue")
    queues.add_column("waiting", justify="right")
    try:
        client = redis.Redis.from_url(settings.redis.url.get_secret_value())
        for name in (QUEUE_REALTIME, QUEUE_BACKFILL, QUEUE_CALIBRATION):
            queues.add_row(name, str(client.llen(name)))
    except redis.RedisError as exc:
        queues.add_row("redis", f"unreachable ({type(exc).__name__})")
    console.print(queues)
    states = Table(title="jobs")
    states.add_column("state")
    states.add_column("jobs", justify="right")
    for state, count in sorted(count_jobs_by_state(store).items()):
        states.add_row(state, str(count))
    console.print(states)
    failures = Table(title="recent failures")
    # Ids in full (they are what `chartsum show` takes); long reasons end at
    # a word, with the whole text on the job (`chartsum show JOB_ID`).
    failures.add_column("job", no_wrap=True, min_width=36)
    for column in ("stay", "state", "code", "reason"):
        failures.add_column(column, overflow="fold")
    for job in recent_failures(store):
        failures.add_row(
            job.job_id,
            job.stay_id or "-",
            job.state,
            job.error_code or "-",
            textwrap.shorten(job.error or "", width=160, placeholder=" ..."),
        )
    console.print(failures)
    console.print(f"engine: {_engine_health(settings)}")


@click.command()
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([state.value for state in JobState]),
    help="Only jobs in this state (repeat for several).",
)
@click.option("--code", help="Only jobs that ended with this error code.")
@click.option(
    "--kind",
    type=click.Choice([kind.value for kind in SummaryKind]),
    help="Only discharge or longitudinal jobs.",
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--latest",
    is_flag=True,
    help="Only the newest job of each stay or patient (skip re-summarized ones).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per line instead."
)
@click.pass_context
def jobs(
    ctx: click.Context,
    states: tuple[str, ...],
    code: str | None,
    kind: str | None,
    limit: int,
    latest: bool,
    as_json: bool,
) -> None:
    """List jobs, newest first: state, route, support rate and error code.

    For example the summaries waiting for a clinician:
    `chartsum jobs --latest --state needs_review`. Ids in full, for
    `chartsum show`.
    """
    from pipelines.operations import list_jobs
    from pipelines.runtime import open_store

    store = open_store(_settings(ctx))
    try:
        found = list_jobs(
            store,
            states=states,
            error_code=code,
            kind=kind,
            limit=limit,
            latest=latest,
        )
    finally:
        store.close()
    if as_json:
        for row in found:
            click.echo(json.dumps(dataclasses.asdict(row), default=datetime.isoformat))
        return
    # Plain columns, one job per line, nothing cut: made to grep and paste.
    line = "{:<36}  {:<12}  {:<11}  {:>7}  {:<20}  {:<12}  {}"
    click.echo(
        line.format("JOB", "STATE", "ROUTE", "SUPPORT", "CODE", "KIND", "SUBJECT")
    )
    for row in found:
        support = "-" if row.support_rate is None else f"{row.support_rate:.2f}"
        click.echo(
            line.format(
                row.job_id,
                row.state,
                row.route or "-",
                support,
                row.error_code or "-",
                row.kind,
                row.subject or "-",
            )
        )


def _engine_health(settings: Settings) -> str:
    import httpx

    if settings.vllm.mode == "server":
        base = settings.vllm.server_url.rstrip("/").removesuffix("/v1")
        try:
            response = httpx.get(f"{base}/health", timeout=5)
        except httpx.HTTPError as exc:
            return f"server {base} unreachable ({type(exc).__name__})"
        return f"server {base} answered {response.status_code}"
    model = settings.model_dir / "config.json"
    if not model.is_file():
        return (
            f"in-process: no model at {settings.model_dir}"
            " (run `chartsum model prepare`)"
        )
    return f"in-process: model folder {settings.model_dir} present"


def flower_arguments(settings: Settings) -> list[str]:
    """Flower's command line for these settings.

    Raises:
        click.UsageError: Flower would listen beyond localhost without
            authentication.
    """
    ops = settings.operations
    if not _is_loopback(ops.flower_address) and ops.flower_basic_auth is None:
        raise click.UsageError(
            f"refusing to serve Flower on {ops.flower_address} without"
            " authentication: set CHARTSUM_OPERATIONS__FLOWER_BASIC_AUTH"
            " (user:password) or listen on 127.0.0.1"
        )
    arguments = [
        "flower",
        f"--address={ops.flower_address}",
        f"--port={ops.flower_port}",
        # Flower keeps task args/results in memory for its pages; they hold
        # ids and counts only, but cap them anyway.
        "--max_tasks=10000",
    ]
    if ops.flower_basic_auth is not None:
        arguments.append(f"--basic-auth={ops.flower_basic_auth.get_secret_value()}")
    return arguments


def _is_loopback(address: str) -> bool:
    if address in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@click.command()
@click.pass_context
def flower(ctx: click.Context) -> None:
    """Start Flower on the same broker, with authentication from settings."""
    from workers.app import create_app

    settings = _settings(ctx)
    arguments = flower_arguments(settings)
    app = create_app(settings)
    app.start(arguments)


@click.command()
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Run Celery beat: the stuck-job sweep and the nightly backfill."""
    from workers.app import create_app

    settings = _settings(ctx)
    app = create_app(settings)
    schedule_file = settings.data_dir / "celerybeat-schedule"
    schedule_file.parent.mkdir(parents=True, exist_ok=True)
    app.start(
        ["beat", f"--schedule={schedule_file}", f"--loglevel={settings.logging.level}"]
    )


def register(cli: Any) -> None:
    """Add the operator commands to the `chartsum` group."""
    for command in (backfill, status, jobs, flower, beat):
        cli.add_command(command)
