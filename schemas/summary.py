"""The model's output: a discharge summary, section by section.

Sections follow the C-CDA discharge summary document (hospital course,
discharge diagnoses, discharge medications, allergies, procedures,
consultations, pending results, follow-up and plan, discharge instructions,
condition and disposition at discharge). Every statement cites the notes it
rests on. All lists and strings are bounded so that a small model that loops
still ends; the same bounds constrain decoding through the JSON schema.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Protocol, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

SCHEMA_VERSION = "discharge-1"

#: Longest statement (characters); about 60 tokens of English.
MAX_STATEMENT_CHARS = 240
#: Most notes one statement may cite.
MAX_CITATIONS = 3

_CLAUSE_BREAK = re.compile(r"(?<=[.;,])\s+")
_WORD = re.compile(r"\w+")


class _Said(Protocol):
    @property
    def text(self) -> str: ...


T = TypeVar("T", bound=_Said)


def words_key(text: str) -> str:
    """Text's words, lowercased and single-spaced: equal for repeats."""
    return " ".join(_WORD.findall(text.lower()))


def drop_repeated_statements(
    sections: Mapping[str, Sequence[T]],
    *,
    may_repeat: Callable[[T], bool] = lambda _statement: False,
) -> tuple[dict[str, list[T]], int]:
    """Sections with each statement said once, and how many were dropped.

    Small models also loop across a summary: one stock sentence in every
    section ("This stay was a 30 day inpatient stay at the hospital." twelve
    times). A statement whose words repeat an earlier one (see
    ``words_key``) of its own section is dropped, and so is one repeating a
    statement of an earlier section, unless ``may_repeat`` allows it and no
    other section has it yet: a dose written under hospital course belongs
    under discharge medications too, but a sentence in three sections is a
    loop. The first copy stays where it was, so a required first section
    keeps its first statement.
    """
    sections_of: dict[str, int] = {}
    kept: dict[str, list[T]] = {}
    dropped = 0
    for name, statements in sections.items():
        here: set[str] = set()
        kept[name] = []
        for statement in statements:
            key = words_key(statement.text)
            earlier = sections_of.get(key, 0)
            if key in here or (earlier and (earlier > 1 or not may_repeat(statement))):
                dropped += 1
                continue
            here.add(key)
            sections_of[key] = earlier + 1
            kept[name].append(statement)
    return kept, dropped


def drop_repeated_clauses(text: str) -> str:
    """The text without the clauses that repeat an earlier clause.

    Small models loop ("10 mg tablets, 10 mg tablets, ..."). A clause is
    what lies between a ``.``, ``;`` or ``,`` followed by a space (so
    ``2.5 mg`` stays whole); two clauses are repeats when their words match,
    case and punctuation aside. Only repeats go, so every fact the model
    wrote stays. Text without repeats comes back unchanged.
    """
    clauses = _CLAUSE_BREAK.split(text)
    kept: list[str] = []
    seen: set[str] = set()
    for clause in clauses:
        key = words_key(clause)
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(clause)
    if len(kept) == len(clauses):
        return text
    return " ".join(kept).rstrip(" ,;")


StatementText = Annotated[
    str,
    Field(min_length=1, max_length=MAX_STATEMENT_CHARS),
    AfterValidator(drop_repeated_clauses),
]


class Statement(BaseModel):
    """One sentence of the summary and the notes that back it."""

    model_config = ConfigDict(extra="forbid")

    text: StatementText
    note_ids: list[str] = Field(min_length=1, max_length=MAX_CITATIONS)

    @field_validator("text")
    @classmethod
    def _text_is_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("statement text is blank")
        return value

    @field_validator("note_ids", mode="before")
    @classmethod
    def _drop_repeated_citations(cls, value: Any) -> Any:
        # Citing one note twice says nothing more; keep the first mention.
        if isinstance(value, list):
            return list(dict.fromkeys(value))
        return value

    @field_validator("note_ids")
    @classmethod
    def _cites_notes_of_the_stay(
        cls, value: list[str], info: ValidationInfo
    ) -> list[str]:
        allowed = (info.context or {}).get("note_ids")
        if allowed is not None:
            unknown = [note_id for note_id in value if note_id not in allowed]
            if unknown:
                raise ValueError(f"cites note ids not in the stay: {unknown[:3]}")
        return value


def _section(max_items: int, description: str) -> Any:
    return Field(default_factory=list, max_length=max_items, description=description)


class DischargeSummary(BaseModel):
    """A validated discharge summary of one stay."""

    model_config = ConfigDict(extra="forbid")

    hospital_course: list[Statement] = Field(
        min_length=1,
        max_length=5,
        description="Why the patient came and what happened, in time order.",
    )
    discharge_diagnoses: list[Statement] = _section(6, "Diagnoses at discharge.")
    discharge_medications: list[Statement] = _section(
        8, "Medications to take after discharge, with dose where stated."
    )
    allergies: list[Statement] = _section(3, "Allergies and intolerances.")
    procedures: list[Statement] = _section(6, "Procedures performed in the stay.")
    consultations: list[Statement] = _section(3, "Specialist consultations.")
    pending_results: list[Statement] = _section(
        3, "Tests whose results were not back at discharge."
    )
    follow_up: list[Statement] = _section(4, "Follow-up appointments and plan.")
    discharge_instructions: list[Statement] = _section(
        4, "Instructions given to the patient."
    )
    condition_at_discharge: list[Statement] = _section(
        1, "The patient's condition at discharge."
    )
    disposition: list[Statement] = _section(
        1, "Where the patient went: home, facility, deceased."
    )

    def statements(self) -> list[tuple[str, int, Statement]]:
        """Every statement with its section name and position in the section."""
        found = []
        for name in type(self).model_fields:
            for index, statement in enumerate(getattr(self, name)):
                found.append((name, index, statement))
        return found


def discharge_json_schema(note_ids: list[str]) -> dict[str, Any]:
    """The JSON schema that constrains decoding for one stay.

    Args:
        note_ids: Ids of the stay's notes; citations may only name these.

    Returns:
        DischargeSummary's schema with ``note_ids`` items narrowed to an enum,
        so the engine cannot emit a citation outside the stay.
    """
    schema = copy.deepcopy(_BASE_SCHEMA)
    citations = schema["$defs"]["Statement"]["properties"]["note_ids"]
    citations["items"] = {"enum": list(note_ids)}
    # A one-note stay cites that note once; repeats would only cost tokens.
    citations["maxItems"] = max(1, min(MAX_CITATIONS, len(note_ids)))
    # Every section is required when decoding, so the model considers each
    # one and writes [] where the chart says nothing.
    schema["required"] = list(schema["properties"])
    return schema


_BASE_SCHEMA = DischargeSummary.model_json_schema()
