"""Pure arithmetic of the benchmark: percentiles, rates, ratios, tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class PhaseResult:
    """What one phase did: stays finished, time, tokens and job latencies.

    Job latency is from the phase's start (every stay is available at once)
    to that stay's completion, in every phase, so the three compare.
    """

    name: str
    stays: int
    wall_s: float
    completion_tokens: int
    latencies_ms: list[float] = field(default_factory=list)
    #: Lines of context printed under the phase (counts, caveats).
    notes: list[str] = field(default_factory=list)

    @property
    def stays_per_min(self) -> float:
        """Stays finished per minute of wall time."""
        return self.stays / self.wall_s * 60 if self.wall_s > 0 else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens generated per second of wall time."""
        if self.wall_s <= 0:
            return math.nan
        return self.completion_tokens / self.wall_s

    @property
    def p50_ms(self) -> float:
        """Median job latency."""
        return percentile(self.latencies_ms, 50)

    @property
    def p95_ms(self) -> float:
        """95th-percentile job latency."""
        return percentile(self.latencies_ms, 95)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is not positive."""
    if denominator <= 0 or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def format_ratio(value: float, *, target: float, at_least: bool = True) -> str:
    """A ratio with its target and whether it was met.

    Example: ``0.93 (target >= 0.9: met)``.
    """
    if math.isnan(value):
        return f"n/a {verdict(value, target=target, at_least=at_least)}"
    return f"{value:.2f} {verdict(value, target=target, at_least=at_least)}"


def verdict(value: float, *, target: float, at_least: bool = True) -> str:
    """Whether a value met its target, e.g. ``(target <= 20: MISSED)``."""
    sign = ">=" if at_least else "<="
    if math.isnan(value):
        return f"(target {sign} {target:g}: not measured)"
    met = value >= target if at_least else value <= target
    return f"(target {sign} {target:g}: {'met' if met else 'MISSED'})"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [
        max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))
    ]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def phase_table(phases: Sequence[PhaseResult]) -> str:
    """The per-phase headline numbers as a table."""
    rows = [
        (
            phase.name,
            str(phase.stays),
            f"{phase.wall_s:.1f}",
            f"{phase.stays_per_min:.2f}",
            str(phase.completion_tokens),
            f"{phase.tokens_per_s:.1f}",
            f"{phase.p50_ms / 1000:.1f}",
            f"{phase.p95_ms / 1000:.1f}",
        )
        for phase in phases
    ]
    header = (
        "phase",
        "stays",
        "wall s",
        "stays/min",
        "compl tok",
        "compl tok/s",
        "p50 s",
        "p95 s",
    )
    return format_table(header, rows)


def stage_table(stage_ms: dict[str, list[float]], *, job_ms: Sequence[float]) -> str:
    """Mean, p50 and p95 milliseconds per stage, and each mean's share of a job."""
    mean_job_ms = sum(job_ms) / len(job_ms) if job_ms else math.nan
    rows = []
    for stage, values in stage_ms.items():
        mean = sum(values) / len(values) if values else math.nan
        share = ratio(mean, mean_job_ms) * 100
        rows.append(
            (
                stage,
                f"{mean:.1f}",
                f"{percentile(values, 50):.1f}",
                f"{percentile(values, 95):.1f}",
                f"{share:.1f}%",
            )
        )
    return format_table(("stage", "mean ms", "p50 ms", "p95 ms", "of job"), rows)


def format_bytes(size: float) -> str:
    """Bytes as MiB or GiB, e.g. ``1.25 GiB``."""
    if size >= 1 << 30:
        return f"{size / (1 << 30):.2f} GiB"
    return f"{size / (1 << 20):.0f} MiB"
