"""structlog setup: JSON lines in production, a console view in development.

Standard-library loggers (Celery, vLLM, SQLAlchemy, httpx) are routed through
the same processors and quietened to WARNING. Nothing here ever logs note
text, prompts or completions; callers log ids, counts and hashes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from schemas.settings import LoggingSettings

#: Third-party loggers that chatter at INFO.
QUIET_LOGGERS = (
    "celery",
    "kombu",
    "amqp",
    "vllm",
    "httpx",
    "httpcore",
    "sqlalchemy",
    "alembic",
    "tornado",
    "urllib3",
    "transformers",
    "sentence_transformers",
    "bm25s",
)

#: Longest value a log line carries; anything longer is cut (it may be a repr
#: holding more than an id).
MAX_VALUE_CHARS = 120


def _truncate_values(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if (
            isinstance(value, str)
            and len(value) > MAX_VALUE_CHARS
            and key not in ("exception", "traceback")
        ):
            event[key] = value[:MAX_VALUE_CHARS] + "…"
    return event


def configure_logging(settings: LoggingSettings) -> None:
    """Set up structlog and the standard library once per process."""
    json_logs = settings.json_logs
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _truncate_values,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_logs
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    exceptions: Any = structlog.processors.format_exc_info if json_logs else _identity
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exceptions,
            renderer,
        ],
    )
    # Always stderr: stdout is for what a command prints (`chartsum jobs
    # --json`, `chartsum show --json`), which logs must not interleave.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _identity(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event
