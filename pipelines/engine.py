"""The generation engine behind one small interface, in two modes.

``InProcessEngine`` runs vLLM inside the worker process; ``ServerEngine``
talks to an OpenAI-compatible vLLM server. Both are thread-safe and
non-blocking towards each other: every worker thread that calls
``complete`` at the same time reaches the engine at the same time, so vLLM's
continuous batching sees all of them. Prompts travel as token ids, so the
count chartsum routes on is the count the engine sees.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from pipelines.errors import EngineDeadError, EngineUnavailableError, PermanentError
from schemas.settings import VllmSettings


class EngineRejectedError(PermanentError):
    """The engine refused a request as malformed (not a passing fault)."""

    code = "engine_rejected"


@dataclass(frozen=True)
class CompletionRequest:
    """One generation: a tokenized prompt and how to decode."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    json_schema: dict[str, Any] | None = None
    temperature: float = 0.0
    seed: int | None = None
    #: Above 1.0 discourages repeating tokens; small models loop without it.
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Completion:
    """What the engine returned for one request."""

    text: str
    #: "stop" when the model ended by itself, "length" when cut at max_tokens.
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    duration_ms: int


class Engine(Protocol):
    """What the pipeline needs from an engine."""

    model_name: str

    def complete(self, request: CompletionRequest) -> Completion:
        """Generate one completion; safe to call from many threads at once."""
        ...

    def complete_many(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Generate several completions concurrently, in request order."""
        ...

    def close(self) -> None:
        """Release the engine's processes and connections."""
        ...


@dataclass
class InProcessEngine:
    """vLLM's async engine inside this process, shared by all worker threads.

    The engine lives on its own event loop in a background thread; callers in
    any thread hand it coroutines and wait for their results.

    Args:
        model_dir: Local HF-format model folder.
        settings: Engine sizes (max model length, KV cache, batch size).
    """

    model_dir: Path
    settings: VllmSettings
    model_name: str = ""
    _loop: asyncio.AbstractEventLoop = field(init=False, repr=False)
    _thread: threading.Thread = field(init=False, repr=False)
    _llm: Any = field(init=False, repr=False, default=None)
    _dead: bool = field(init=False, repr=False, default=False)

    def __post_init__(self) -> None:
        self.model_name = self.model_name or str(self.model_dir)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-loop", daemon=True
        )
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self._llm = future.result()

    async def _start(self) -> Any:
        # vLLM reads these at import; quiet its per-step logs (they never
        # hold prompts, but they drown ours).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        bind_cpu_threads(self.settings.cpu_threads_bind)
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            served_model_name=[self.model_name],
            dtype=self.settings.dtype,  # type: ignore[arg-type]
            max_model_len=self.settings.max_model_len_tokens,
            kv_cache_memory_bytes=self.settings.kv_cache_bytes,
            max_num_seqs=self.settings.max_num_seqs,
            enforce_eager=True,
            seed=self.settings.seed,
            disable_log_stats=True,
            # Compact JSON under structured outputs: a small model otherwise
            # spends its budget on runs of newlines and indentation.
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            ),
        )
        return AsyncLLM.from_engine_args(args)

    @property
    def dead(self) -> bool:
        """Whether the engine has died (it never comes back in this process)."""
        return self._dead

    def complete(self, request: CompletionRequest) -> Completion:
        """Generate one completion (blocks this thread only)."""
        self._check_alive()
        future = asyncio.run_coroutine_threadsafe(self._generate(request), self._loop)
        return future.result(timeout=self.settings.request_timeout_s)

    def complete_many(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Submit all requests at once so the engine batches them."""
        self._check_alive()
        futures = [
            asyncio.run_coroutine_threadsafe(self._generate(r), self._loop)
            for r in requests
        ]
        return [f.result(timeout=self.settings.request_timeout_s) for f in futures]

    def _check_alive(self) -> None:
        if self._llm is not None and getattr(self._llm, "errored", False):
            self._dead = True
        if self._dead:
            raise EngineDeadError(
                "the in-process engine died earlier; this process must restart"
            )

    async def _generate(self, request: CompletionRequest) -> Completion:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        structured = None
        if request.json_schema is not None:
            structured = StructuredOutputsParams(
                json=request.json_schema, disable_any_whitespace=True
            )
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            repetition_penalty=request.repetition_penalty,
            structured_outputs=structured,
        )
        prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        started = time.perf_counter()
        final = None
        try:
            async for output in self._llm.generate(prompt, params, request.request_id):
                final = output
        except VllmEngineDead as exc:
            # The engine-core process is gone (killed, out of memory): every
            # later request would fail the same way.
            self._dead = True
            raise EngineDeadError(
                "the in-process engine died; this process must restart"
            ) from exc
        except ValueError as exc:
            # vLLM raises ValueError for prompts it refuses (too long, bad
            # schema); the message names limits, never prompt text.
            raise EngineRejectedError(f"engine refused the request: {exc}") from exc
        except Exception as exc:
            raise EngineUnavailableError(
                f"in-process engine failed ({type(exc).__name__}); retrying"
            ) from exc
        assert final is not None
        choice = final.outputs[0]
        return Completion(
            text=choice.text,
            finish_reason=choice.finish_reason or "abort",
            prompt_tokens=len(final.prompt_token_ids or request.prompt_token_ids),
            completion_tokens=len(choice.token_ids),
            duration_ms=int((time.perf_counter() - started) * 1000),
        )

    def close(self) -> None:
        """Stop the engine's processes and the loop thread."""
        if self._llm is not None:
            # vLLM's output handler logs the engine core's exit as an
            # EngineDeadError traceback; at a shutdown we asked for, it is not.
            logging.getLogger("vllm.v1.engine.async_llm").setLevel(logging.CRITICAL)
            self._llm.shutdown()
            self._llm = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class ServerEngine:
    """An OpenAI-compatible vLLM server, reached over HTTP.

    Args:
        settings: Server URL, key, model name and timeout.
        max_connections: Requests kept in flight at once; match the worker's
            concurrency so every job thread reaches the server together.
    """

    def __init__(self, settings: VllmSettings, *, max_connections: int = 64) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name or str(settings.model_dir or "")
        headers = {}
        if settings.server_api_key is not None:
            key = settings.server_api_key.get_secret_value()
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            base_url=settings.server_url.rstrip("/") + "/",
            headers=headers,
            timeout=settings.request_timeout_s,
            limits=httpx.Limits(max_connections=max_connections),
        )

    def complete(self, request: CompletionRequest) -> Completion:
        """POST one completion request and wait for it (blocks this thread only)."""
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": request.prompt_token_ids,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "repetition_penalty": request.repetition_penalty,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.json_schema is not None:
            body["structured_outputs"] = {
                "json": request.json_schema,
                "disable_any_whitespace": True,
            }
        started = time.perf_counter()
        try:
            response = self._client.post("completions", json=body)
        except httpx.TransportError as exc:
            raise EngineUnavailableError(
                f"vLLM server at {self.settings.server_url} unreachable"
                f" ({type(exc).__name__}); retrying"
            ) from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise EngineUnavailableError(
                f"vLLM server answered {response.status_code}; retrying"
            )
        if response.status_code >= 400:
            raise EngineRejectedError(
                f"vLLM server refused the request ({response.status_code}):"
                f" {response.text[:200]}"
            )
        data = response.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Completion(
            text=choice["text"],
            finish_reason=choice.get("finish_reason") or "abort",
            prompt_tokens=int(
                usage.get("prompt_tokens", len(request.prompt_token_ids))
            ),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            duration_ms=int((time.perf_counter() - started) * 1000),
        )

    def complete_many(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Send every request at once from a thread pool, so the server batches."""
        with ThreadPoolExecutor(max_workers=max(1, len(requests))) as pool:
            return list(pool.map(self.complete, requests))

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()


def bind_cpu_threads(choice: str) -> None:
    """Tell vLLM's CPU backend which cores its OpenMP threads use.

    vLLM's default ("auto") keeps one core for its scheduler process; on a
    small machine that is half of it. "all" gives every core this process
    may use to the model (on 2 cores: 1.5x the batched completion tokens/s
    of "auto", see docs/benchmark.md). An operator's own
    VLLM_CPU_OMP_THREADS_BIND is left alone. GPU builds ignore both.
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or choice == "auto":
        return
    if choice == "all":
        cores = sorted(os.sched_getaffinity(0))
        choice = ",".join(str(core) for core in cores)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = choice
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def open_engine(settings: VllmSettings, *, model_dir: Path) -> Engine:
    """The engine the settings ask for.

    Args:
        settings: ``mode`` picks in-process vLLM or an HTTP server.
        model_dir: The local model folder (in-process) or the one whose
            tokenizer matches the server's model.
    """
    if settings.mode == "server":
        return ServerEngine(settings)
    return InProcessEngine(model_dir=model_dir, settings=settings)
