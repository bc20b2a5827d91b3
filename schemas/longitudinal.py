"""The model's output across stays: a longitudinal summary of one patient.

Sections: problems and how they evolved, medication changes, key results and
procedures, open issues. Every item cites the notes it rests on and the
stays those notes belong to; chartsum fills the stay ids from the note ids,
so the two always agree. Lists are bounded like the discharge summary's.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from schemas.summary import MAX_CITATIONS, StatementText

SCHEMA_VERSION = "longitudinal-1"


class LongitudinalItem(BaseModel):
    """One sentence about the patient's course, with its stays and notes."""

    model_config = ConfigDict(extra="forbid")

    text: StatementText
    note_ids: list[str] = Field(min_length=1, max_length=MAX_CITATIONS)
    stay_ids: list[str] = Field(min_length=1, max_length=MAX_CITATIONS)

    @model_validator(mode="after")
    def _citations_belong_to_the_patient(
        self, info: ValidationInfo
    ) -> LongitudinalItem:
        # context "stay_of_note": note id -> stay id, for the patient's notes.
        stay_of: dict[str, str] | None = (info.context or {}).get("stay_of_note")
        if stay_of is None:
            return self
        unknown = [n for n in self.note_ids if n not in stay_of]
        if unknown:
            raise ValueError(f"cites note ids not in the record: {unknown[:3]}")
        expected = list(dict.fromkeys(stay_of[n] for n in self.note_ids))
        if self.stay_ids != expected:
            raise ValueError("stay_ids are not the stays of the cited notes")
        return self


def _section(max_items: int, description: str, *, min_items: int = 0) -> Any:
    return Field(
        default_factory=list,
        min_length=min_items,
        max_length=max_items,
        description=description,
    )


class LongitudinalSummary(BaseModel):
    """A validated summary of all of one patient's stays, in time order."""

    model_config = ConfigDict(extra="forbid")

    problems: list[LongitudinalItem] = _section(
        6,
        "Problems and diagnoses and how each evolved over time, with years.",
        min_items=1,
    )
    medication_changes: list[LongitudinalItem] = _section(
        6, "Medications started, changed or stopped, with dates and doses."
    )
    key_results_and_procedures: list[LongitudinalItem] = _section(
        6, "Key test results and procedures, with dates."
    )
    open_issues: list[LongitudinalItem] = _section(
        4, "Problems still active or follow-up still due at the last stay."
    )

    def items(self) -> list[tuple[str, int, LongitudinalItem]]:
        """Every item with its section name and position in the section."""
        return [
            (name, index, item)
            for name in type(self).model_fields
            for index, item in enumerate(getattr(self, name))
        ]
