"""The `chartsum` command line."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import structlog
from pydantic import ValidationError
from rich.table import Table

from chartsum.cli_bench import bench
from chartsum.cli_calibrate import calibrate
from chartsum.cli_ops import register as register_ops_commands
from chartsum.console import console
from pipelines.errors import ChartsumError, EngineDeadError, RetryableError
from pipelines.logs import configure_logging
from schemas.settings import Settings

log = structlog.get_logger("chartsum.cli")


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


@click.group()
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Summarize hospital stays with a local model."""
    try:
        settings = Settings()
    except ValidationError as exc:
        # One line per bad variable, named as it is set; never the value,
        # which may be a password.
        problems = "; ".join(
            "CHARTSUM_"
            + "__".join(str(part).upper() for part in error["loc"])
            + f": {error['msg']}"
            for error in exc.errors()
        )
        raise click.ClickException(f"invalid settings: {problems}") from None
    configure_logging(settings.logging)
    ctx.obj = settings


@cli.group()
def model() -> None:
    """Manage the local model."""


@model.command("prepare")
@click.option(
    "--target",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder to write (default: the configured model folder).",
)
@click.pass_context
def model_prepare(ctx: click.Context, target: Path | None) -> None:
    """Turn the shipped SmolLM2 GGUF into a bf16 safetensors folder (offline)."""
    from pipelines.model import prepare_embedded_model

    settings = _settings(ctx)
    prepared = prepare_embedded_model(target_dir=target or settings.model_dir)
    verb = "prepared" if prepared.created else "already prepared"
    click.echo(f"{verb}: {prepared.path}")
    click.echo(f"fingerprint: {prepared.fingerprint}")


@cli.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def ingest(ctx: click.Context, path: Path) -> None:
    """Load stays from a JSON-lines file; bad lines are reported, good ones kept."""
    from pipelines.runtime import open_store
    from pipelines.stays import read_stays_file

    parsed = read_stays_file(path)
    store = open_store(_settings(ctx))
    # A visit cut from a longitudinal record may already be stored as a stay
    # (same encounter id, from a stay file); the stay record is the richer
    # one and its summaries stay current, so it is kept as it is.
    known = set(store.stay_ids())
    stays = [
        s
        for s in parsed.stays
        if not (
            (s.model_extra or {}).get("longitudinal_record_id") and s.stay_id in known
        )
    ]
    if len(stays) < len(parsed.stays):
        click.echo(
            f"{len(parsed.stays) - len(stays)} visit(s) of longitudinal records"
            " are already stored as stays; kept as they are"
        )
    counts = store.ingest(stays)
    rejected = _report_bad_lines(path, parsed) + _report_refused(path, counts)
    click.echo(
        f"stays: {counts.added} added, {counts.updated} updated,"
        f" {counts.unchanged} unchanged, {rejected} rejected"
    )
    if parsed.removed_control_chars:
        click.echo(f"removed {parsed.removed_control_chars} control characters")
    if rejected:
        sys.exit(1)


@cli.command()
@click.option("--stay", "stay_ids", multiple=True, help="Stay id (repeatable).")
@click.option(
    "--patient",
    "patient_ids",
    multiple=True,
    help="Patient id (repeatable), with --kind longitudinal.",
)
@click.option(
    "--all", "all_stays", is_flag=True, help="Every stored stay (or patient)."
)
@click.option(
    "--kind",
    type=click.Choice(["discharge", "longitudinal"]),
    default="discharge",
    show_default=True,
    help="discharge: one summary per stay; longitudinal: one per patient.",
)
@click.option(
    "--queue",
    type=click.Choice(["realtime", "backfill"]),
    default="realtime",
    show_default=True,
)
@click.pass_context
def enqueue(
    ctx: click.Context,
    stay_ids: tuple[str, ...],
    patient_ids: tuple[str, ...],
    all_stays: bool,
    kind: str,
    queue: str,
) -> None:
    """Create a durable job per stay (or patient) and send a task carrying its id."""
    from pipelines.runtime import open_store
    from workers.app import create_app
    from workers.enqueue import enqueue_stays

    settings = _settings(ctx)
    store = open_store(settings)
    if kind == "longitudinal" or patient_ids:
        _enqueue_patients(settings, store, patient_ids, all_stays, kind, queue)
        return
    ids = store.stay_ids() if all_stays else list(stay_ids)
    if not ids:
        raise click.UsageError("name at least one --stay, or --all")
    app = create_app(settings)
    sent = enqueue_stays(store, app, stay_ids=ids, queue=queue)
    created = sum(1 for job in sent if job.created)
    for job in sent:
        click.echo(f"{job.stay_id}\t{job.job_id}\t{'new' if job.created else 'open'}")
    click.echo(f"{len(sent)} job(s) sent, {created} new")


def _enqueue_patients(
    settings: Settings,
    store: Any,
    patient_ids: tuple[str, ...],
    all_patients: bool,
    kind: str,
    queue: str,
) -> None:
    from workers.app import create_app
    from workers.enqueue import enqueue_patients

    if kind != "longitudinal":
        raise click.UsageError("--patient goes with --kind longitudinal")
    ids = store.patient_ids() if all_patients else list(patient_ids)
    if not ids:
        raise click.UsageError("name at least one --patient, or --all")
    sent = enqueue_patients(
        store, create_app(settings), patient_ids=ids, queue=queue, kind=kind
    )
    for job in sent:
        click.echo(
            f"{job.patient_id}\t{job.job_id}\t{'new' if job.created else 'open'}"
        )
    click.echo(f"{len(sent)} job(s) sent, {sum(j.created for j in sent)} new")


@cli.command()
@click.option("--concurrency", type=int, default=None, help="Jobs in flight.")
@click.option(
    "--queues",
    default="chartsum.realtime,chartsum.backfill",
    show_default=True,
    help="Queues to consume, most urgent first.",
)
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None, queues: str) -> None:
    """Run a Celery worker: one engine, many jobs in flight on threads."""
    from pipelines.runtime import build_summarizer
    from workers.app import create_app
    from workers.constants import EXIT_ENGINE_DEAD
    from workers.tasks import engine_died, install_summarizer

    settings = _settings(ctx)
    # Start the engine before consuming, so a broken model stops the worker
    # here with its reason instead of failing every job.
    install_summarizer(build_summarizer(settings))
    app = create_app(settings)
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={concurrency or settings.pipeline.worker_concurrency}",
                f"--queues={queues}",
                f"--loglevel={settings.logging.level}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        if engine_died():
            click.echo(
                "the in-process engine died; exiting so the supervisor restarts"
                " this worker (its jobs were handed back for retry)",
                err=True,
            )
            raise SystemExit(EXIT_ENGINE_DEAD)


@cli.command()
@click.argument(
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=False,
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Only the first N stays."
)
@click.option(
    "--kind",
    type=click.Choice(["discharge", "longitudinal"]),
    default="discharge",
    show_default=True,
    help="A discharge summary per stay, or a longitudinal one per patient.",
)
@click.pass_context
def run(ctx: click.Context, path: Path | None, limit: int | None, kind: str) -> None:
    """The embedded default: ingest, summarize and store, all in this process.

    Without PATH the example stays shipped with chartsum are used.
    """
    from pipelines.runtime import build_summarizer
    from pipelines.stays import iter_example_paths, read_stays_file

    settings = _settings(ctx)
    path = path or next(iter_example_paths())
    parsed = read_stays_file(path)
    _report_bad_lines(path, parsed)
    stays = parsed.stays[:limit] if limit else parsed.stays
    summarizer = build_summarizer(settings)
    try:
        counts = summarizer.store.ingest(stays)
        rejected = len(parsed.errors) + _report_refused(path, counts)
        refused = {stay_id for stay_id, _ in counts.rejected}
        stays = [s for s in stays if s.stay_id not in refused]
        if kind == "longitudinal":
            patients = list(dict.fromkeys(s.patient_id for s in stays))
            jobs = summarizer.store.create_patient_jobs(
                kind=kind, patient_ids=patients, queue="embedded"
            )
        else:
            jobs = summarizer.store.create_jobs(
                kind=kind, stay_ids=[s.stay_id for s in stays], queue="embedded"
            )
        started = time.perf_counter()
        outcomes = _run_jobs(summarizer, [job_id for job_id, _ in jobs], settings)
        elapsed_s = time.perf_counter() - started
    finally:
        summarizer.engine.close()
    _print_outcomes(outcomes, summarizer.store, elapsed_s)
    click.echo(f"summaries are in {_safe_url(settings.database_url)}")
    click.echo("read one with: chartsum show STAY_OR_PATIENT_ID")
    if rejected:
        click.echo(f"{rejected} stay line(s) rejected (listed above)", err=True)
        sys.exit(1)


def _report_bad_lines(path: Path, parsed: Any) -> int:
    """Print each line the file's parse rejected; return how many."""
    for error in parsed.errors:
        click.echo(f"error: {path.name} {error}", err=True)
    return len(parsed.errors)


def _report_refused(path: Path, counts: Any) -> int:
    """Print each stay the store refused to ingest; return how many."""
    for stay_id, reason in counts.rejected:
        click.echo(f"error: {path.name} stay {stay_id}: {reason}", err=True)
    return len(counts.rejected)


def _run_jobs(summarizer: Any, job_ids: list[str], settings: Settings) -> list[Any]:
    from pipelines.summarize import JobOutcome

    def one(job_id: str) -> JobOutcome:
        for attempt in range(3):
            try:
                outcome: JobOutcome = summarizer.process_job(job_id)
                return outcome
            except EngineDeadError as exc:
                # Nothing in this process can bring the engine back.
                last = str(exc)
                break
            except RetryableError as exc:
                time.sleep(2**attempt)
                last = str(exc)
        return JobOutcome(job_id=job_id, state="queued", error=last)

    workers = max(1, min(settings.pipeline.worker_concurrency, len(job_ids)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, job_ids))


def _print_outcomes(outcomes: list[Any], store: Any, elapsed_s: float) -> None:
    jobs = {job.id: job for job in store.jobs_by_id([o.job_id for o in outcomes])}
    table = Table(title=f"chartsum run: {len(outcomes)} jobs in {elapsed_s:.0f} s")
    # Ids are never cut: they are what `chartsum show` takes.
    table.add_column("stay or patient", overflow="fold", min_width=20)
    for column in ("route", "prompt tok", "completion tok", "outcome", "s"):
        table.add_column(column)
    for outcome in outcomes:
        job = jobs.get(outcome.job_id)
        table.add_row(
            (job.stay_id or job.patient_id if job else outcome.stay_id) or "?",
            (outcome.route or (job.route if job else None)) or "-",
            str(outcome.prompt_tokens or (job.prompt_tokens if job else "") or "-"),
            str(outcome.completion_tokens or "-"),
            outcome.state if outcome.ran else f"{outcome.state} (earlier)",
            f"{outcome.duration_ms / 1000:.1f}",
        )
    console.print(table)
    for outcome in outcomes:
        if outcome.error:
            console.print(f"[yellow]{outcome.job_id}[/]: {outcome.error}")


@cli.command()
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print the stored JSON.")
@click.pass_context
def show(ctx: click.Context, key: str, as_json: bool) -> None:
    """Print the summary of a stay id, a patient id (longitudinal) or a job id."""
    from pipelines.runtime import open_store
    from pipelines.show import render_summary

    store = open_store(_settings(ctx))
    found = store.find_summary(key) or store.find_patient_summary(key)
    if found is None:
        job = store.get_job(key) or store.newest_job_of(key)
        if job is not None:
            raise click.ClickException(
                f"no summary yet: job {job.id} is {job.state}"
                + (f" ({job.error})" if job.error else "")
            )
        raise click.ClickException(f"no summary for stay, patient or job {key}")
    summary, job = found
    if as_json:
        click.echo(json.dumps(_summary_json(summary, job), indent=2))
        return
    console.print(render_summary(summary, job))
    if summary.stay_id is not None and store.stay_changed_since(summary):
        click.echo(
            f"warning: stay {summary.stay_id} was re-ingested with other content"
            " after this summary was made; enqueue it again for a current one",
            err=True,
        )


@cli.command()
@click.argument("stay_id")
@click.pass_context
def route(ctx: click.Context, stay_id: str) -> None:
    """Explain which route a stay would take, without running the model."""
    from pipelines.model import model_fingerprint
    from pipelines.prompts import build_discharge_prompt
    from pipelines.routing import choose_route
    from pipelines.runtime import effective_context, open_store, require_model_dir
    from pipelines.tokens import TokenCounter

    settings = _settings(ctx)
    tokens = TokenCounter.from_model_dir(require_model_dir(settings))
    store = open_store(settings)
    chart = store.load_chart(stay_id)
    prompt = build_discharge_prompt(chart, tokens=tokens)
    context = effective_context(
        settings, model_fingerprint(settings.model_dir), store=store
    )
    decision = choose_route(
        prompt_tokens=prompt.tokens,
        completion_budget_tokens=settings.pipeline.max_completion_tokens,
        context=context,
    )
    click.echo(f"stay {stay_id}: {len(chart.notes)} notes")
    click.echo(decision.explain())
    if context.source == "default":
        click.echo(
            "the served model has no calibration, so this is the conservative"
            " default; run `chartsum calibrate`",
            err=True,
        )
    elif context.tokens == 0:
        click.echo(
            f"{context.source} found no tested length at which the model finds"
            " facts, so nothing goes single-pass; see `chartsum calibrate --show`",
            err=True,
        )


def _summary_json(summary: Any, job: Any) -> dict[str, Any]:
    return {
        "job_id": summary.job_id,
        "stay_id": summary.stay_id,
        "patient_id": summary.patient_id,
        "kind": summary.kind,
        "schema_version": summary.schema_version,
        "model_name": summary.model_name,
        "model_fingerprint": summary.model_fingerprint,
        "route": summary.route,
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "input_sha256": summary.input_sha256,
        "generation_ms": summary.generation_ms,
        "created_at": summary.created_at.isoformat() if summary.created_at else None,
        "job_state": job.state,
        "job_error": job.error,
        "support_rate": summary.support_rate,
        "support": summary.support,
        "summary": summary.payload,
    }


def _safe_url(url: str) -> str:
    # Never print a password that a URL may carry.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def main() -> None:
    """Console entry point; reports chartsum's own errors without a traceback."""
    try:
        cli(standalone_mode=True)
    except ChartsumError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


cli.add_command(calibrate)
cli.add_command(bench)
register_ops_commands(cli)


if __name__ == "__main__":
    main()
