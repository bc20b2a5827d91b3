"""Reading stays: JSON lines in, validated records and precise errors out."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from schemas.stay import RecordId, StayRecord

# NUL and other C0/C1 control characters have no meaning in a note and
# PostgreSQL cannot store NUL; tab, newline and carriage return are kept.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: Bytes that are not UTF-8, as ``surrogateescape`` decoding keeps them.
_UNDECODED = re.compile("[\udc80-\udcff]")
_RECORD_ID: TypeAdapter[str] = TypeAdapter(RecordId)


@dataclass(frozen=True)
class LineError:
    """Why one input line was not loaded."""

    line: int
    field: str
    reason: str
    stay_id: str | None = None

    def __str__(self) -> str:
        where = f"line {self.line}"
        if self.stay_id:
            where += f" (stay {self.stay_id})"
        return f"{where}: {self.field}: {self.reason}"


@dataclass
class ParsedStays:
    """The good records of a file, and an error for each bad line."""

    stays: list[StayRecord] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    #: Control characters removed from note text, summed over the file.
    removed_control_chars: int = 0


@dataclass(frozen=True)
class ChartNote:
    """One note as the pipeline sees it."""

    note_id: str
    note_type: str | None
    charted_at: datetime | None
    text: str


@dataclass(frozen=True)
class Chart:
    """Everything recorded for one stay, loaded for summarizing."""

    stay_id: str
    patient_id: str
    content_sha256: str
    encounter_class: str | None
    reason_for_visit: str | None
    admit_time: datetime | None
    discharge_time: datetime | None
    record: dict[str, Any]
    notes: tuple[ChartNote, ...]

    @property
    def note_ids(self) -> list[str]:
        """Ids of the notes, in chart order."""
        return [note.note_id for note in self.notes]


def strip_control_chars(text: str) -> tuple[str, int]:
    """Remove NUL and other control characters, keeping tabs and line breaks.

    Returns:
        The cleaned text and how many characters were removed.
    """
    cleaned, removed = _CONTROL_CHARS.subn("", text)
    return cleaned, removed


def canonical_sha256(record: StayRecord) -> str:
    """A hash of the record that changes when, and only when, its content does."""
    payload = record.model_dump(mode="json", exclude_none=False)
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def parse_stay_lines(lines: Iterable[str]) -> ParsedStays:
    """Validate stay records, one JSON object per line.

    A bad line becomes a LineError (line number, field, reason) and never
    stops the good lines. A stay id seen twice in one input is an error on
    the later line, unless both lines are identical.

    Args:
        lines: Text lines, for example an open file.

    Returns:
        The parsed stays in input order and the errors.
    """
    parsed = ParsedStays()
    first_line: dict[str, tuple[int, str]] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        undecoded = _UNDECODED.search(raw)
        if undecoded is not None:
            byte = ord(undecoded.group()) - 0xDC00
            reason = (
                f"not UTF-8 (byte 0x{byte:02x} at column {undecoded.start() + 1});"
                " export the file as UTF-8"
            )
            parsed.errors.append(LineError(number, "<line>", reason))
            continue
        for record, error, removed in _parse_records(number, raw):
            parsed.removed_control_chars += removed
            if error is not None:
                parsed.errors.append(error)
                continue
            assert record is not None
            digest = canonical_sha256(record)
            seen = first_line.get(record.stay_id)
            if seen is not None:
                if seen[1] != digest:
                    parsed.errors.append(
                        LineError(
                            number,
                            "stay_id",
                            f"duplicate of line {seen[0]} with different content",
                            record.stay_id,
                        )
                    )
                continue
            first_line[record.stay_id] = (number, digest)
            parsed.stays.append(record)
    return parsed


def read_stays_file(path: Path) -> ParsedStays:
    """Parse a JSON-lines file of stays (see parse_stay_lines)."""
    # utf-8-sig: exports from Windows tools often begin with a byte-order mark.
    # surrogateescape: a line that is not UTF-8 (a latin-1 "µg") is
    # rejected with its position, not loaded with the character replaced.
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as lines:
        return parse_stay_lines(lines)


def stays_from_longitudinal(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Split a longitudinal record (all of a patient's notes) into stays.

    A ``record_kind: "longitudinal_record"`` line holds every note of one
    patient with an ``encounter_id`` each. Each encounter becomes one stay
    (its id is the encounter id) with its notes, the encounter's class,
    type, reason and times from ``encounters``, and the diagnoses,
    medications and procedures recorded in it. A note without an encounter
    id becomes a stay of its own, dated by the note. The stays are then
    validated like any other line.

    Args:
        record: The parsed JSON object of one longitudinal line.

    Returns:
        Stay records in the input format, in the order of their first note.
    """
    encounters = {
        e.get("encounter_id"): e
        for e in record.get("encounters") or []
        if isinstance(e, dict)
    }
    groups: dict[str, list[dict[str, Any]]] = {}
    for note in record.get("notes") or []:
        if not isinstance(note, dict):
            continue
        encounter_id = note.get("encounter_id")
        key = encounter_id or f"{record.get('stay_id')}:{note.get('note_id')}"
        groups.setdefault(str(key), []).append(note)
    stays = []
    for stay_id, notes in groups.items():
        encounter = encounters.get(stay_id) or {}
        first = notes[0]
        admit = encounter.get("start") or first.get("charted_at")
        stays.append(
            {
                "schema_version": record.get("schema_version", "1.0"),
                "stay_id": stay_id,
                "patient_id": record.get("patient_id"),
                "source": record.get("source"),
                "longitudinal_record_id": record.get("stay_id"),
                "encounter_class": encounter.get("encounter_class")
                or first.get("encounter_class"),
                "encounter_type": encounter.get("encounter_type")
                or first.get("encounter_type"),
                "reason_for_visit": encounter.get("reason_for_visit"),
                "admit_time": admit,
                "discharge_time": encounter.get("end") or notes[-1].get("charted_at"),
                "patient": _patient_at_stay(record.get("patient")),
                "notes": notes,
                "diagnoses": _in_encounter(record.get("diagnoses"), stay_id),
                "medications": _in_encounter(record.get("medications"), stay_id),
                "procedures": _in_encounter(record.get("procedures"), stay_id),
            }
        )
    return stays


def _in_encounter(items: Any, encounter_id: str) -> list[Any]:
    return [
        item
        for item in items or []
        if isinstance(item, dict) and item.get("encounter_id") == encounter_id
    ]


def _patient_at_stay(patient: Any) -> Any:
    # The record's age is at its first visit; it would be wrong for later
    # stays, so only the fixed facts are kept.
    if not isinstance(patient, dict):
        return patient
    return {k: patient.get(k) for k in ("sex", "birth_date", "deceased_at")}


def _parse_records(
    number: int, raw: str
) -> list[tuple[StayRecord | None, LineError | None, int]]:
    """One line's stays: one for a stay line, one per visit for a longitudinal one."""
    try:
        data = json.loads(raw.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON: {exc.msg} (column {exc.colno})"
        return [(None, LineError(number, "<line>", reason), 0)]
    if isinstance(data, dict) and data.get("record_kind") == "longitudinal_record":
        return [_parse_data(number, stay) for stay in stays_from_longitudinal(data)]
    return [_parse_data(number, data)]


def _parse_data(
    number: int, data: Any
) -> tuple[StayRecord | None, LineError | None, int]:
    if not isinstance(data, dict):
        return None, LineError(number, "<line>", "not a JSON object"), 0
    # Named in the error only when it looks like an id: a malformed one
    # could be anything, note text included.
    stay_id = data.get("stay_id")
    if not _is_record_id(stay_id):
        stay_id = None
    removed = _clean_notes(data)
    try:
        record = StayRecord.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "<record>"
        reason = first["msg"]
        if len(exc.errors()) > 1:
            reason += f" (and {len(exc.errors()) - 1} more)"
        return None, LineError(number, where, reason, stay_id), removed
    return record, None, removed


def _is_record_id(value: Any) -> bool:
    try:
        _RECORD_ID.validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


def _clean_notes(data: dict[str, Any]) -> int:
    """Strip control characters from every free-text value, in place.

    Ids are left alone so that the id pattern rejects them instead of two
    different ids silently becoming one.
    """
    removed = 0
    for key, value in data.items():
        if key == "id" or key.endswith("_id"):
            continue
        if isinstance(value, str):
            data[key], count = strip_control_chars(value)
            removed += count
        elif isinstance(value, dict):
            removed += _clean_notes(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    removed += _clean_notes(item)
    return removed


def iter_example_paths() -> Iterator[Path]:
    """The example stay files shipped inside the package."""
    folder = Path(__file__).resolve().parent.parent / "chartsum" / "examples"
    yield from sorted(folder.glob("*.jsonl"))
