"""Reading stays: every bad line gets a precise error, good lines still load."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.stays import parse_stay_lines, read_stays_file
from tests.conftest import EXAMPLES, SHARED_DATA
from tests.helpers import stay_dict, stay_line


def test_the_shared_corpus_and_examples_load_without_errors() -> None:
    """Every stay of the developer corpus and the shipped examples is valid input."""
    corpus = read_stays_file(SHARED_DATA / "stays.jsonl")
    examples = read_stays_file(EXAMPLES)

    assert (len(corpus.stays), corpus.errors) == (33, [])
    assert len(examples.stays) == 6 and examples.errors == []


def test_malformed_json_is_reported_with_its_line_and_the_rest_loads() -> None:
    """A broken line names its number; the lines around it are still read."""
    lines = [stay_line("a"), '{"stay_id": "b", "notes": [', stay_line("c")]

    parsed = parse_stay_lines(lines)

    assert [s.stay_id for s in parsed.stays] == ["a", "c"]
    assert len(parsed.errors) == 1
    assert parsed.errors[0].line == 2
    assert "not valid JSON" in parsed.errors[0].reason


def test_a_stay_without_notes_is_rejected_naming_the_field() -> None:
    """An empty notes list fails on the notes field."""
    parsed = parse_stay_lines([stay_line("a", notes=[])])

    assert parsed.stays == []
    assert parsed.errors[0].field == "notes"
    assert parsed.errors[0].stay_id == "a"


def test_a_note_with_only_whitespace_is_rejected() -> None:
    """Blank note text is an error on that note."""
    record = stay_dict("a")
    record["notes"][0]["text"] = "  \n\t "

    parsed = parse_stay_lines([json.dumps(record)])

    assert parsed.stays == []
    assert parsed.errors[0].field.startswith("notes.0")
    assert "empty text" in parsed.errors[0].reason


def test_nul_bytes_and_control_characters_are_removed_and_counted() -> None:
    """NUL and other control characters go; tabs and line breaks stay."""
    record = stay_dict("a")
    record["notes"][0]["text"] = "Line one\x00\x07\tx\nLine two\x1b"
    record["reason_for_visit"] = "Cough\x00"

    parsed = parse_stay_lines([json.dumps(record)])

    assert parsed.errors == []
    assert parsed.stays[0].notes[0].text == "Line one\tx\nLine two"
    assert parsed.stays[0].reason_for_visit == "Cough"
    assert parsed.removed_control_chars == 4


def test_an_id_with_control_characters_is_rejected_not_cleaned() -> None:
    """Ids are never altered, so two ids can never silently become one."""
    parsed = parse_stay_lines([stay_line("a\x00b")])

    assert parsed.stays == []
    assert parsed.errors[0].field == "stay_id"
    assert "\x00" not in str(parsed.errors[0])


def test_a_malformed_stay_id_is_not_echoed_in_the_error() -> None:
    """It could be anything, a pasted note included: the error names the line."""
    pasted = "Pt_reports_chest_pain_radiating_to_left_arm_" * 10

    parsed = parse_stay_lines([stay_line(pasted)])

    [error] = parsed.errors
    assert (error.line, error.field, error.stay_id) == (1, "stay_id", None)
    assert "chest" not in str(error)


def test_a_line_that_is_not_utf8_is_rejected_with_the_byte_and_column(
    tmp_path: Path,
) -> None:
    """A latin-1 "µg" is not loaded as a replacement character; others load."""
    latin1 = json.dumps(stay_dict("b"), ensure_ascii=False).replace("500 mg", "500 µg")
    assert "µg" in latin1
    path = tmp_path / "stays.jsonl"
    path.write_bytes(
        f"{stay_line('a')}\n".encode()
        + f"{latin1}\n".encode("latin-1")
        + f"{stay_line('c')}\n".encode()
    )

    parsed = read_stays_file(path)

    assert [s.stay_id for s in parsed.stays] == ["a", "c"]
    [error] = parsed.errors
    column = latin1.index("µ") + 1
    assert error.line == 2
    assert error.reason == (
        f"not UTF-8 (byte 0xb5 at column {column}); export the file as UTF-8"
    )


def test_a_cut_off_line_names_the_column_where_json_broke() -> None:
    """The message reads plainly and points into the line, not past it."""
    parsed = parse_stay_lines(['{"stay_id": "abc\n'])

    [error] = parsed.errors
    assert error.reason == (
        "not valid JSON: Unterminated string starting at (column 13)"
    )


def test_duplicate_stay_ids_with_different_content_are_an_error() -> None:
    """The second, different copy of a stay id is rejected; an identical copy is not."""
    changed = stay_dict("a", reason_for_visit="Other")

    parsed = parse_stay_lines([stay_line("a"), stay_line("a"), json.dumps(changed)])

    assert len(parsed.stays) == 1
    assert [(e.line, e.field) for e in parsed.errors] == [(3, "stay_id")]
    assert "duplicate of line 1" in parsed.errors[0].reason


def test_duplicate_note_ids_inside_a_stay_are_an_error() -> None:
    """Two notes with one id would make citations ambiguous."""
    record = stay_dict("a")
    record["notes"].append(dict(record["notes"][0]))

    parsed = parse_stay_lines([json.dumps(record)])

    assert parsed.stays == []
    assert "appears twice" in parsed.errors[0].reason


def test_a_discharge_before_admission_is_rejected_without_the_dates() -> None:
    """Swapped timestamps are a broken export; the reason names the stay only."""
    parsed = parse_stay_lines(
        [
            stay_line("a", discharge_time="2019-12-31T10:00:00+00:00"),
            # One naive, one with an offset: compared as wall-clock times.
            stay_line("b", admit_time="2020-01-02", discharge_time="2020-01-01T09:00Z"),
            stay_line("c", admit_time="2020-01-01", discharge_time="2020-01-01T09:00Z"),
        ]
    )

    assert [s.stay_id for s in parsed.stays] == ["c"]
    assert [e.stay_id for e in parsed.errors] == ["a", "b"]
    assert "discharge_time before admit_time" in parsed.errors[0].reason
    assert "2019" not in parsed.errors[0].reason


def test_an_unknown_major_schema_version_is_rejected_and_1x_is_read() -> None:
    """1.x only adds optional fields; 2.0 could change what the fields mean."""
    parsed = parse_stay_lines(
        [
            stay_line("a", schema_version="2.0"),
            stay_line("b", schema_version="1.3"),
            stay_line("c", schema_version="1"),
        ]
    )

    assert [s.stay_id for s in parsed.stays] == ["b"]
    assert [(e.stay_id, e.field) for e in parsed.errors] == [
        ("a", "schema_version"),
        ("c", "schema_version"),
    ]
    assert "reads 1.x" in parsed.errors[0].reason


def test_unknown_fields_are_kept_and_do_not_fail_a_line() -> None:
    """Fields chartsum does not read are accepted and carried along."""
    parsed = parse_stay_lines([stay_line("a", ward="7B", provenance={"x": 1})])

    assert parsed.errors == []
    dumped = parsed.stays[0].model_dump()
    assert dumped["ward"] == "7B" and dumped["provenance"] == {"x": 1}


def test_a_line_that_is_not_an_object_is_rejected() -> None:
    """A JSON array or number is not a stay."""
    parsed = parse_stay_lines(["[1, 2]", "42"])

    assert [e.reason for e in parsed.errors] == ["not a JSON object"] * 2


def test_a_byte_order_mark_does_not_cost_the_first_stay(tmp_path: Path) -> None:
    """Files from Windows tools often start with a UTF-8 BOM."""
    path = tmp_path / "bom.jsonl"
    path.write_text(stay_line("a") + "\n" + stay_line("b") + "\n", encoding="utf-8-sig")

    parsed = read_stays_file(path)

    assert [s.stay_id for s in parsed.stays] == ["a", "b"]
    assert parsed.errors == []
