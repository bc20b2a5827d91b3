"""Printing a stored summary for a person to read."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from schemas.summary import DischargeSummary
from schemas.tables import Job, Summary


def render_summary(summary: Summary, job: Job) -> Panel:
    """A summary as a panel: sections, statements, and the notes each cites."""
    parsed = DischargeSummary.model_validate(summary.payload)
    parts: list[Text] = [
        Text(
            f"stay {summary.stay_id}  job {summary.job_id}  route {summary.route}"
            f"  tokens {summary.prompt_tokens}+{summary.completion_tokens}",
            style="dim",
        )
    ]
    current = None
    for section, _index, statement in parsed.statements():
        if section != current:
            parts.append(Text(section.replace("_", " ").title(), style="bold"))
            current = section
        line = Text(f"  • {statement.text}")
        line.append(f"  [{', '.join(statement.note_ids)}]", style="cyan")
        parts.append(line)
    title = f"Discharge summary ({summary.schema_version}, {job.state})"
    return Panel(Group(*parts), title=title, expand=False)
