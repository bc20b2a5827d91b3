"""A context calibration as data: the probe grid, its scores and its verdict.

Only scores, counts and positions are kept; never a probe's text or the
model's answer, because the haystack is made of clinical notes.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

# Defaults of `chartsum calibrate`. When one changes, update the command's
# help, README.md ("Effective context: calibration and routing") and
# docs/calibration.md.
#: Lowest band score at which a length still counts as usable.
DEFAULT_THRESHOLD = 0.85
#: Trials per (length, band, kind) cell in a full run; quick runs one.
DEFAULT_TRIALS = 3
QUICK_TRIALS = 1
#: Rungs below the top one; the top is the engine's maximum less the answer.
LADDER_TOKENS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
QUICK_LADDER_TOKENS = (256, 1024)
#: Kept free above the longest probe for its answer (the largest probe
#: budget is 100 tokens).
ANSWER_RESERVE_TOKENS = 128
DEFAULT_SEED = 1729
#: Haystacks in flight at once. CPU prefill is compute-bound, so more buys
#: little and makes each request wait longer (the engine's request timeout
#: applies to each).
DEFAULT_CONCURRENCY = 4


class ProbeKind(StrEnum):
    """What a probe asks the model to do."""

    #: Retrieve one planted fact, asked in the words of the note.
    SINGLE_FACT = "single_fact"
    #: List every planted fact of one kind (all medications started).
    COLLECT = "collect"
    #: Answer a question whose wording does not repeat the planted sentence.
    NON_LITERAL = "non_literal"


class DepthBand(StrEnum):
    """Where in the input the facts of a probe are planted."""

    START = "start"
    MIDDLE = "middle"
    END = "end"


#: Each band as (lowest, highest) fraction of the haystack before a fact.
#: The middle third is where long inputs lose facts first.
BAND_RANGES: dict[DepthBand, tuple[float, float]] = {
    DepthBand.START: (0.0, 0.10),
    DepthBand.MIDDLE: (1 / 3, 2 / 3),
    DepthBand.END: (0.90, 1.0),
}


class FingerprintParts(BaseModel):
    """Everything about the served model that changes what it can find."""

    #: Weights, config, tokenizer and chat template (``model_fingerprint``).
    model_fingerprint: str
    dtype: str
    max_model_len_tokens: int
    #: config.json's ``quantization_config`` as canonical JSON, or None.
    quantization: str | None = None
    #: config.json's ``rope_scaling`` as canonical JSON, or None.
    rope_scaling: str | None = None


class ProbeScore(BaseModel):
    """How one probe went: where its facts sat and what it scored."""

    length_tokens: int = Field(description="The ladder rung the probe was built for.")
    band: DepthBand
    kind: ProbeKind
    trial: int
    prompt_tokens: int = Field(description="Exact tokens of the rendered prompt.")
    depths: list[float] = Field(description="Depth of each planted fact, 0 to 1.")
    score: float = Field(ge=0.0, le=1.0)
    #: False when the answer was not JSON of the probe's schema (scores 0).
    parsed: bool
    finish_reason: str
    completion_tokens: int


class GridCell(BaseModel):
    """The mean score of every probe at one length and depth band."""

    length_tokens: int
    band: DepthBand
    score: float = Field(ge=0.0, le=1.0)
    probes: int
    by_kind: dict[ProbeKind, float]


class CalibrationResult(BaseModel):
    """One calibration run of one served model, with its full grid."""

    id: int | None = None
    fingerprint: str
    parts: FingerprintParts
    model_name: str
    mode: Literal["full", "quick", "custom"]
    threshold: float
    lengths_tokens: list[int]
    trials: int
    seed: int
    #: Longest tested length at which every band passed (None: none did).
    effective_tokens: int | None
    cells: list[GridCell]
    probes: list[ProbeScore]
    #: Where the haystack text came from, and a hash of exactly that text.
    corpus: str
    corpus_sha256: str
    #: Tokens of distinct haystack text; longer probes repeat paragraphs.
    corpus_tokens: int
    duration_s: float
    created_at: datetime

    def band_scores(self) -> dict[int, dict[DepthBand, float]]:
        """Score by length, then by depth band (the grid the rule reads)."""
        grid: dict[int, dict[DepthBand, float]] = {}
        for cell in self.cells:
            grid.setdefault(cell.length_tokens, {})[cell.band] = cell.score
        return grid

    def curve(self) -> dict[int, float]:
        """Mean score over every probe at each length, shortest first."""
        totals: dict[int, list[float]] = {}
        for probe in self.probes:
            totals.setdefault(probe.length_tokens, []).append(probe.score)
        return {
            length: sum(scores) / len(scores)
            for length, scores in sorted(totals.items())
        }
