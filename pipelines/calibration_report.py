"""A calibration as people read it: a markdown table and a heatmap PNG."""

from __future__ import annotations

from pathlib import Path

from schemas.calibration import BAND_RANGES, CalibrationResult, DepthBand, ProbeKind


def format_length(tokens: int) -> str:
    """A ladder rung as a short label: 1024 -> "1k", 8064 -> "8064"."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def band_label(band: DepthBand) -> str:
    """A band with its range, e.g. "middle (33-67%)"."""
    low, high = BAND_RANGES[band]
    return f"{band} ({low:.0%}-{high:.0%})".replace("%-", "-")


def render_markdown(result: CalibrationResult) -> str:
    """The report: verdict, grid by band, grid by kind, curve and fingerprint."""
    lengths = result.lengths_tokens
    grid = result.band_scores()
    header = "| depth band | " + " | ".join(format_length(n) for n in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    lines = [
        f"# Calibration {result.id}: {Path(result.model_name).name}",
        "",
        f"- effective length: **{_verdict(result)}**"
        f" (threshold {result.threshold:.0%} in every depth band, at that"
        " length and every shorter one)",
        f"- mode: {result.mode}; {len(result.probes)} probes, {result.trials}"
        f" trial(s) per cell, seed {result.seed}",
        f"- wall time: {result.duration_s:.0f} s",
        f"- corpus: {result.corpus}, {result.corpus_tokens} tokens of distinct"
        f" note text (sha256 {result.corpus_sha256[:12]}){_repeats(result)}",
        f"- created: {result.created_at:%Y-%m-%d %H:%M} UTC",
        "",
        "## Score by depth band (mean over probe kinds and trials)",
        "",
        header,
        rule,
    ]
    for band in DepthBand:
        cells = [f"{grid[n][band]:.2f}" for n in lengths]
        lines.append(f"| {band_label(band)} | " + " | ".join(cells) + " |")
    curve = result.curve()
    lines.append("| **all** | " + " | ".join(f"{curve[n]:.2f}" for n in lengths) + " |")
    lines += ["", "## Score by probe kind (mean over bands and trials)", ""]
    lines += [header.replace("depth band", "probe kind"), rule]
    for kind in ProbeKind:
        cells = [f"{_kind_score(result, n, kind):.2f}" for n in lengths]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    parsed = sum(p.parsed for p in result.probes)
    cut = sum(p.finish_reason == "length" for p in result.probes)
    lines += [
        "",
        f"Answers that parsed as their schema: {parsed} of {len(result.probes)};"
        f" cut off at the answer budget: {cut}.",
        "",
        "## Fingerprint",
        "",
        f"- key: `{result.fingerprint}`",
    ]
    for name, value in result.parts.model_dump().items():
        lines.append(f"- {name}: `{value}`")
    return "\n".join(lines) + "\n"


def write_heatmap(result: CalibrationResult, path: Path) -> Path:
    """A PNG: score by depth band (rows) and length (columns), all kinds and
    each kind apart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = result.lengths_tokens
    bands = list(DepthBand)
    panels: list[tuple[str, list[list[float]]]] = [
        ("all probe kinds", _matrix(result, None)),
        *((str(kind), _matrix(result, kind)) for kind in ProbeKind),
    ]
    # Wide enough that each cell's label fits, however many rungs there are.
    panel_width = max(3.2, 0.55 * len(lengths) + 0.8)
    figure, axes = plt.subplots(
        1, len(panels), figsize=(panel_width * len(panels), 3.2), sharey=True
    )
    for axis, (title, matrix) in zip(axes, panels, strict=True):
        image = axis.imshow(matrix, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        axis.set_title(title, fontsize=10)
        axis.set_xticks(
            range(len(lengths)),
            [format_length(n) for n in lengths],
            rotation=45 if len(lengths) > 4 else 0,
            fontsize=8,
        )
        axis.set_yticks(range(len(bands)), [str(b) for b in bands])
        axis.set_xlabel("prompt length (tokens)")
        for row, values in enumerate(matrix):
            for column, value in enumerate(values):
                axis.text(
                    column, row, _cell(value), ha="center", va="center", fontsize=8
                )
    figure.colorbar(image, ax=axes, shrink=0.8, label="score")
    figure.suptitle(
        f"calibration {result.id}: effective length {_verdict(result)}"
        f" (threshold {result.threshold:.0%})",
        fontsize=11,
        y=1.06,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def write_report(result: CalibrationResult, *, reports_dir: Path) -> tuple[Path, Path]:
    """Write ``calibration-<id>.md`` and ``.png`` into ``reports_dir``."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    stem = reports_dir / f"calibration-{result.id}"
    markdown = stem.with_suffix(".md")
    png = write_heatmap(result, stem.with_suffix(".png"))
    body = render_markdown(result) + f"\n![heatmap]({png.name})\n"
    markdown.write_text(body, encoding="utf-8")
    return markdown, png


def _repeats(result: CalibrationResult) -> str:
    longest = max(result.lengths_tokens)
    if result.corpus_tokens >= longest:
        return ""
    return f"; probes over {result.corpus_tokens} tokens repeat paragraphs"


def _cell(value: float) -> str:
    """A score as a cell label: "1", "0" or ".67", short enough for a cell."""
    if value >= 1.0 or value <= 0.0:
        return f"{value:.0f}"
    return f"{value:.2f}".lstrip("0")


def _verdict(result: CalibrationResult) -> str:
    if result.effective_tokens is None:
        shortest = min(result.lengths_tokens)
        return f"none (even {shortest} tokens failed)"
    return f"{result.effective_tokens} tokens"


def _kind_score(result: CalibrationResult, length: int, kind: ProbeKind) -> float:
    scores = [
        p.score for p in result.probes if p.length_tokens == length and p.kind == kind
    ]
    return sum(scores) / len(scores) if scores else 0.0


def _matrix(result: CalibrationResult, kind: ProbeKind | None) -> list[list[float]]:
    rows = []
    for band in DepthBand:
        row = []
        for length in result.lengths_tokens:
            scores = [
                p.score
                for p in result.probes
                if p.length_tokens == length
                and p.band == band
                and (kind is None or p.kind == kind)
            ]
            row.append(sum(scores) / len(scores) if scores else 0.0)
        rows.append(row)
    return rows
