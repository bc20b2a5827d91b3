"""The two engine-only phases: the batched ceiling and the naive baseline.

Both start their own engine with the settings ``InProcessEngine`` uses, send
the pipeline's own requests, and close the engine before returning, so no
two phases ever share the CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.rss import RssSampler
from benchmarks.stats import PhaseResult
from benchmarks.workload import StayRequest
from pipelines.engine import CompletionRequest, InProcessEngine, bind_cpu_threads
from schemas.settings import VllmSettings


def sampling_params(request: CompletionRequest) -> Any:
    """vLLM sampling settings for a request, as ``InProcessEngine`` builds them."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = None
    if request.json_schema is not None:
        structured = StructuredOutputsParams(
            json=request.json_schema, disable_any_whitespace=True
        )
    return SamplingParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        seed=request.seed,
        repetition_penalty=request.repetition_penalty,
        structured_outputs=structured,
    )


def run_offline_batch(
    work: Sequence[StayRequest],
    *,
    model_dir: Path,
    settings: VllmSettings,
    sampler: RssSampler,
) -> PhaseResult:
    """Phase 1, the ceiling: vLLM's offline engine given every request at once.

    This is what ``vllm.LLM.generate`` does (add every request, then step
    the engine until none is left), written out so each request's finish
    time is recorded.
    """
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    bind_cpu_threads(settings.cpu_threads_bind)
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(model_dir),
        tokenizer=str(model_dir),
        served_model_name=[str(model_dir)],
        dtype=settings.dtype,  # type: ignore[arg-type]
        max_model_len=settings.max_model_len_tokens,
        kv_cache_memory_bytes=settings.kv_cache_bytes,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=True,
        seed=settings.seed,
        disable_log_stats=True,
    )
    engine = llm.llm_engine
    sampler.sample()
    try:
        started = time.perf_counter()
        for item in work:
            engine.add_request(
                item.request.request_id,
                TokensPrompt(prompt_token_ids=item.request.prompt_token_ids),
                sampling_params(item.request),
            )
        latencies_ms: list[float] = []
        tokens = 0
        finish: dict[str, int] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    latencies_ms.append((time.perf_counter() - started) * 1000)
                    choice = output.outputs[0]  # type: ignore[index]
                    tokens += len(choice.token_ids)
                    reason = choice.finish_reason or "abort"
                    finish[reason] = finish.get(reason, 0) + 1
        wall_s = time.perf_counter() - started
        sampler.sample()
    finally:
        engine.engine_core.shutdown()
        del llm, engine
    return PhaseResult(
        name="1 engine alone (batched)",
        stays=len(latencies_ms),
        wall_s=wall_s,
        completion_tokens=tokens,
        latencies_ms=latencies_ms,
        notes=[f"finish reasons: {_counts(finish)}"],
    )


def run_batched_async(
    work: Sequence[StayRequest],
    *,
    model_dir: Path,
    settings: VllmSettings,
    sampler: RssSampler,
) -> PhaseResult:
    """Phase 1, the ceiling: the worker's engine given every request at once.

    ``InProcessEngine.complete_many`` submits all requests to vLLM's
    AsyncLLM together, so the engine batches as much as it can, with no
    Celery, Redis or database around it.
    """
    engine = InProcessEngine(model_dir=model_dir, settings=settings)
    sampler.sample()
    try:
        started = time.perf_counter()
        completions = engine.complete_many([item.request for item in work])
        wall_s = time.perf_counter() - started
        sampler.sample()
    finally:
        engine.close()
    finish: dict[str, int] = {}
    for completion in completions:
        finish[completion.finish_reason] = finish.get(completion.finish_reason, 0) + 1
    return PhaseResult(
        name="1 engine alone (batched)",
        stays=len(completions),
        wall_s=wall_s,
        completion_tokens=sum(c.completion_tokens for c in completions),
        # Every request started with the phase, so its own duration is its
        # latency from the phase's start.
        latencies_ms=[float(c.duration_ms) for c in completions],
        notes=[f"finish reasons: {_counts(finish)}"],
    )


def run_naive(
    work: Sequence[StayRequest],
    *,
    model_dir: Path,
    settings: VllmSettings,
    sampler: RssSampler,
) -> PhaseResult:
    """Phase 3, the naive baseline: the worker's engine, one request at a time."""
    engine = InProcessEngine(model_dir=model_dir, settings=settings)
    sampler.sample()
    try:
        started = time.perf_counter()
        latencies_ms: list[float] = []
        tokens = 0
        finish: dict[str, int] = {}
        for item in work:
            completion = engine.complete(item.request)
            latencies_ms.append((time.perf_counter() - started) * 1000)
            tokens += completion.completion_tokens
            reason = completion.finish_reason
            finish[reason] = finish.get(reason, 0) + 1
        wall_s = time.perf_counter() - started
        sampler.sample()
    finally:
        engine.close()
    return PhaseResult(
        name="3 naive (one at a time)",
        stays=len(latencies_ms),
        wall_s=wall_s,
        completion_tokens=tokens,
        latencies_ms=latencies_ms,
        notes=[f"finish reasons: {_counts(finish)}"],
    )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counts.items()))
