"""The in-process engine: dead engines fail fast, CPU threads are bound."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from pipelines.engine import CompletionRequest, InProcessEngine, bind_cpu_threads
from pipelines.errors import EngineDeadError
from schemas.settings import VllmSettings


@pytest.mark.engine
def test_killing_the_engine_core_makes_every_later_call_fail_fast(
    model_dir: Path,
) -> None:
    """After the engine-core process dies, calls raise EngineDeadError at once."""
    # Room for one 8192-token sequence in float32 (0.35 GiB), the dtype
    # `auto` picks on CPUs without native bfloat16.
    settings = VllmSettings(model_dir=model_dir, kv_cache_bytes=512 << 20)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = InProcessEngine(model_dir=model_dir, settings=settings)
    try:
        request = CompletionRequest("alive", [1, 2, 3, 4], max_tokens=4)
        assert engine.complete(request).completion_tokens > 0
        spawned = [
            p for p in psutil.Process().children(recursive=True) if p.pid not in before
        ]
        assert spawned, "the engine started no process of its own"
        for process in spawned:
            os.kill(process.pid, signal.SIGKILL)

        deadline = time.monotonic() + 60
        while not engine.dead and time.monotonic() < deadline:
            with pytest.raises(Exception) as raised:
                engine.complete(CompletionRequest("after", [1, 2, 3], max_tokens=4))
            if not isinstance(raised.value, EngineDeadError):
                time.sleep(1)
        assert engine.dead

        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="must restart"):
            engine.complete(CompletionRequest("later", [1, 2, 3], max_tokens=4))
        assert time.monotonic() - started < 1
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("choice", "env", "expected"),
    [
        ("all", {}, "*"),
        ("0-3", {}, "0-3"),
        ("auto", {}, None),
        ("all", {"VLLM_CPU_OMP_THREADS_BIND": "5"}, "5"),
    ],
)
def test_cpu_thread_binding_follows_the_setting_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
    choice: str,
    env: dict[str, str],
    expected: str | None,
) -> None:
    """'all' lists this process's cores; an operator's own variable wins."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    bind_cpu_threads(choice)

    if expected == "*":
        expected = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    assert os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == expected
