"""Checking that each summary statement is backed by the notes it cites.

A statement is *supported* when every checkable fact in it also appears in
the text of its cited notes (all cited notes together). Checkable facts:

- doses: a number with a unit (``500 mg``, ``0.4 mg/actuat``, ``35 units``,
  ``95%``). Spacing and case don't matter (``500mg`` = ``500 MG``); masses
  convert to mg and volumes to mL (``0.5 g`` = ``500 mg``), ``mcg``/``ug``/
  ``µg`` are one unit, and ``unit``/``units``/``IU`` another.
- dates: ISO (``2020-01-03``), US numeric (``01/03/2020``, ``1/3/20``:
  month first, as in US charts), and written (``January 3, 2020``,
  ``Jan 3 2020``, ``3 January 2020``) are the same date. A month and year
  (``August 2008``) is backed by any date in that month.
- numbers: any other number (``1,000`` = ``1000``, ``2.50`` = ``2.5``) must
  appear as a number somewhere in the cited text, including inside its
  doses and dates.
- medication names: names from the stay's structured medication list
  (ingredients and bracketed brands, without salt words such as
  "hydrochloride"), a fixed list of common drug names, and any word with a
  common drug-name suffix (``-pril``, ``-olol``, ``-statin``, ``-platin``...).
- diagnosis terms: the stay's coded diagnosis and condition displays, without
  their semantic tag (``Sepsis (disorder)`` is "sepsis"); a display with a
  comma also counts by its part before the comma.

Names and terms match as whole words after lower-casing and dropping
punctuation (``non-small cell`` = ``non small cell``).

Wording: besides its facts, a statement must be worded from its notes. At
least half of its content words (words of three letters or more that are
not English function words, counted once per Snowball stem, so
"started" = "starting") must appear in the cited text. This catches what
has no checkable fact: filler about the excerpt itself ("The details of
the excerpt are incomplete.") and invented narrative. A statement with no
checkable fact is judged on wording down to one word ("Foemma.",
"Cesarean section"); one with facts, from ``MIN_WORDING_WORDS`` content
words up ("Seen on 11/04/1986." rests on its date). A statement with
neither a fact nor a content word ("no", "N/A") says nothing a note could
back, and is unsupported too. Month names belong to dates, not wording.

Limits: this is a necessary check, not a sufficient one. It cannot see
negation ("no sepsis" passes when the note says "sepsis"), wrong relations
(a right dose given to the wrong drug, or a right date given to the wrong
event), numbers written as words, brand names not in the stay's list,
abbreviations of diagnoses, or facts of kinds not listed above. Numbers
match anywhere in the cited text, so a small number (``1``, ``2``) is rarely
caught. Day-first dates (``03/01/2020`` meaning 3 January) are read month
first. The wording test is lexical: a paraphrase in words the note does
not use fails it, and a false statement built from the note's own words
("no chest pain" from "chest pain") passes it.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import Stemmer

from pipelines.stays import Chart, ChartNote
from schemas.summary import DischargeSummary, Statement

FactKind = Literal["dose", "date", "number", "medication", "diagnosis", "words"]

#: Share of a statement's content words that its cited text must hold.
MIN_WORDING_SHARE = 0.5
#: A statement with checkable facts is judged on wording from this many
#: content words; one without facts always is.
MIN_WORDING_WORDS = 3

#: Word endings that mark a generic drug name. Checked on words of at least
#: 6 letters so that short common words ("april") stay out.
DRUG_SUFFIXES = (
    "azepam", "azolam", "azole", "barbital", "buterol", "caine", "cillin",
    "codone", "coxib", "cycline", "dipine", "dronate", "floxacin",
    "gliflozin", "gliptin", "glitazone", "lukast", "mab", "meterol",
    "morphone", "moterol", "mycin", "nib", "olol", "oxacin", "parin",
    "platin", "prazole", "pril", "profen", "sartan", "semide", "setron",
    "statin", "taxel", "thiazide", "tidine", "toin", "triptan", "vir",
)  # fmt: skip
#: Common drug names that no suffix above catches.
COMMON_DRUGS = frozenset(
    {
        "acetaminophen", "amiodarone", "aspirin", "clopidogrel", "digoxin",
        "furosemide", "gabapentin", "heparin", "insulin", "levothyroxine",
        "metformin", "methotrexate", "morphine", "prednisone", "warfarin",
    }
)  # fmt: skip
#: Words dropped from medication displays: salts and forms, not the drug.
_SALT_WORDS = frozenset(
    {
        "acetate", "besylate", "bitartrate", "calcium", "citrate",
        "hydrobromide", "hydrochloride", "hcl", "maleate", "mesylate",
        "phosphate", "potassium", "sodium", "succinate", "sulfate", "tartrate",
    }
)  # fmt: skip
#: Unit words that lead some displays ("24 HR Metformin...", "1 ML ...").
_DISPLAY_UNIT_WORDS = frozenset({"actuat", "hr", "meq", "mg", "ml", "unt"})
_SEMANTIC_TAG = re.compile(r"\s*\([^()]*\)\s*$")

_MONTHS = {
    name: number
    for number, names in enumerate(
        [
            ("jan", "january"), ("feb", "february"), ("mar", "march"),
            ("apr", "april"), ("may",), ("jun", "june"), ("jul", "july"),
            ("aug", "august"), ("sep", "sept", "september"),
            ("oct", "october"), ("nov", "november"), ("dec", "december"),
        ],
        start=1,
    )
    for name in names
}  # fmt: skip
_MONTH = "(?:" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
_UNIT = r"(?:mg|mcg|µg|ug|g|gm|grams?|kg|ml|cc|l|units?|unt|iu|meq|mmol|mmhg)"
_PER_UNIT = r"(?:ml|l|kg|dl|m2|hr|h|hour|day|min|actuat|dose)"
_DOSE = re.compile(
    rf"(?<![\w.])(?P<value>{_NUMBER})\s*"
    rf"(?:(?P<unit>{_UNIT}(?:/{_PER_UNIT})*)(?!\w)|(?P<percent>%))",
    re.IGNORECASE,
)
_DATE_PATTERNS = (
    re.compile(r"(?<!\d)(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})(?!\d)"),
    re.compile(r"(?<![\d/])(?P<m>\d{1,2})/(?P<d>\d{1,2})/(?P<y>\d{4}|\d{2})(?![\d/])"),
    re.compile(
        rf"\b(?P<mn>{_MONTH})\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<y>\d{{4}})\b",
        re.IGNORECASE,
    ),
    re.compile(
        rf"\b(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\s+(?P<mn>{_MONTH}),?\s+(?P<y>\d{{4}})\b",
        re.IGNORECASE,
    ),
    re.compile(rf"\b(?P<mn>{_MONTH}),?\s+(?P<y>\d{{4}})\b", re.IGNORECASE),
)
_NUMBER_TOKEN = re.compile(rf"(?<![\w.,]){_NUMBER}(?![\d])")
_WORD = re.compile(r"[^\W_]+")
_MASS_MG = {
    unit: Decimal(factor)
    for unit, factor in [
        ("mg", "1"), ("g", "1000"), ("gm", "1000"), ("gram", "1000"),
        ("grams", "1000"), ("kg", "1000000"), ("mcg", "0.001"),
    ]
}  # fmt: skip
_UNIT_ALIASES = {"µg": "mcg", "ug": "mcg", "cc": "ml", "units": "unit"}
_UNIT_ALIASES |= {"unt": "unit", "iu": "unit", "h": "hr"}


@dataclass(frozen=True)
class Fact:
    """One checkable item: its kind, its text as written, its normal form."""

    kind: FactKind
    text: str
    normal: str


@dataclass(frozen=True)
class Vocabulary:
    """Stay-specific names: medications and diagnosis terms, normalized."""

    medications: frozenset[str] = frozenset()
    diagnoses: frozenset[str] = frozenset()

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Vocabulary:
        """Names from a stay record's medications, diagnoses and conditions."""
        medications = {
            name
            for item in record.get("medications") or []
            for name in medication_names(item.get("display") or "")
        }
        conditions = [
            *(record.get("diagnoses") or []),
            *(record.get("active_conditions_at_admission") or []),
        ]
        diagnoses = {
            term
            for item in conditions
            for term in diagnosis_terms(item.get("display") or "")
        }
        return cls(frozenset(medications), frozenset(diagnoses))

    @classmethod
    def from_chart(cls, chart: Chart) -> Vocabulary:
        """Names from the structured items stored with a chart."""
        return cls.from_record(chart.record)


@dataclass(frozen=True)
class StatementSupport:
    """Whether one statement's facts all appear in its cited notes."""

    statement: Statement
    checked: tuple[Fact, ...]
    missing: tuple[Fact, ...]
    #: Cited note ids that were not among the notes given.
    unknown_note_ids: tuple[str, ...] = ()
    section: str | None = None
    index: int | None = None

    @property
    def supported(self) -> bool:
        """True when no fact is missing and every cited note was found."""
        return not self.missing and not self.unknown_note_ids


@dataclass(frozen=True)
class SummarySupport:
    """Support of every statement of a summary."""

    statements: list[StatementSupport] = field(default_factory=list)

    @property
    def support_rate(self) -> float:
        """Share of statements supported, 0.0 to 1.0 (1.0 with none)."""
        if not self.statements:
            return 1.0
        supported = sum(s.supported for s in self.statements)
        return supported / len(self.statements)

    @property
    def unsupported(self) -> list[StatementSupport]:
        """The statements with a missing fact or an unknown citation."""
        return [s for s in self.statements if not s.supported]


def normalize_text(text: str) -> str:
    """Lower-case words joined by single spaces, punctuation dropped."""
    return " ".join(word.lower() for word in _WORD.findall(text))


def medication_names(display: str) -> list[str]:
    """Drug names in a medication display, normalized.

    ``Naproxen sodium 220 MG Oral Tablet`` gives ``["naproxen"]``; each
    ingredient of a combination (split at `` / ``) and a bracketed brand
    (``[Tylenol]``) give one name each, and a name of several words also
    gives its first word (``fluticasone propionate``, ``fluticasone``).
    """
    names = [normalize_text(brand) for brand in re.findall(r"\[([^\]]+)\]", display)]
    for part in re.sub(r"\[[^\]]*\]", " ", display).split(" / "):
        words: list[str] = []
        for word in part.split():
            if any(char.isdigit() for char in word):
                if words:
                    break
                continue
            words.append(word)
        kept = [
            word
            for word in normalize_text(" ".join(words)).split()
            if word not in _SALT_WORDS and word not in _DISPLAY_UNIT_WORDS
        ]
        if kept:
            names.append(" ".join(kept))
        # "fluticasone propionate" is also written plain "fluticasone".
        if len(kept) > 1 and len(kept[0]) >= 5:
            names.append(kept[0])
    return [name for name in dict.fromkeys(names) if name]


def diagnosis_terms(display: str) -> list[str]:
    """Terms of a diagnosis display, normalized, without the semantic tag."""
    bare = _SEMANTIC_TAG.sub("", display)
    terms = [normalize_text(bare), normalize_text(bare.split(",")[0])]
    return [term for term in dict.fromkeys(terms) if term]


def extract_facts(text: str, *, vocabulary: Vocabulary = Vocabulary()) -> list[Fact]:
    """The checkable facts of a text, in order of kind then position."""
    facts: list[Fact] = []
    taken: list[tuple[int, int]] = []
    for start, end, normal in _dates(text):
        taken.append((start, end))
        facts.append(Fact("date", text[start:end], normal))
    for start, end, normal in _doses(text):
        if not _overlaps(start, end, taken):
            taken.append((start, end))
            facts.append(Fact("dose", text[start:end], normal))
    for match in _NUMBER_TOKEN.finditer(text):
        if not _overlaps(match.start(), match.end(), taken):
            facts.append(Fact("number", match.group(), _normal_number(match.group())))
    words = f" {normalize_text(text)} "
    for name in sorted(_medications_in(words, vocabulary)):
        facts.append(Fact("medication", name, name))
    for term in sorted(vocabulary.diagnoses):
        if f" {term} " in words:
            facts.append(Fact("diagnosis", term, term))
    return facts


def has_checkable_fact(text: str) -> bool:
    """Whether a text holds a dose, date, number or drug name.

    Without a stay's vocabulary: the drug names are the common ones and
    those with a drug-name suffix.
    """
    return bool(extract_facts(text))


def content_stems(text: str) -> dict[str, str]:
    """Content words of a text by their Snowball stem (stem -> first word).

    Content words are alphabetic, three letters or more, and not English
    function words (NLTK's list, as bm25s ships it).
    """
    function_words = _function_words()
    words = [
        word
        for word in normalize_text(text).split()
        if len(word) >= 3
        and word.isalpha()
        and word not in function_words
        and word not in _MONTHS
    ]
    stems: dict[str, str] = {}
    for word, stem in zip(words, _stemmer().stemWords(words), strict=True):
        stems.setdefault(stem, word)
    return stems


def wording_fact(stems: Mapping[str, str], evidence_stems: frozenset[str]) -> Fact:
    """The wording fact of a statement, from its ``content_stems``.

    Its ``text`` lists the content words the evidence lacks; its
    ``normal`` is ``found/total``. It is backed when at least
    ``MIN_WORDING_SHARE`` of the words are found, and never when there are
    none (``0/0``: the statement says nothing to find).
    """
    unfound = [word for stem, word in stems.items() if stem not in evidence_stems]
    found = len(stems) - len(unfound)
    return Fact("words", ", ".join(unfound), f"{found}/{len(stems)}")


def check_statement(
    statement: Statement,
    *,
    note_texts: Mapping[str, str],
    vocabulary: Vocabulary = Vocabulary(),
    section: str | None = None,
    index: int | None = None,
) -> StatementSupport:
    """Check one statement against the text of the notes it cites.

    Args:
        statement: The statement and its note ids.
        note_texts: Text of the stay's notes by note id.
        vocabulary: The stay's medication and diagnosis names.
        section: Section name, carried into the result.
        index: Position in the section, carried into the result.
    """
    unknown = tuple(i for i in statement.note_ids if i not in note_texts)
    cited = "\n".join(note_texts[i] for i in statement.note_ids if i in note_texts)
    facts = extract_facts(statement.text, vocabulary=vocabulary)
    evidence = _Evidence.of(cited)
    missing = [fact for fact in facts if not evidence.backs(fact)]
    stems = content_stems(statement.text)
    # A short statement of facts ("Seen on 2020-01-03.") rests on them.
    if not facts or len(stems) >= MIN_WORDING_WORDS:
        wording = wording_fact(stems, evidence.stems)
        facts.append(wording)
        if not evidence.backs(wording):
            missing.append(wording)
    return StatementSupport(
        statement,
        tuple(facts),
        tuple(missing),
        unknown,
        section=section,
        index=index,
    )


def evidence_text(note: ChartNote) -> str:
    """What a statement citing this note may rest on: its text, and the date
    it was charted (the prompt shows that date in the note's header).
    """
    if note.charted_at is None:
        return note.text
    return f"{note.charted_at:%Y-%m-%d}\n{note.text}"


def check_summary(
    summary: DischargeSummary,
    *,
    chart: Chart,
    vocabulary: Vocabulary | None = None,
) -> SummarySupport:
    """Check every statement of a summary against its chart's notes.

    Args:
        summary: The validated summary.
        chart: The stay it summarizes.
        vocabulary: Names to look for; by default from the chart's record.
    """
    vocabulary = vocabulary or Vocabulary.from_chart(chart)
    note_texts = {note.note_id: evidence_text(note) for note in chart.notes}
    return SummarySupport(
        [
            check_statement(
                statement,
                note_texts=note_texts,
                vocabulary=vocabulary,
                section=section,
                index=index,
            )
            for section, index, statement in summary.statements()
        ]
    )


@dataclass(frozen=True)
class _Evidence:
    words: str
    doses: frozenset[str]
    dates: frozenset[str]
    numbers: frozenset[str]
    stems: frozenset[str]

    @classmethod
    def of(cls, text: str) -> _Evidence:
        dates = set()
        for _, _, normal in _dates(text):
            dates.add(normal)
            # A full date also backs its month and its two-digit-year form.
            if len(normal) == 10 and not normal.startswith("??"):
                dates.update((normal[:7], "??" + normal[2:]))
        numbers = {_normal_number(m.group()) for m in _NUMBER_TOKEN.finditer(text)}
        # Digits inside dates and words ("2020-01-03", "x2") count as numbers too.
        numbers |= {str(int(d)) for d in re.findall(r"\d+", text)}
        return cls(
            words=f" {normalize_text(text)} ",
            doses=frozenset(normal for _, _, normal in _doses(text)),
            dates=frozenset(dates),
            numbers=frozenset(numbers),
            stems=frozenset(content_stems(text)),
        )

    def backs(self, fact: Fact) -> bool:
        if fact.kind == "words":
            found, total = (int(n) for n in fact.normal.split("/"))
            return total > 0 and found >= MIN_WORDING_SHARE * total
        if fact.kind == "dose":
            return fact.normal in self.doses
        if fact.kind == "date":
            return fact.normal in self.dates
        if fact.kind == "number":
            return fact.normal in self.numbers
        return f" {fact.normal} " in self.words


_local = threading.local()
#: Function words NLTK's list lacks; as content words they would count
#: against a faithful statement.
_MORE_FUNCTION_WORDS = frozenset(
    {
        "also", "although", "among", "could", "either", "however", "may",
        "might", "must", "neither", "per", "shall", "since", "though",
        "thus", "unless", "upon", "via", "whether", "within", "without",
        "would", "yet",
    }
)  # fmt: skip


@functools.cache
def _function_words() -> frozenset[str]:
    # Imported here, not at the top: importing bm25s loads numba and
    # llvmlite, which must stay out of a program's main module imports (see
    # pipelines.retrieval._words: vLLM's CPU worker then fails to start).
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    return frozenset(STOPWORDS_EN_PLUS) | _MORE_FUNCTION_WORDS


def _stemmer() -> Stemmer.Stemmer:
    # A PyStemmer object must not be shared between threads.
    stemmer: Stemmer.Stemmer | None = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = Stemmer.Stemmer("english")
    return stemmer


def _medications_in(words: str, vocabulary: Vocabulary) -> set[str]:
    found = {name for name in vocabulary.medications if f" {name} " in words}
    found |= {name for name in COMMON_DRUGS if f" {name} " in words}
    for word in words.split():
        if len(word) >= 6 and word.isalpha() and word.endswith(DRUG_SUFFIXES):
            found.add(word)
    # "naproxen" is implied by "naproxen sodium"; keep the longer name only.
    return {n for n in found if not any(n != o and f" {n} " in f" {o} " for o in found)}


def _doses(text: str) -> list[tuple[int, int, str]]:
    found = []
    for match in _DOSE.finditer(text):
        value = _decimal(match.group("value"))
        if value is None:
            continue
        unit = "%" if match.group("percent") else match.group("unit").lower()
        found.append((match.start(), match.end(), _normal_dose(value, unit)))
    return found


def _normal_dose(value: Decimal, unit: str) -> str:
    parts = [_UNIT_ALIASES.get(part, part) for part in unit.split("/")]
    head = parts[0]
    if head in _MASS_MG:
        value, head = value * _MASS_MG[head], "mg"
    elif head == "l":
        value, head = value * 1000, "ml"
    return f"{_plain(value)} {'/'.join([head, *parts[1:]])}"


def _dates(text: str) -> list[tuple[int, int, str]]:
    found: list[tuple[int, int, str]] = []
    for pattern in _DATE_PATTERNS:
        for match in pattern.finditer(text):
            normal = _normal_date(match.groupdict())
            if normal and not _overlaps(match.start(), match.end(), found):
                found.append((match.start(), match.end(), normal))
    return sorted(found)


def _normal_date(parts: dict[str, str | None]) -> str | None:
    month_name = parts.get("mn")
    month = (
        _MONTHS[month_name.lower().rstrip(".")] if month_name else int(parts["m"] or 0)
    )
    year_text = parts["y"] or ""
    day_text = parts.get("d")
    two_digit = len(year_text) == 2
    year = 2000 + int(year_text) if two_digit else int(year_text)
    try:
        if day_text is None:
            date(year, month, 1)
            return f"{year:04d}-{month:02d}"
        normal = date(year, month, int(day_text)).isoformat()
    except ValueError:
        return None
    # A two-digit year says nothing of the century.
    return "??" + normal[2:] if two_digit else normal


def _overlaps(
    start: int, end: int, spans: Iterable[tuple[int, int] | tuple[int, int, str]]
) -> bool:
    return any(start < span[1] and span[0] < end for span in spans)


def _decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _normal_number(text: str) -> str:
    value = _decimal(text)
    return text if value is None else _plain(value)
