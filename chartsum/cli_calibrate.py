"""`chartsum calibrate`: measure the served model's effective context."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from chartsum.console import console
from pipelines.calibration_report import band_label, format_length
from schemas.calibration import (
    DEFAULT_CONCURRENCY,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    DEFAULT_TRIALS,
    CalibrationResult,
    DepthBand,
    FingerprintParts,
    ProbeKind,
    ProbeScore,
)
from schemas.settings import Settings

#: Longest wait for one probe's answer (seconds): an 8k-token probe takes
#: minutes on two CPU cores, and several wait in the engine's queue.
CALIBRATION_REQUEST_TIMEOUT_S = 3600.0

if TYPE_CHECKING:
    from pipelines.calibration_store import CalibrationStore


@click.command()
@click.option(
    "--quick",
    is_flag=True,
    help="Only 256 and 1k tokens, one trial per cell: minutes, but coarse.",
)
@click.option("--show", is_flag=True, help="Print the stored calibrations and exit.")
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=DEFAULT_THRESHOLD,
    show_default=True,
    help="Lowest score every depth band must reach at a length.",
)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=None,
    help=f"Trials per length, band and kind [default: {DEFAULT_TRIALS}; quick 1].",
)
@click.option(
    "--lengths",
    default=None,
    help="Prompt lengths to test, e.g. 1k,2k,4k or 1024,3000 [default: 256, 512,"
    " 1k, 2k, 4k, then the engine maximum less 128].",
)
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Haystacks in flight at once (the engine batches them).",
)
@click.pass_context
def calibrate(
    ctx: click.Context,
    quick: bool,
    show: bool,
    threshold: float,
    trials: int | None,
    lengths: str | None,
    seed: int,
    concurrency: int,
) -> None:
    """Measure how long an input the served model still finds facts in.

    Plants facts at the start, middle third and end of real note text at
    each length, asks for them through the workers' engine and chat
    template, and stores the longest length at which every depth band
    scores at least the threshold. Workers route by it.
    """
    from pipelines.calibration import calibration_fingerprint, served_model_parts
    from pipelines.calibration_store import CalibrationStore
    from pipelines.model import model_fingerprint
    from pipelines.runtime import open_store

    settings: Settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
    _require_model(settings)
    store = open_store(settings)
    calibrations = CalibrationStore(store)
    parts = served_model_parts(
        model_dir=settings.model_dir,
        vllm=settings.vllm,
        model_fingerprint=model_fingerprint(settings.model_dir),
    )
    key = calibration_fingerprint(parts)
    if show:
        _show(calibrations.list_all(), calibrations.find(key), key)
        return
    try:
        result = _calibrate(
            settings,
            calibrations,
            parts,
            quick=quick,
            threshold=threshold,
            trials=trials,
            lengths=_parse_lengths(lengths),
            seed=seed,
            concurrency=concurrency,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _print_result(result)


def _calibrate(
    settings: Settings,
    calibrations: CalibrationStore,
    parts: FingerprintParts,
    *,
    quick: bool,
    threshold: float,
    trials: int | None,
    lengths: list[int] | None,
    seed: int,
    concurrency: int,
) -> CalibrationResult:
    from pipelines.calibration import (
        build_probes,
        load_probe_corpus,
        plan_calibration,
        run_calibration,
    )
    from pipelines.calibration_report import write_report
    from pipelines.engine import open_engine
    from pipelines.tokens import TokenCounter

    plan = plan_calibration(
        max_model_len_tokens=settings.vllm.max_model_len_tokens,
        quick=quick,
        lengths_tokens=lengths,
        trials=trials,
        threshold=threshold,
        seed=seed,
    )
    tokens = TokenCounter.from_model_dir(settings.model_dir)
    corpus = load_probe_corpus(
        calibrations, tokens=tokens, top_tokens=plan.lengths_tokens[-1]
    )
    probes = build_probes(plan, corpus=corpus, tokens=tokens)
    console.print(
        f"calibrating {settings.model_dir.name}: lengths"
        f" {', '.join(format_length(n) for n in plan.lengths_tokens)};"
        f" {plan.trials} trial(s); {len(probes)} probes; corpus {corpus.source}"
        f" ({sum(corpus.paragraph_tokens)} tokens of distinct note text)"
    )
    console.print("starting the engine ...")
    # Probes queue behind each other on purpose, so one may wait far longer
    # than a job's request; nothing else about the engine changes.
    timeout_s = max(settings.vllm.request_timeout_s, CALIBRATION_REQUEST_TIMEOUT_S)
    vllm = settings.vllm.model_copy(update={"request_timeout_s": timeout_s})
    engine = open_engine(vllm, model_dir=settings.model_dir)
    lock = threading.Lock()
    try:
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("probes", total=len(probes))

            def scored(_score: ProbeScore) -> None:
                with lock:
                    progress.advance(task)

            result = run_calibration(
                engine=engine,
                tokens=tokens,
                corpus=corpus,
                plan=plan,
                parts=parts,
                concurrency=min(concurrency, settings.vllm.max_num_seqs),
                probes=probes,
                on_scored=scored,
            )
    finally:
        engine.close()
    saved = calibrations.save(result)
    markdown, png = write_report(saved, reports_dir=settings.data_dir / "reports")
    console.print(f"report: {markdown}\nheatmap: {png}")
    return saved


def _show(
    results: list[CalibrationResult], current: CalibrationResult | None, key: str
) -> None:
    if not results:
        console.print("no calibrations stored; run `chartsum calibrate`")
        return
    table = Table(title="stored calibrations")
    for column in ("id", "created (UTC)", "model", "mode", "effective", "fingerprint"):
        table.add_column(column)
    for result in results:
        mark = " (served)" if result.fingerprint == key else ""
        table.add_row(
            str(result.id),
            f"{result.created_at:%Y-%m-%d %H:%M}",
            Path(result.model_name).name[-40:],
            result.mode,
            _effective(result),
            result.fingerprint[:12] + mark,
        )
    console.print(table)
    if current is None:
        console.print(
            f"[bold red]the served model (fingerprint {key[:12]}) has no"
            " calibration[/]: workers route by the conservative default;"
            " run `chartsum calibrate`"
        )
        return
    console.print(f"workers route by calibration {current.id}:")
    _print_result(current)


def _print_result(result: CalibrationResult) -> None:
    lengths = result.lengths_tokens
    grid = result.band_scores()
    table = Table(title=f"calibration {result.id}: score by depth band and length")
    table.add_column("depth band")
    for length in lengths:
        table.add_column(format_length(length), justify="right")
    for band in DepthBand:
        table.add_row(
            band_label(band),
            *(_cell(grid[n][band], result.threshold) for n in lengths),
        )
    curve = result.curve()
    table.add_row("all", *(f"{curve[n]:.2f}" for n in lengths))
    console.print(table)
    by_kind = Table(title="score by probe kind")
    by_kind.add_column("probe kind")
    for length in lengths:
        by_kind.add_column(format_length(length), justify="right")
    for kind in ProbeKind:
        row = []
        for length in lengths:
            scores = [
                p.score
                for p in result.probes
                if p.length_tokens == length and p.kind == kind
            ]
            row.append(f"{sum(scores) / len(scores):.2f}")
        by_kind.add_row(str(kind), *row)
    console.print(by_kind)
    console.print(
        f"effective length: [bold]{_effective(result)}[/] (threshold"
        f" {result.threshold:.0%}; {result.mode}, {result.trials} trial(s),"
        f" {len(result.probes)} probes, {result.duration_s:.0f} s)"
    )


def _cell(score: float, threshold: float) -> str:
    colour = "green" if score >= threshold else "red"
    return f"[{colour}]{score:.2f}[/]"


def _effective(result: CalibrationResult) -> str:
    if result.effective_tokens is None:
        return "none"
    return f"{result.effective_tokens} tokens"


def _parse_lengths(text: str | None) -> list[int] | None:
    if not text:
        return None
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = int(part[:-1]) * 1024 if part.endswith("k") else int(part)
        except ValueError as exc:
            raise click.BadParameter(f"not a length: {part!r}") from exc
        lengths.append(value)
    return lengths


def _require_model(settings: Settings) -> None:
    from pipelines.errors import ModelPrepareError

    if not (settings.model_dir / "config.json").is_file():
        raise ModelPrepareError(
            f"no model at {settings.model_dir}; run `chartsum model prepare` or"
            " set CHARTSUM_VLLM__MODEL_DIR to a local model folder"
        )
