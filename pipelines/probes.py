"""Context probes: real note text with synthetic facts planted at a depth.

A probe is a haystack of reshuffled note paragraphs, cut to an exact token
length, with one or more *needle* sentences planted in one depth band and a
question asked after it, in the chat template the workers use. Needle facts
(drug names, doses, lab values) are drawn by a seeded RNG from fixed lists,
so a probe is the same on every run, and answers are scored by exact rules.

Scoring rules (documented in docs/calibration.md too):

- Text is compared after NFKC, case folding and turning every run of
  characters other than letters and digits into one space.
- single_fact: 1 when the expected drug name appears as whole words in the
  answer (at most 60 characters, so a list of guesses does not fit), else 0.
- collect: the fraction of planted drugs found as whole words in some listed
  item. Extra items are not penalized: the notes may name real medications,
  and the schema caps the list at six items.
- non_literal: 1 when the number answered equals the planted value
  (numerically, to 0.005), else 0.
- An answer that is not JSON of the probe's schema scores 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.tokens import TokenCounter, neutralize_special_tokens
from schemas.calibration import BAND_RANGES, DepthBand, ProbeKind

PROBE_SYSTEM_PROMPT = """\
You answer questions about clinical notes.
Use only facts written in the notes. Never guess.
Answer with JSON only."""

#: Drugs a planted fact may name. Any that the corpus itself mentions is
#: dropped, so a correct answer can only come from a needle.
DRUGS = (
    "ticagrelor", "apixaban", "dapagliflozin", "empagliflozin", "sacubitril",
    "ivabradine", "rivaroxaban", "levetiracetam", "lacosamide", "fidaxomicin",
    "linezolid", "daptomycin", "micafungin", "posaconazole", "tacrolimus",
    "mycophenolate", "ondansetron", "pantoprazole", "rosuvastatin", "ezetimibe",
    "spironolactone", "eplerenone", "torsemide", "bumetanide", "amiodarone",
    "dofetilide", "clopidogrel", "prasugrel", "enoxaparin", "fondaparinux",
    "quetiapine", "olanzapine", "gabapentin", "pregabalin", "duloxetine",
    "sertraline", "mirtazapine", "allopurinol", "colchicine", "levothyroxine",
)  # fmt: skip
SURNAMES = (
    "Okafor", "Lindqvist", "Moreau", "Tanaka", "Brennan", "Castillo", "Haddad",
    "Novak", "Petrov", "Mensah", "Abernathy", "Iqbal", "Fischer", "Romero",
    "Yilmaz", "Kowalski", "Nakamura", "Osei", "Varga", "Quintero",
)  # fmt: skip
SPECIALTIES = (
    "cardiology", "nephrology", "infectious diseases", "neurology",
    "hematology", "endocrinology", "pulmonology", "gastroenterology",
)  # fmt: skip
DOSES_MG = (5, 10, 20, 25, 40, 50, 90, 100, 200, 250, 500)
FREQUENCIES = ("once daily", "twice daily", "every 8 hours", "at bedtime")

#: Planted facts per collect probe, and the most items its answer may list.
COLLECT_FACTS = 3
COLLECT_MAX_ITEMS = 6
#: Tokens kept free between the filler and the length, for tokens that merge
#: differently once the pieces are joined; the build retries if it overshoots.
SLACK_TOKENS = 8
#: Completion budget per probe kind (JSON with one short value or a list).
MAX_TOKENS = {
    ProbeKind.SINGLE_FACT: 40,
    ProbeKind.COLLECT: 100,
    ProbeKind.NON_LITERAL: 24,
}

_NORMALIZE = re.compile(r"[^0-9a-z]+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class ProbeCorpus:
    """Note paragraphs to build haystacks from, with their exact sizes.

    Build it with ``ProbeCorpus.from_texts``.
    """

    paragraphs: tuple[str, ...]
    paragraph_tokens: tuple[int, ...]
    #: Drugs the notes never mention, so a needle's drug is unambiguous.
    drugs: tuple[str, ...]
    #: Where the text came from ("examples", "database", ...).
    source: str
    sha256: str

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], *, tokens: TokenCounter, source: str
    ) -> ProbeCorpus:
        """Split note texts into paragraphs and measure each one.

        Special-token strings in the notes are broken up first, as in the
        workers' prompts.

        Raises:
            ValueError: The texts hold no paragraph, or name every drug in
                ``DRUGS``.
        """
        paragraphs: list[str] = []
        for text in texts:
            safe, _ = neutralize_special_tokens(text, tokens.special_tokens)
            paragraphs.extend(
                p.strip() for p in _PARAGRAPH_BREAK.split(safe) if p.strip()
            )
        if not paragraphs:
            raise ValueError("no note text to build calibration probes from")
        blob = "\n\n".join(paragraphs)
        lowered = blob.casefold()
        drugs = tuple(d for d in DRUGS if d not in lowered)
        if len(drugs) < COLLECT_FACTS + 1:
            raise ValueError("the notes name almost every probe drug")
        return cls(
            paragraphs=tuple(paragraphs),
            paragraph_tokens=tuple(len(tokens.encode(p)) for p in paragraphs),
            drugs=drugs,
            source=source,
            sha256=hashlib.sha256(blob.encode("utf-8")).hexdigest(),
        )


@dataclass(frozen=True)
class Facts:
    """What a probe plants and asks, and the answer that scores."""

    needles: tuple[str, ...]
    question: str
    #: Drug names (single_fact, collect) or one number (non_literal).
    expected: tuple[str, ...] | float
    json_schema: dict[str, Any]


@dataclass(frozen=True)
class Probe:
    """One tokenized probe, ready for the engine."""

    probe_id: str
    #: Probes with the same haystack id differ only in their question.
    haystack_id: str
    length_tokens: int
    band: DepthBand
    kind: ProbeKind
    trial: int
    token_ids: list[int]
    #: Fraction of the note text's tokens before each of its needles.
    depths: tuple[float, ...]
    expected: tuple[str, ...] | float
    json_schema: dict[str, Any]
    max_tokens: int


def build_probe_set(
    corpus: ProbeCorpus,
    *,
    tokens: TokenCounter,
    length_tokens: int,
    band: DepthBand,
    trial: int,
    seed: int,
    kinds: Sequence[ProbeKind] = tuple(ProbeKind),
) -> list[Probe]:
    """One haystack holding every kind's facts in ``band``, one probe per kind.

    The probes differ only in the question at the end, so the engine's
    prefix cache computes the haystack once if they run one after another.
    The other kinds' facts are distractors for each question. Each prompt
    is at most ``length_tokens`` long, and within a few dozen tokens of it.
    The same arguments always give the same probes: haystack order, fact
    values and depths all come from RNGs seeded with them.

    Args:
        corpus: The note paragraphs to fill with.
        tokens: The served model's tokenizer and chat template.
        length_tokens: Longest prompt allowed.
        band: Where the facts go.
        trial: Trial number within the cell (changes every random choice).
        seed: The calibration's base seed.
        kinds: The probe kinds to plant and ask.

    Raises:
        ValueError: The length cannot hold the questions and facts.
    """
    key = f"{seed}:{length_tokens}:{band}:{trial}"
    all_facts = _plant_all(kinds, random.Random(f"facts:{key}"), corpus.drugs)
    needles = [n for facts in all_facts for n in facts.needles]
    overhead = max(len(_render(tokens, "", f.question)) for f in all_facts)
    needle_tokens = sum(len(tokens.encode(n)) + 2 for n in needles)
    filler_tokens = length_tokens - overhead - needle_tokens - SLACK_TOKENS
    if filler_tokens < 4 * len(needles):
        raise ValueError(
            f"{length_tokens} tokens cannot hold a probe"
            f" ({overhead + needle_tokens} tokens before any note text)"
        )
    for _ in range(4):
        filler = _filler_lines(corpus, tokens, filler_tokens, random.Random(key))
        haystack, depths = _plant(
            filler, needles, band, tokens, random.Random(f"depth:{key}")
        )
        prompts = [_render(tokens, haystack, f.question) for f in all_facts]
        excess = max(len(ids) for ids in prompts) - length_tokens
        if excess <= 0:
            break
        filler_tokens -= excess + SLACK_TOKENS
    else:  # pragma: no cover - tokenizers merge a few tokens at most
        raise ValueError(f"could not fit a probe into {length_tokens} tokens")
    probes = []
    first = 0
    for kind, facts, token_ids in zip(kinds, all_facts, prompts, strict=True):
        count = len(facts.needles)
        probes.append(
            Probe(
                probe_id=f"cal-{length_tokens}-{band}-{trial}-{kind}",
                haystack_id=f"cal-{length_tokens}-{band}-{trial}",
                length_tokens=length_tokens,
                band=band,
                kind=kind,
                trial=trial,
                token_ids=token_ids,
                depths=depths[first : first + count],
                expected=facts.expected,
                json_schema=facts.json_schema,
                max_tokens=MAX_TOKENS[kind],
            )
        )
        first += count
    return probes


def _plant_all(
    kinds: Sequence[ProbeKind], rng: random.Random, drugs: Sequence[str]
) -> list[Facts]:
    """Facts for each kind, never naming one drug twice in a haystack."""
    found: list[Facts] = []
    free = list(drugs)
    for kind in kinds:
        facts = plant_facts(kind, rng, drugs=free)
        if isinstance(facts.expected, tuple):
            free = [d for d in free if d not in facts.expected]
        found.append(facts)
    return found


def plant_facts(kind: ProbeKind, rng: random.Random, *, drugs: Sequence[str]) -> Facts:
    """The needles, question, answer and answer schema of one probe."""
    if kind is ProbeKind.SINGLE_FACT:
        return _single_fact(rng, drugs)
    if kind is ProbeKind.COLLECT:
        return _collect(rng, drugs)
    return _non_literal(rng)


def score_answer(
    kind: ProbeKind, expected: tuple[str, ...] | float, text: str
) -> tuple[float, bool]:
    """Score a model's answer by the exact rules in this module's docstring.

    Returns:
        The score in [0, 1] and whether the answer parsed as the schema.
    """
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return 0.0, False
    if not isinstance(answer, dict):
        return 0.0, False
    if kind is ProbeKind.NON_LITERAL:
        value = answer.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return 0.0, False
        assert isinstance(expected, float)
        return float(math.isclose(value, expected, abs_tol=0.005)), True
    assert isinstance(expected, tuple)
    if kind is ProbeKind.SINGLE_FACT:
        found = answer.get("answer")
        if not isinstance(found, str):
            return 0.0, False
        return float(_contains_words(found, expected[0])), True
    items = answer.get("medications")
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return 0.0, False
    recalled = [e for e in expected if any(_contains_words(i, e) for i in items)]
    return len(recalled) / len(expected), True


def normalize_text(text: str) -> str:
    """Text as scoring compares it: folded case, words and digits only."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _NORMALIZE.sub(" ", folded).strip()


def _contains_words(text: str, expected: str) -> bool:
    return f" {normalize_text(expected)} " in f" {normalize_text(text)} "


def _single_fact(rng: random.Random, drugs: Sequence[str]) -> Facts:
    surname = rng.choice(SURNAMES)
    drug = rng.choice(drugs)
    needle = (
        f"Dr. {surname} of {rng.choice(SPECIALTIES)} recommended starting"
        f" {drug} {rng.choice(DOSES_MG)} mg {rng.choice(FREQUENCIES)}."
    )
    question = (
        f"Which medication did Dr. {surname} recommend starting? Answer with"
        " the medication name."
    )
    schema = _object_schema({"answer": {"type": "string", "maxLength": 60}})
    return Facts((needle,), question, (drug,), schema)


def _collect(rng: random.Random, drugs: Sequence[str]) -> Facts:
    chosen = rng.sample(list(drugs), COLLECT_FACTS)
    days = sorted(rng.sample(range(1, 9), COLLECT_FACTS))
    needles = tuple(
        f"Pharmacy reconciliation, hospital day {day}: {drug}"
        f" {rng.choice(DOSES_MG)} mg {rng.choice(FREQUENCIES)} was started."
        for day, drug in zip(days, chosen, strict=True)
    )
    question = (
        "Which medications do the pharmacy reconciliation entries say were"
        " started? List every medication name."
    )
    items = {"type": "string", "maxLength": 40}
    schema = _object_schema(
        {"medications": {"type": "array", "items": items, "maxItems": 6}}
    )
    return Facts(needles, question, tuple(chosen), schema)


def _non_literal(rng: random.Random) -> Facts:
    # The question never names the analyte or repeats the sentence: the model
    # has to know which value is the abnormal one.
    variant = rng.randrange(3)
    if variant == 0:
        value = round(rng.uniform(6.1, 7.0), 1)
        needle = (
            f"Chemistry at 05:40: Na {rng.randint(136, 142)} mmol/L, K {value}"
            f" mmol/L, Cl {rng.randint(98, 106)} mmol/L, HCO3"
            f" {rng.randint(22, 27)} mmol/L."
        )
    elif variant == 1:
        value = float(rng.randint(112, 124))
        needle = (
            f"Chemistry at 06:15: Na {value:.0f} mmol/L, K"
            f" {rng.uniform(3.6, 4.8):.1f} mmol/L, Cl {rng.randint(84, 92)}"
            f" mmol/L, HCO3 {rng.randint(22, 27)} mmol/L."
        )
    else:
        value = round(rng.uniform(6.0, 6.9), 1)
        needle = (
            f"CBC this morning: WBC {rng.uniform(5.0, 9.9):.1f} K/uL, Hgb"
            f" {value} g/dL, Plt {rng.randint(160, 380)} K/uL."
        )
    question = (
        "What was the value of the most dangerous laboratory abnormality?"
        " Answer with the number."
    )
    schema = _object_schema({"value": {"type": "number"}})
    return Facts((needle,), question, float(value), schema)


def _object_schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _render(tokens: TokenCounter, haystack: str, question: str) -> list[int]:
    user = f"Clinical notes:\n\n{haystack}\n\nQuestion: {question}"
    messages = [
        {"role": "system", "content": PROBE_SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]
    rendered = tokens.render_chat(messages, add_generation_prompt=True)
    return tokens.encode(rendered, allow_special=True)


def _filler_lines(
    corpus: ProbeCorpus, tokens: TokenCounter, budget: int, rng: random.Random
) -> list[str]:
    """Reshuffled paragraphs cut to ``budget`` tokens, as lines.

    When the corpus is shorter than the budget it is reshuffled and used
    again, so paragraphs repeat (never within one pass).
    """
    chosen: list[str] = []
    used = 0
    while used < budget:
        order = list(range(len(corpus.paragraphs)))
        rng.shuffle(order)
        for index in order:
            chosen.append(corpus.paragraphs[index])
            used += corpus.paragraph_tokens[index] + 2
            if used >= budget:
                break
    ids = tokens.encode("\n\n".join(chosen))[:budget]
    # Cutting mid-paragraph is fine: the filler is shuffled text anyway.
    return tokens.decode(ids).split("\n")


def _plant(
    lines: list[str],
    needles: Sequence[str],
    band: DepthBand,
    tokens: TokenCounter,
    rng: random.Random,
) -> tuple[str, tuple[float, ...]]:
    """Insert each needle as its own line at a line boundary inside ``band``.

    Needles go in random order at random depths in the band; when the band
    has fewer boundaries than needles, some share one (consecutive lines).

    Returns:
        The haystack text and each needle's depth, in the order given: the
        fraction of note-text tokens before it.
    """
    # Depth of every line boundary: boundary i comes before lines[i].
    before = [0]
    for line in lines:
        before.append(before[-1] + len(tokens.encode(line + "\n")))
    total = max(before[-1], 1)
    depths_at = [count / total for count in before]
    low, high = BAND_RANGES[band]
    inside = [i for i, d in enumerate(depths_at) if low <= d <= high]
    if not inside:  # pragma: no cover - the first and last boundary are 0 and 1
        inside = [min(range(len(depths_at)), key=lambda i: abs(depths_at[i] - low))]
    spots: list[int] = []
    for _ in needles:
        target = rng.uniform(low, high)
        free = [i for i in inside if i not in spots] or inside
        spots.append(min(free, key=lambda i: abs(depths_at[i] - target)))
    at: dict[int, list[str]] = {}
    for spot, needle in zip(spots, needles, strict=True):
        at.setdefault(spot, []).append(needle)
    out: list[str] = []
    for index in range(len(lines) + 1):
        out.extend(at.get(index, []))
        if index < len(lines):
            out.append(lines[index])
    return "\n".join(out), tuple(round(depths_at[i], 4) for i in spots)
