"""Turning a chart into the chat a model summarizes.

Note text is quoted under headers that give each note a short alias
(``N1``, ``N2``, ...), which the model cites and chartsum maps back to note
ids: real ids run to 20 tokens each, and a small model copies a short alias
far more reliably. Any special-token string inside a note (``<|im_end|>``
and the like) is broken up first: a note must never end the user turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.stays import Chart
from pipelines.tokens import TokenCounter, neutralize_special_tokens

SYSTEM_PROMPT = """\
You write hospital discharge summaries for clinicians.
Use only facts written in the notes. Never guess or add facts.
Each statement is one short sentence and lists the notes it comes from,
by the note labels N1, N2, ... shown in the chart.
Sections:
- hospital_course: why the patient came and what happened.
- discharge_diagnoses: diagnoses at discharge.
- discharge_medications: medications after discharge, with doses if written.
- allergies, procedures, consultations, pending_results: as written.
- follow_up and discharge_instructions: the plan and advice given.
- condition_at_discharge and disposition: as written.
Leave a section as [] when the notes say nothing about it.
Answer with JSON only."""


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt and what it took to make it."""

    messages: list[dict[str, str]]
    token_ids: list[int]
    #: Alias the prompt uses for each note ("N1") -> the note's real id.
    aliases: dict[str, str]
    #: Special-token strings that had to be broken up in note text.
    neutralized_tokens: int

    @property
    def tokens(self) -> int:
        """Prompt length in model tokens."""
        return len(self.token_ids)


def note_aliases(chart: Chart) -> dict[str, str]:
    """Short labels for the chart's notes, in chart order: N1, N2, ..."""
    return {f"N{i}": note.note_id for i, note in enumerate(chart.notes, start=1)}


def render_chart(chart: Chart, *, special_tokens: frozenset[str]) -> tuple[str, int]:
    """The chart as plain text: a stay header, then every note under its alias.

    Returns:
        The text and how many special-token strings were broken up.
    """
    lines = [f"Stay {chart.stay_id}"]
    if chart.encounter_class:
        lines.append(f"Encounter: {chart.encounter_class}")
    if chart.reason_for_visit:
        lines.append(f"Reason for visit: {chart.reason_for_visit}")
    if chart.admit_time:
        lines.append(f"Admitted: {chart.admit_time:%Y-%m-%d}")
    if chart.discharge_time:
        lines.append(f"Discharged: {chart.discharge_time:%Y-%m-%d}")
    neutralized = 0
    for alias, note in zip(note_aliases(chart), chart.notes, strict=True):
        kind = note.note_type or "note"
        when = f", {note.charted_at:%Y-%m-%d}" if note.charted_at else ""
        text, count = neutralize_special_tokens(note.text, special_tokens)
        neutralized += count
        lines.append(f"\n=== {alias}: {kind}{when} ===\n{text}")
    return "\n".join(lines), neutralized


def build_discharge_prompt(chart: Chart, *, tokens: TokenCounter) -> Prompt:
    """The single-pass discharge-summary prompt for one stay, tokenized."""
    chart_text, neutralized = render_chart(chart, special_tokens=tokens.special_tokens)
    user = (
        f"{chart_text}\n\nWrite the discharge summary of this stay as JSON."
        " Cite notes by their labels (N1, N2, ...)."
    )
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]
    rendered = tokens.render_chat(messages, add_generation_prompt=True)
    token_ids = tokens.encode(rendered, allow_special=True)
    return Prompt(messages, token_ids, note_aliases(chart), neutralized)
