"""A calibration end to end on the real vLLM engine, with a reduced ladder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.calibration import (
    CalibrationPlan,
    load_probe_corpus,
    run_calibration,
    served_model_parts,
)
from pipelines.calibration_report import write_report
from pipelines.calibration_store import CalibrationStore
from pipelines.engine import InProcessEngine
from pipelines.model import model_fingerprint
from pipelines.runtime import effective_context
from pipelines.store import ChartStore
from pipelines.tokens import TokenCounter
from schemas.calibration import DepthBand, ProbeKind
from schemas.settings import Settings, VllmSettings

pytestmark = pytest.mark.engine


@pytest.fixture
def engine(model_dir: Path) -> Iterator[InProcessEngine]:
    """The embedded model in an in-process engine, closed after the test."""
    engine = InProcessEngine(model_dir=model_dir, settings=VllmSettings())
    yield engine
    engine.close()


def test_a_reduced_calibration_runs_stores_routes_and_reports(
    engine: InProcessEngine,
    model_dir: Path,
    sqlite_store: ChartStore,
    tmp_path: Path,
) -> None:
    """512 and 1024 tokens, one trial: a full grid, stored, used, plotted."""
    # Given the embedded model, its tokenizer and the shipped example notes
    settings = Settings(data_dir=tmp_path, vllm=VllmSettings(model_dir=model_dir))
    tokens = TokenCounter.from_model_dir(model_dir)
    fingerprint = model_fingerprint(model_dir)
    parts = served_model_parts(
        model_dir=model_dir, vllm=settings.vllm, model_fingerprint=fingerprint
    )
    corpus = load_probe_corpus(None, tokens=tokens, top_tokens=1024)
    plan = CalibrationPlan((512, 1024), trials=1, threshold=0.85, seed=3, mode="custom")
    scored: list[object] = []

    # When the probes run through the engine and the result is stored
    result = run_calibration(
        engine=engine,
        tokens=tokens,
        corpus=corpus,
        plan=plan,
        parts=parts,
        concurrency=settings.vllm.max_num_seqs,
        on_scored=scored.append,
    )
    saved = CalibrationStore(sqlite_store).save(result)
    context = effective_context(settings, fingerprint, store=sqlite_store)
    _, png = write_report(saved, reports_dir=tmp_path / "reports")

    # Then every cell is there, scores are fractions, and routing uses it
    assert len(scored) == len(result.probes) == 2 * 3 * 3
    cells = {(c.length_tokens, c.band) for c in result.cells}
    assert cells == {(n, band) for n in (512, 1024) for band in DepthBand}
    assert all(0.0 <= p.score <= 1.0 for p in result.probes)
    assert all(p.prompt_tokens <= p.length_tokens for p in result.probes)
    assert {p.kind for p in result.probes} == set(ProbeKind)
    assert result.effective_tokens in (None, 512, 1024)
    found = CalibrationStore(sqlite_store).find(result.fingerprint)
    assert found is not None and found.id == saved.id
    assert found.cells == result.cells
    assert context.source == f"calibration {saved.id}"
    assert context.tokens == (result.effective_tokens or 0)
    assert png.is_file() and png.stat().st_size > 1000
