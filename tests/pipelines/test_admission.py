"""Admission by tokens: never more in flight than the KV cache holds."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.admission import AdmittingEngine, kv_cache_tokens
from pipelines.engine import CompletionRequest
from tests.helpers import ScriptedEngine


def test_the_kv_cache_capacity_follows_the_model_shape(model_dir: Path) -> None:
    """1 GiB of bf16 KV cache holds about 46k SmolLM2-135M tokens (vLLM: 46,592)."""
    tokens = kv_cache_tokens(model_dir, kv_cache_bytes=1 << 30, dtype="bfloat16")

    assert 46_000 <= tokens <= 47_000


def test_requests_wait_while_their_tokens_would_overrun_the_capacity() -> None:
    """With room for two requests at a time, at most two are ever in flight."""
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    def slow(_request: CompletionRequest) -> tuple[str, str]:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.05)
        with lock:
            in_flight -= 1
        return "{}", "stop"

    engine = AdmittingEngine(ScriptedEngine(slow), capacity_tokens=250)
    requests = [CompletionRequest(f"r{i}", [1] * 25, max_tokens=100) for i in range(8)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(engine.complete, requests))

    assert peak == 2
    assert engine.gate.reserved_tokens == 0 and engine.gate.in_flight == 0


def test_a_request_larger_than_the_capacity_runs_alone_instead_of_forever_waiting() -> (
    None
):
    """An oversized request is admitted once nothing else is in flight."""
    engine = AdmittingEngine(
        ScriptedEngine(lambda _r: ("{}", "stop")), capacity_tokens=10
    )

    completion = engine.complete(CompletionRequest("big", [1] * 50, max_tokens=50))

    assert completion.finish_reason == "stop"
