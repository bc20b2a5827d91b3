"""Errors, grouped by what the caller should do about them.

    ChartsumError
    ├── RetryableError             try the job again later
    │   ├── EngineUnavailableError     the model engine cannot be reached
    │   │   └── EngineDeadError            the in-process engine died: restart
    │   └── StoreUnavailableError      the database cannot be reached
    └── PermanentError             retrying will not help; the job ends
        ├── StayNotFoundError          a job names a stay that is not stored
        ├── NeedsChunkedRouteError     the chart does not fit the effective context
        ├── CompletionInvalidError     the model never produced a valid summary
        ├── RetriesExhaustedError      a retryable failure outlasted every retry
        ├── InternalError              a bug in chartsum ended this one job
        └── ModelPrepareError          the embedded model cannot be made

Messages name what failed, the ids and limits involved, and what happens
next. They never quote note text.
"""

from __future__ import annotations


class ChartsumError(Exception):
    """Base class of every error chartsum raises on purpose."""


class RetryableError(ChartsumError):
    """A failure that may pass: the job is retried with backoff."""


class EngineUnavailableError(RetryableError):
    """The vLLM engine or server did not answer or answered with a server error."""


class EngineDeadError(EngineUnavailableError):
    """The in-process engine has died; only a new process gets a new one.

    The job is retried (on another worker, or on this one once restarted);
    the worker that saw it shuts down so its supervisor can restart it.
    """


class StoreUnavailableError(RetryableError):
    """The database refused a connection or a transaction could not commit."""


class PermanentError(ChartsumError):
    """A failure that retrying cannot fix: the job ends with this reason."""

    #: The job state this error leads to.
    job_state: str = "failed"
    #: The job's ``error_code``: short, stable, snake_case, for dashboards
    #: and integrations to match on.
    code: str = "permanent_error"


class StayNotFoundError(PermanentError):
    """A job names a stay or patient that the database does not hold."""

    code = "stay_not_found"


class NeedsChunkedRouteError(PermanentError):
    """The single-pass prompt plus completion budget exceeds the effective context."""

    code = "needs_chunked_route"


class CompletionInvalidError(PermanentError):
    """Every generation attempt was cut off or failed validation."""

    job_state = "needs_review"
    code = "completion_invalid"


class RetriesExhaustedError(PermanentError):
    """The engine or database kept failing until the job's last try."""

    code = "retries_exhausted"


class InternalError(PermanentError):
    """An unexpected exception (a bug, not a bad stay) ended the job.

    The message names the exception type only; its own message could quote
    the input. The traceback goes to the worker log.
    """

    code = "internal_error"


class ModelPrepareError(PermanentError):
    """The embedded model's source file is missing, altered, or cannot be converted."""

    code = "model_prepare_failed"
