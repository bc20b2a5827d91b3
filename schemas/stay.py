"""The input format: one stay per JSON line (``schema_version`` "1.0").

This is the format of ``../shared/data/stays.jsonl`` and of the shipped
examples. chartsum reads the fields below and keeps every other field of the
record untouched in ``extra``; unknown fields never make a line fail. README.md
("Input format") documents the same fields; change both together.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

#: Ids are opaque keys: letters, digits and ``._:-``, at most 128 characters.
RecordId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$"),
]

#: One note may hold at most this many characters (about 250k tokens); larger
#: input is almost surely a broken export, not a note.
MAX_NOTE_CHARS = 1_000_000
#: A stay may hold at most this many notes.
MAX_NOTES_PER_STAY = 5_000


class NoteRecord(BaseModel):
    """One clinical document of a stay."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=False)

    note_id: RecordId
    note_type: str | None = Field(None, max_length=200)
    author_role: str | None = Field(None, max_length=200)
    charted_at: datetime | None = None
    text: str = Field(max_length=MAX_NOTE_CHARS)

    @model_validator(mode="after")
    def _text_is_not_blank(self) -> NoteRecord:
        if not self.text.strip():
            raise ValueError(f"note {self.note_id} has empty text")
        return self


class PatientRecord(BaseModel):
    """Demographics kept with a stay; never names or record numbers."""

    model_config = ConfigDict(extra="allow")

    sex: str | None = None
    birth_date: str | None = None
    deceased_at: str | None = None
    age_at_admission: int | None = None


class CodedItem(BaseModel):
    """A diagnosis, condition, medication order or procedure as the source codes it."""

    model_config = ConfigDict(extra="allow")

    code: str | None = None
    system: str | None = None
    display: str | None = Field(None, max_length=2000)


class StayRecord(BaseModel):
    """One inpatient stay: the unit a discharge summary covers."""

    model_config = ConfigDict(extra="allow")

    schema_version: str = "1.0"
    stay_id: RecordId
    patient_id: RecordId
    source: str | None = None
    encounter_class: str | None = None
    encounter_type: str | None = None
    reason_for_visit: str | None = None
    admit_time: datetime | None = None
    discharge_time: datetime | None = None
    patient: PatientRecord | None = None
    notes: list[NoteRecord] = Field(min_length=1, max_length=MAX_NOTES_PER_STAY)
    diagnoses: list[CodedItem] = []
    active_conditions_at_admission: list[CodedItem] = []
    medications: list[CodedItem] = []
    procedures: list[CodedItem] = []
    labs: list[dict[str, Any]] = []

    @field_validator("schema_version")
    @classmethod
    def _version_is_readable(cls, value: str) -> str:
        # 1.x adds optional fields only; another major version may change
        # the meaning of the fields read here.
        major, _, minor = value.partition(".")
        if major != "1" or not minor.isdigit():
            raise ValueError(
                f"schema_version {value[:16]!r} is not supported; this chartsum"
                " reads 1.x"
            )
        return value

    @model_validator(mode="after")
    def _discharge_is_not_before_admission(self) -> StayRecord:
        admit, discharge = self.admit_time, self.discharge_time
        if admit is None or discharge is None:
            return self
        if (admit.tzinfo is None) != (discharge.tzinfo is None):
            # One with an offset, one without: compare the wall-clock times.
            admit = admit.replace(tzinfo=None)
            discharge = discharge.replace(tzinfo=None)
        if discharge < admit:
            raise ValueError(
                f"stay {self.stay_id} has discharge_time before admit_time"
            )
        return self

    @model_validator(mode="after")
    def _note_ids_are_unique(self) -> StayRecord:
        seen: set[str] = set()
        for note in self.notes:
            if note.note_id in seen:
                raise ValueError(f"note_id {note.note_id} appears twice in the stay")
            seen.add(note.note_id)
        return self
