"""`chartsum bench`: the throughput benchmark (prints numbers, asserts nothing)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from schemas.settings import Settings


@click.command()
@click.option(
    "--quick",
    is_flag=True,
    help="6 stays, 512-token budget, 20k-job backfill: a few minutes.",
)
@click.option(
    "--examples-only",
    is_flag=True,
    help="Only the example stays shipped with chartsum, not ../shared/data.",
)
@click.option("--stays", type=int, default=None, help="Only the first N stays.")
@click.option(
    "--max-tokens",
    type=int,
    default=None,
    help="Completion budget for every phase (default: the pipeline setting).",
)
@click.option(
    "--concurrency",
    type=int,
    default=None,
    help="Worker threads (default: the number of stays, at least the setting).",
)
@click.option(
    "--keep-retries",
    is_flag=True,
    help=(
        "Let pipeline jobs retry invalid output as configured (default: one"
        " attempt, the same work as the engine-only phases)."
    ),
)
@click.option(
    "--offline-llm",
    is_flag=True,
    help=(
        "Phase 1 on vllm.LLM (offline) instead of the worker's AsyncLLM"
        " engine given every request at once."
    ),
)
@click.option("--overhead-jobs", type=int, default=None, help="Instant-responder jobs.")
@click.option(
    "--backfill-jobs", type=int, default=None, help="Jobs in the enqueue test."
)
@click.option(
    "--no-engine",
    is_flag=True,
    help="Skip the three engine phases; only the instant-responder parts.",
)
@click.option(
    "--pg-admin-url",
    default="postgresql://postgres@127.0.0.1:5432/test",
    show_default=True,
    help="Database to create the benchmark's own database from.",
)
@click.option(
    "--redis-url",
    default="redis://127.0.0.1:6379/14",
    show_default=True,
    help="Redis database the benchmark owns (it is flushed).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report to this file.",
)
@click.pass_context
def bench(
    ctx: click.Context,
    *,
    quick: bool,
    examples_only: bool,
    stays: int | None,
    max_tokens: int | None,
    concurrency: int | None,
    keep_retries: bool,
    offline_llm: bool,
    overhead_jobs: int | None,
    backfill_jobs: int | None,
    no_engine: bool,
    pg_admin_url: str,
    redis_url: str,
    output: Path | None,
) -> None:
    """Measure throughput: engine alone, the full pipeline, a naive baseline.

    Uses a database and Redis db of its own and the configured model and
    engine settings; takes about 15 minutes on 2 cores (--quick: a few).
    """
    from benchmarks.throughput import QUICK, BenchOptions, run_benchmark
    from pipelines.logs import configure_logging
    from schemas.settings import LoggingSettings

    settings: Settings = ctx.obj
    # The report goes to stdout; only warnings from chartsum and libraries.
    configure_logging(LoggingSettings(level="WARNING", json_logs=False))
    options = replace(BenchOptions(), **QUICK) if quick else BenchOptions()
    given = {
        "stays": stays,
        "max_tokens": max_tokens,
        "concurrency": concurrency,
        "overhead_jobs": overhead_jobs,
        "backfill_jobs": backfill_jobs,
    }
    options = replace(
        options,
        include_shared=not examples_only,
        engine_phases=not no_engine,
        generation_attempts=None if keep_retries else 1,
        offline_llm=offline_llm,
        pg_admin_url=pg_admin_url,
        redis_url=redis_url,
        **{key: value for key, value in given.items() if value is not None},
    )
    report = run_benchmark(options, base=settings, echo=click.echo)
    click.echo("")
    click.echo(report)
    if output is not None:
        output.write_text(report + "\n")
