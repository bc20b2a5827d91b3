"""All configuration, read once at process start and passed down.

Precedence: explicit arguments, then ``CHARTSUM_*`` environment variables
(nested with ``__``, e.g. ``CHARTSUM_DATABASE__URL``), then a ``.env`` file in
the working directory, then the defaults below. When a default changes,
update the table in README.md ("Configuration") too.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "chartsum"
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct-bf16"


def native_dtype(
    cpuinfo: Path = Path("/proc/cpuinfo"), devices: Path = Path("/dev")
) -> str:
    """The fastest safe weights dtype for an in-process engine here.

    bfloat16 where a GPU is present or the CPU computes in bfloat16
    natively; float32 on a CPU that would emulate it (AVX2-only x86, for
    example: 3.2x the tokens/s of bfloat16 on a 2-core AMD EPYC).
    """
    if any(devices.glob("nvidia[0-9]*")):
        return "bfloat16"
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "bfloat16"
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
            break
    if not flags or flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return "bfloat16"
    return "float32"


class EngineMode(StrEnum):
    """Where generation runs."""

    IN_PROCESS = "in_process"
    SERVER = "server"


class RedisSettings(BaseModel):
    """The Celery broker and result backend."""

    url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL used as Celery broker and result backend.",
    )
    visibility_timeout_s: int = Field(
        3600,
        description=(
            "Seconds before Redis redelivers an unacknowledged task; must exceed"
            " the longest job."
        ),
    )


class DatabaseSettings(BaseModel):
    """Where stays, jobs and summaries live."""

    url: SecretStr | None = Field(
        None,
        description=(
            "SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db. Unset means"
            " the embedded SQLite file in data_dir."
        ),
    )
    pool_size: int = Field(5, description="Connections kept per process.")


class VllmSettings(BaseModel):
    """The generation engine."""

    mode: EngineMode = Field(
        EngineMode.IN_PROCESS,
        description="in_process: vLLM inside the worker; server: an HTTP vLLM server.",
    )
    model_dir: Path | None = Field(
        None,
        description=(
            "Local HF-format model folder. Unset means the embedded SmolLM2 folder"
            " made by `chartsum model prepare`."
        ),
    )
    server_url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="OpenAI-compatible base URL, used when mode=server.",
    )
    server_api_key: SecretStr | None = Field(
        None, description="Bearer token for the vLLM server, if it wants one."
    )
    served_model_name: str | None = Field(
        None, description="Model name the server knows; defaults to model_dir."
    )
    max_model_len_tokens: int = Field(
        8192, description="Longest prompt plus completion the engine accepts."
    )
    kv_cache_bytes: int = Field(
        1 << 30,
        description=(
            "KV-cache size for the in-process engine (bytes). Set, never"
            " guessed: 1 GiB holds about 46k tokens of SmolLM2-135M."
        ),
    )
    admission_tokens: int | None = Field(
        None,
        description=(
            "Prompt plus completion tokens one worker keeps in flight. Unset:"
            " the in-process KV cache's capacity; no limit in server mode."
        ),
    )
    max_num_seqs: int = Field(
        32, description="Most sequences the in-process engine batches at once."
    )
    dtype: str = Field(
        "auto",
        validate_default=True,
        description=(
            "Weights dtype for in-process vLLM. 'auto': bfloat16 on a GPU or a"
            " CPU with native bfloat16 (AVX512-BF16 or AMX), float32 on other"
            " CPUs, where bfloat16 is emulated and about 3x slower."
        ),
    )
    cpu_threads_bind: str = Field(
        "all",
        description=(
            "CPU engines only: cores for vLLM's OpenMP threads. 'all': every"
            " core this process may run on; 'auto': vLLM's own choice, which"
            " keeps one core for its scheduler; or a list such as '0-7'."
            " VLLM_CPU_OMP_THREADS_BIND in the environment wins."
        ),
    )
    request_timeout_s: float = Field(
        600.0, description="Longest wait for one completion before giving up."
    )
    seed: int = Field(0, description="Sampling seed, for repeatable runs.")

    @field_validator("dtype")
    @classmethod
    def _resolve_auto_dtype(cls, value: str) -> str:
        # Settled once here, so the engine, the KV-cache sizing and the
        # benchmark's child processes all see the same concrete dtype.
        return native_dtype() if value == "auto" else value


class PipelineSettings(BaseModel):
    """How one job turns a chart into a summary."""

    max_completion_tokens: int = Field(
        1536, description="Completion budget for one summary."
    )
    max_generation_attempts: int = Field(
        3,
        description=(
            "Generations tried per job before it ends needs_review (cut off or"
            " invalid output)."
        ),
    )
    repetition_penalty: float = Field(
        1.05,
        description=(
            "Penalty on repeated tokens while generating summaries; small"
            " models loop without it (1.0 turns it off)."
        ),
    )
    chunk_completion_tokens: int = Field(
        320,
        description=(
            "Completion budget of one chunked-route request (one section);"
            " small, because CPU generation is slow and sections are short."
        ),
    )
    chunk_top_k: int = Field(
        4,
        ge=1,
        description=(
            "Chunks retrieved per section on the chunked route and for"
            " longitudinal summaries."
        ),
    )
    chunk_sources_per_request: int = Field(
        1,
        ge=1,
        description=(
            "Retrieved chunks quoted by one request; a section sends"
            " chunk_top_k / this many requests and merges their statements."
            " Small models do better on one short excerpt at a time; a model"
            " with a long effective context can take them all at once."
        ),
    )
    min_support_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Least share of statements supported by their cited notes"
            " (their facts and at least half their words appear there); a"
            " summary"
            " below it is stored but its job ends needs_review, listing the"
            " unsupported statements."
        ),
    )
    uncalibrated_context_tokens: int = Field(
        4096,
        description=(
            "Effective context assumed for a model with no calibration (tokens);"
            " never the advertised window."
        ),
    )
    worker_concurrency: int = Field(
        16,
        description=(
            "Jobs one worker keeps in flight; they share one engine, which"
            " batches them."
        ),
    )
    job_lease_s: int = Field(
        300,
        description=(
            "Seconds a running job's lease lasts; renewed every third of it while"
            " the job runs, so a dead worker's job moves on this long after it died."
        ),
    )


class OperationsSettings(BaseModel):
    """Delivery safety nets, backfills and Flower."""

    max_lost_deliveries: int = Field(
        3,
        description=(
            "Deliveries a job may lose (worker killed mid-job) before it is set"
            " aside as failed."
        ),
    )
    sweep_interval_s: int = Field(
        300, description="Seconds between sweeps for stuck jobs (Celery beat)."
    )
    queued_stale_s: int = Field(
        3600,
        description="A queued job untouched this long is sent again by the sweep.",
    )
    nightly_backfill_enabled: bool = Field(
        True, description="Run the nightly backfill from Celery beat."
    )
    nightly_backfill_hour_utc: int = Field(
        2, description="Hour (UTC) the nightly backfill starts."
    )
    nightly_backfill_days: int = Field(
        30,
        description=(
            "The nightly backfill covers stays discharged in this many past days."
        ),
    )
    backfill_rate_limit_per_s: float = Field(
        200.0, description="Most backfill jobs queued per second (0: no limit)."
    )
    flower_address: str = Field("127.0.0.1", description="Address Flower listens on.")
    flower_port: int = Field(5555, description="Port Flower listens on.")
    flower_basic_auth: SecretStr | None = Field(
        None,
        description=("user:password for Flower; required to listen beyond localhost."),
    )


class LoggingSettings(BaseModel):
    """structlog output."""

    level: str = Field("INFO", description="Lowest level written.")
    json_logs: bool | None = Field(
        None,
        description=(
            "JSON lines when true, console when false; unset: JSON unless"
            " stderr is a terminal."
        ),
    )


class Settings(BaseSettings):
    """chartsum's whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="CHARTSUM_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    data_dir: Path = Field(
        DEFAULT_DATA_DIR,
        description="Embedded SQLite file, prepared models and reports live here.",
    )
    redis: RedisSettings = RedisSettings()
    database: DatabaseSettings = DatabaseSettings()
    vllm: VllmSettings = VllmSettings()
    pipeline: PipelineSettings = PipelineSettings()
    operations: OperationsSettings = OperationsSettings()
    logging: LoggingSettings = LoggingSettings()

    @cached_property
    def database_url(self) -> str:
        """The SQLAlchemy URL in force: the configured one or the embedded SQLite."""
        if self.database.url is not None:
            return self.database.url.get_secret_value()
        return f"sqlite:///{self.data_dir / 'chartsum.db'}"

    @cached_property
    def model_dir(self) -> Path:
        """The local model folder in force: the configured one or the embedded one."""
        if self.vllm.model_dir is not None:
            return self.vllm.model_dir
        return self.data_dir / "models" / EMBEDDED_MODEL_NAME
