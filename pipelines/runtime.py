"""Building a process's long-lived parts from settings, once."""

from __future__ import annotations

from pathlib import Path

import structlog

from pipelines.admission import AdmittingEngine, kv_cache_tokens
from pipelines.calibration import calibration_fingerprint, served_model_parts
from pipelines.calibration_store import CalibrationStore
from pipelines.engine import Engine, open_engine
from pipelines.errors import ModelPrepareError
from pipelines.model import model_fingerprint
from pipelines.routing import EffectiveContext
from pipelines.store import ChartStore
from pipelines.summarize import Summarizer
from pipelines.tokens import TokenCounter
from schemas.settings import Settings

log = structlog.get_logger("chartsum.runtime")


def open_store(settings: Settings) -> ChartStore:
    """The database in force, migrated to the newest schema."""
    store = ChartStore(settings.database_url, pool_size=settings.database.pool_size)
    store.migrate()
    return store


def effective_context(
    settings: Settings, fingerprint: str, *, store: ChartStore | None = None
) -> EffectiveContext:
    """The context length to route by for the served model.

    The stored calibration of the served model's fingerprint (weights,
    template, dtype, max model length, quantization, rope scaling) decides.
    A calibration in which even the shortest length failed gives 0 tokens:
    nothing goes single-pass. Without a calibration this is the
    conservative default from settings, never the advertised window, and it
    is said loudly.

    Args:
        settings: The process's settings (engine and pipeline groups).
        fingerprint: ``model_fingerprint`` of the served model folder.
        store: Where calibrations are stored; None routes by the default.
    """
    parts = served_model_parts(
        model_dir=settings.model_dir, vllm=settings.vllm, model_fingerprint=fingerprint
    )
    key = calibration_fingerprint(parts)
    found = CalibrationStore(store).find(key) if store is not None else None
    if found is not None:
        if found.effective_tokens is None:
            log.warning(
                "model_failed_calibration",
                calibration_id=found.id,
                calibration_fingerprint=key[:16],
                shortest_tested_tokens=min(found.lengths_tokens),
            )
        return EffectiveContext(
            tokens=found.effective_tokens or 0, source=f"calibration {found.id}"
        )
    tokens = min(
        settings.pipeline.uncalibrated_context_tokens,
        settings.vllm.max_model_len_tokens,
    )
    log.warning(
        "model_not_calibrated",
        model_fingerprint=fingerprint[:16],
        calibration_fingerprint=key[:16],
        assumed_context_tokens=tokens,
        action="run `chartsum calibrate` with the settings the workers use",
    )
    return EffectiveContext(tokens=tokens, source="default")


def admit_by_tokens(engine: Engine, settings: Settings, model_dir: Path) -> Engine:
    """Wrap the engine so jobs are admitted by KV-cache tokens, not by count."""
    capacity = settings.vllm.admission_tokens
    if capacity is None and settings.vllm.mode == "in_process":
        capacity = kv_cache_tokens(
            model_dir,
            kv_cache_bytes=settings.vllm.kv_cache_bytes,
            dtype=settings.vllm.dtype,
        )
    if capacity is None:
        return engine
    log.info("admission_by_tokens", capacity_tokens=capacity)
    return AdmittingEngine(engine, capacity_tokens=capacity)


def require_model_dir(settings: Settings) -> Path:
    """The configured model folder, checked to hold a model.

    Raises:
        ModelPrepareError: The folder has no model; run
            `chartsum model prepare` or set CHARTSUM_VLLM__MODEL_DIR.
    """
    model_dir = settings.model_dir
    if not (model_dir / "config.json").is_file():
        raise ModelPrepareError(
            f"no model at {model_dir}; run `chartsum model prepare` or set"
            " CHARTSUM_VLLM__MODEL_DIR to a local model folder"
        )
    return model_dir


def build_summarizer(
    settings: Settings, *, store: ChartStore | None = None
) -> Summarizer:
    """Open the store, tokenizer and engine and tie them together.

    Raises:
        ModelPrepareError: The model folder is missing; run
            `chartsum model prepare` or set CHARTSUM_VLLM__MODEL_DIR.
    """
    model_dir = require_model_dir(settings)
    store = store or open_store(settings)
    tokens = TokenCounter.from_model_dir(model_dir)
    fingerprint = model_fingerprint(model_dir)
    context = effective_context(settings, fingerprint, store=store)
    engine = admit_by_tokens(
        open_engine(settings.vllm, model_dir=model_dir), settings, model_dir
    )
    log.info(
        "runtime_ready",
        mode=settings.vllm.mode,
        model_fingerprint=fingerprint[:16],
        effective_context_tokens=context.tokens,
    )
    return Summarizer(
        settings=settings,
        store=store,
        engine=engine,
        tokens=tokens,
        model_fingerprint=fingerprint,
        context=context,
    )
