"""Turning a chart into the chat a model summarizes.

Note text is quoted between note headers that carry the note id, so the
model can cite it. Any special-token string inside a note (``<|im_end|>``
and the like) is broken up first: a note must never end the user turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.stays import Chart
from pipelines.tokens import TokenCounter, neutralize_special_tokens

SYSTEM_PROMPT = """\
You write hospital discharge summaries for clinicians.
Use only facts written in the notes. Never guess or add facts.
Each statement is one short sentence and lists the note_ids it comes from.
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
    #: Special-token strings that had to be broken up in note text.
    neutralized_tokens: int

    @property
    def tokens(self) -> int:
        """Prompt length in model tokens."""
        return len(self.token_ids)


def render_chart(chart: Chart, *, special_tokens: frozenset[str]) -> tuple[str, int]:
    """The chart as plain text: a stay header, then every note under its id.

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
    for note in chart.notes:
        kind = note.note_type or "note"
        when = f", {note.charted_at:%Y-%m-%d}" if note.charted_at else ""
        text, count = neutralize_special_tokens(note.text, special_tokens)
        neutralized += count
        lines.append(f"\n=== note_id: {note.note_id} ({kind}{when}) ===\n{text}")
    return "\n".join(lines), neutralized


def build_discharge_prompt(chart: Chart, *, tokens: TokenCounter) -> Prompt:
    """The single-pass discharge-summary prompt for one stay, tokenized."""
    chart_text, neutralized = render_chart(chart, special_tokens=tokens.special_tokens)
    user = (
        f"{chart_text}\n\nWrite the discharge summary of stay {chart.stay_id}"
        " as JSON. Cite note_ids from the headers above."
    )
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]
    rendered = tokens.render_chat(messages, add_generation_prompt=True)
    token_ids = tokens.encode(rendered, allow_special=True)
    return Prompt(messages, token_ids, neutralized)
