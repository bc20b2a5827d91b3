"""Admission by tokens: keep the engine batched without overrunning its KV cache.

Every request reserves its prompt plus its completion budget before it is
sent and releases them when it returns. Requests wait while the reserved
total would pass the capacity, so a worker with many threads keeps as many
jobs in flight as the KV cache holds, not as many as it has threads; a
request larger than the whole capacity is let through alone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from pipelines.engine import Completion, CompletionRequest, Engine

log = structlog.get_logger("chartsum.admission")

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def kv_cache_tokens(model_dir: Path, *, kv_cache_bytes: int, dtype: str) -> int:
    """How many tokens a KV cache of this size holds for this model.

    Reads layers, KV heads and head size from the model's config.json.
    """
    config = json.loads((model_dir / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = int(
        config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    )
    per_token_bytes = 2 * layers * heads * head_dim * _DTYPE_BYTES.get(dtype, 2)
    return kv_cache_bytes // per_token_bytes


class TokenGate:
    """A counting gate in tokens, shared by all threads of a process.

    Args:
        capacity_tokens: Tokens that may be reserved at once.
    """

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.reserved_tokens = 0
        self.in_flight = 0
        self._cond = threading.Condition()

    def acquire(self, tokens: int) -> float:
        """Reserve tokens, waiting while they do not fit; returns the wait (s)."""
        started = time.perf_counter()
        with self._cond:
            while (
                self.in_flight and self.reserved_tokens + tokens > self.capacity_tokens
            ):
                self._cond.wait()
            self.reserved_tokens += tokens
            self.in_flight += 1
        return time.perf_counter() - started

    def release(self, tokens: int) -> None:
        """Give reserved tokens back and wake waiting requests."""
        with self._cond:
            self.reserved_tokens -= tokens
            self.in_flight -= 1
            self._cond.notify_all()


class AdmittingEngine:
    """An engine wrapper that admits requests by tokens (see module doc).

    Args:
        engine: The engine requests go to.
        capacity_tokens: KV-cache tokens available to this process's requests.
    """

    def __init__(self, engine: Engine, *, capacity_tokens: int) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.gate = TokenGate(capacity_tokens)

    def complete(self, request: CompletionRequest) -> Completion:
        """Wait for room in the KV cache, then generate."""
        tokens = len(request.prompt_token_ids) + request.max_tokens
        waited_s = self.gate.acquire(tokens)
        if waited_s > 1.0:
            log.debug("admission_waited", waited_ms=int(waited_s * 1000), tokens=tokens)
        try:
            return self.engine.complete(request)
        finally:
            self.gate.release(tokens)

    def complete_many(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Generate several, each admitted on its own, concurrently."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(64, len(requests)))) as pool:
            return list(pool.map(self.complete, requests))

    def close(self) -> None:
        """Close the wrapped engine."""
        self.engine.close()
