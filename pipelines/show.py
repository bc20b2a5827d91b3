"""Printing a stored summary for a person to read.

Statements that the support check could not back with their cited notes
are marked ``[unsupported: ...]``, naming the facts it missed, or the
words of a statement not worded from its notes.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from schemas.longitudinal import LongitudinalSummary
from schemas.summary import DischargeSummary
from schemas.tables import Job, Summary, SummaryKind


def render_summary(summary: Summary, job: Job) -> Panel:
    """A summary as a panel: sections, statements, the notes each cites."""
    support = _support_by_position(summary.support)
    parts: list[Text] = [_header(summary)]
    if summary.kind == SummaryKind.LONGITUDINAL:
        parsed_items = LongitudinalSummary.model_validate(summary.payload).items()
        rows = [
            (section, index, item.text, item.note_ids, item.stay_ids)
            for section, index, item in parsed_items
        ]
        title = "Longitudinal summary"
    else:
        statements = DischargeSummary.model_validate(summary.payload).statements()
        rows = [
            (section, index, s.text, s.note_ids, []) for section, index, s in statements
        ]
        title = "Discharge summary"
    current = None
    for section, index, text, note_ids, stay_ids in rows:
        if section != current:
            parts.append(Text(section.replace("_", " ").title(), style="bold"))
            current = section
        line = Text(f"  • {text}")
        if stay_ids:
            line.append(f"  stays [{', '.join(stay_ids)}]", style="magenta")
        line.append(f"  [{', '.join(note_ids)}]", style="cyan")
        checked = support.get((section, index))
        if checked is not None and not checked.get("supported", True):
            line.append(f"  {_unsupported_mark(checked)}", style="bold red")
        parts.append(line)
    return Panel(
        Group(*parts),
        title=f"{title} ({summary.schema_version}, {job.state})",
        expand=False,
    )


def _header(summary: Summary) -> Text:
    subject = (
        f"patient {summary.patient_id}"
        if summary.kind == SummaryKind.LONGITUDINAL
        else f"stay {summary.stay_id}"
    )
    rate = (
        "support not checked"
        if summary.support_rate is None
        else f"support {summary.support_rate:.0%}"
    )
    return Text(
        f"{subject}  job {summary.job_id}  route {summary.route}"
        f"  tokens {summary.prompt_tokens}+{summary.completion_tokens}  {rate}",
        style="dim",
    )


def _support_by_position(
    support: dict[str, Any] | None,
) -> dict[tuple[str, int], dict[str, Any]]:
    if not support:
        return {}
    return {
        (item["section"], item["index"]): item for item in support.get("statements", [])
    }


def _unsupported_mark(checked: dict[str, Any]) -> str:
    missing = [_missing_label(m) for m in checked.get("missing", [])]
    missing += [f"unknown note {n}" for n in checked.get("unknown_note_ids", [])]
    return f"[unsupported: {'; '.join(missing) or 'no backing found'}]"


def _missing_label(missing: dict[str, str]) -> str:
    """One missed fact as the mark names it."""
    if missing["kind"] != "words":
        return f"{missing['kind']} {missing['text']}"
    if not missing["text"]:
        return "nothing the notes could back"
    return f"words not in cited notes: {missing['text']}"
