"""The benchmark's pure parts: percentiles, rates, ratios and the RSS sampler.

Nothing here is timed; the benchmark itself only prints numbers.
"""

from __future__ import annotations

import math
import os

import pytest

from benchmarks.rss import RssSampler
from benchmarks.stats import (
    PhaseResult,
    format_bytes,
    format_ratio,
    format_table,
    percentile,
    ratio,
    stage_table,
    verdict,
)


def test_percentile_interpolates_between_ranks() -> None:
    """p50 of an even count is the mean of the middle two; p95 interpolates."""
    values = [4.0, 1.0, 3.0, 2.0]

    assert percentile(values, 50) == 2.5
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0


def test_percentile_of_nothing_is_nan() -> None:
    """An empty list has no percentile, and says so with NaN."""
    assert math.isnan(percentile([], 50))


def test_phase_result_rates_use_wall_time() -> None:
    """Stays per minute and tokens per second divide by the phase's wall time."""
    phase = PhaseResult(
        name="p", stays=6, wall_s=30.0, completion_tokens=900, latencies_ms=[1, 2]
    )

    assert phase.stays_per_min == 12.0
    assert phase.tokens_per_s == 30.0
    assert phase.p50_ms == 1.5


def test_phase_result_with_no_time_has_nan_rates() -> None:
    """A phase that took no time reports NaN rather than dividing by zero."""
    phase = PhaseResult(name="p", stays=0, wall_s=0.0, completion_tokens=0)

    assert math.isnan(phase.stays_per_min)
    assert math.isnan(phase.tokens_per_s)


def test_ratio_and_its_verdict() -> None:
    """A ratio prints with two decimals and says whether it met its target."""
    assert ratio(9.0, 10.0) == 0.9
    assert math.isnan(ratio(1.0, 0.0))
    assert format_ratio(0.9, target=0.9) == "0.90 (target >= 0.9: met)"
    assert format_ratio(3.5, target=4) == "3.50 (target >= 4: MISSED)"
    assert verdict(25.0, target=20, at_least=False) == "(target <= 20: MISSED)"
    assert "not measured" in format_ratio(math.nan, target=4)


def test_tables_pad_columns() -> None:
    """Every row of a table is padded to the widest cell of each column."""
    table = format_table(("a", "bb"), [("ccc", "d")])

    assert table.splitlines() == ["a    bb", "---  --", "ccc  d"]


def test_stage_table_gives_each_stage_its_share_of_a_job() -> None:
    """A stage that takes half of the mean job time shows as 50%."""
    table = stage_table({"engine": [50.0, 50.0]}, job_ms=[100.0, 100.0])

    assert "50.0%" in table.splitlines()[2]


def test_format_bytes_switches_to_gib() -> None:
    """Sizes below a GiB print in MiB, larger ones in GiB."""
    assert format_bytes(512 << 20) == "512 MiB"
    assert format_bytes(3 << 29) == "1.50 GiB"


def test_rss_sampler_records_the_peak_of_this_process() -> None:
    """Watching this process records a positive peak under its label."""
    sampler = RssSampler(interval_s=0.05)

    with sampler:
        sampler.watch(os.getpid(), "tests")
        sampler.unwatch("tests")

    (peak,) = sampler.peaks()
    assert peak.label == "tests"
    assert peak.peak_total_bytes > 0
    assert any(name.endswith(f"[{os.getpid()}]") for name in peak.peak_by_process)


def test_rss_sampler_ignores_a_process_that_is_gone() -> None:
    """A pid that no longer exists samples as zero instead of failing."""
    sampler = RssSampler()

    sampler.watch(2**22 + 12345, "gone")

    assert sampler.peaks()[0].peak_total_bytes == 0
