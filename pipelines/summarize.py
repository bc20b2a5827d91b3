"""Processing one job: chart in, validated summary stored, one log line out.

This is the whole of the work a Celery task (or the embedded runner) does;
it never imports Celery. Retryable failures propagate to the caller after
the job is handed back; permanent ones end the job with their reason.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from pipelines.engine import Completion, CompletionRequest, Engine
from pipelines.errors import (
    CompletionInvalidError,
    NeedsChunkedRouteError,
    PermanentError,
    RetryableError,
)
from pipelines.prompts import Prompt, build_discharge_prompt
from pipelines.routing import EffectiveContext, Route, RouteDecision, choose_route
from pipelines.stays import Chart
from pipelines.store import ChartStore, ClaimedJob, NewSummary
from pipelines.tokens import TokenCounter
from schemas.settings import Settings
from schemas.summary import SCHEMA_VERSION, DischargeSummary, discharge_json_schema
from schemas.tables import JobState, SummaryKind

log = structlog.get_logger("chartsum.job")


@dataclass(frozen=True)
class JobOutcome:
    """How one delivery of a job ended; ids and counts only."""

    job_id: str
    state: str
    stay_id: str | None = None
    route: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    duration_ms: int = 0
    error: str | None = None
    #: False when this delivery found the job already final or leased.
    ran: bool = True

    def as_result(self) -> dict[str, Any]:
        """A task result safe for Redis and Flower: no text, just ids and counts."""
        return {
            "job_id": self.job_id,
            "state": self.state,
            "route": self.route,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ran": self.ran,
        }


@dataclass(frozen=True)
class _Generated:
    summary: DischargeSummary
    completion: Completion


class Summarizer:
    """Everything one worker process needs to run jobs, built once.

    Args:
        settings: The process's settings.
        store: The database.
        engine: The generation engine, shared by all of this process's jobs.
        tokens: The served model's tokenizer (exact counts).
        model_fingerprint: Identity of the served weights and template.
        context: The effective context to route by.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: ChartStore,
        engine: Engine,
        tokens: TokenCounter,
        model_fingerprint: str,
        context: EffectiveContext,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.tokens = tokens
        self.model_fingerprint = model_fingerprint
        self.context = context

    def process_job(self, job_id: str) -> JobOutcome:
        """Run one job to a final state, or hand it back for a retry.

        Raises:
            RetryableError: The engine or database failed in a way that may
                pass; the job is back in the queue and the caller retries.
        """
        started = time.perf_counter()
        claim = self.store.claim_job(
            job_id,
            lease_s=self.settings.pipeline.job_lease_s,
            owner=uuid.uuid4().hex,
        )
        if claim is None:
            return self._not_claimed(job_id)
        structlog.contextvars.bind_contextvars(
            job_id=job_id, stay_id=claim.stay_id, attempt=claim.attempt
        )
        try:
            outcome = self._run(claim, started)
        except PermanentError as exc:
            outcome = self._end_permanently(claim, exc, started)
        except RetryableError as exc:
            self.store.release_job(job_id, owner=claim.lease_owner, error=str(exc))
            log.warning("job_released_for_retry", error=str(exc))
            raise
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "stay_id", "attempt")
        return outcome

    def explain_route(self, stay_id: str) -> tuple[Chart, Prompt, RouteDecision]:
        """The prompt and route a stay would get, without running the model."""
        chart = self.store.load_chart(stay_id)
        prompt = build_discharge_prompt(chart, tokens=self.tokens)
        decision = choose_route(
            prompt_tokens=prompt.tokens,
            completion_budget_tokens=self.settings.pipeline.max_completion_tokens,
            context=self.context,
        )
        return chart, prompt, decision

    def _run(self, claim: ClaimedJob, started: float) -> JobOutcome:
        if claim.kind != SummaryKind.DISCHARGE or claim.stay_id is None:
            raise PermanentError(
                f"job {claim.job_id}: kind {claim.kind} is not supported yet"
            )
        chart, prompt, decision = self.explain_route(claim.stay_id)
        self.store.record_route(
            claim.job_id,
            route=decision.route,
            prompt_tokens=decision.prompt_tokens,
            completion_budget_tokens=decision.completion_budget_tokens,
            effective_context_tokens=decision.context.tokens,
            context_source=decision.context.source,
        )
        log.debug(
            "route_chosen",
            route=decision.route,
            prompt_tokens=prompt.tokens,
            neutralized_tokens=prompt.neutralized_tokens,
        )
        if decision.route is not Route.SINGLE_PASS:
            raise NeedsChunkedRouteError(
                f"stay {chart.stay_id} needs the chunked route, which is not"
                f" available yet: {decision.explain()}"
            )
        generated = self._generate(claim, chart, prompt)
        total_ms = int((time.perf_counter() - started) * 1000)
        self.store.complete_job(
            NewSummary(
                job_id=claim.job_id,
                kind=SummaryKind.DISCHARGE,
                stay_id=chart.stay_id,
                patient_id=chart.patient_id,
                schema_version=SCHEMA_VERSION,
                payload=generated.summary.model_dump(mode="json"),
                model_name=self.engine.model_name,
                model_fingerprint=self.model_fingerprint,
                route=decision.route,
                prompt_tokens=generated.completion.prompt_tokens,
                completion_tokens=generated.completion.completion_tokens,
                input_sha256=chart.content_sha256,
                generation_ms=generated.completion.duration_ms,
                total_ms=total_ms,
            )
        )
        outcome = JobOutcome(
            job_id=claim.job_id,
            state=JobState.SUCCEEDED,
            stay_id=chart.stay_id,
            route=decision.route,
            prompt_tokens=generated.completion.prompt_tokens,
            completion_tokens=generated.completion.completion_tokens,
            duration_ms=total_ms,
        )
        self._log_outcome(outcome, claim)
        return outcome

    def _generate(self, claim: ClaimedJob, chart: Chart, prompt: Prompt) -> _Generated:
        budget = self.settings.pipeline.max_completion_tokens
        schema = discharge_json_schema(chart.note_ids)
        allowed = set(chart.note_ids)
        reasons: list[str] = []
        for attempt in range(1, self.settings.pipeline.max_generation_attempts + 1):
            self.store.count_generation_attempt(claim.job_id)
            completion = self.engine.complete(
                CompletionRequest(
                    request_id=f"{claim.job_id}-{claim.attempt}-{attempt}",
                    prompt_token_ids=prompt.token_ids,
                    max_tokens=budget,
                    json_schema=schema,
                    # Greedy first; later tries sample, or they would repeat
                    # the same invalid output.
                    temperature=0.0 if attempt == 1 else 0.7,
                    seed=self.settings.vllm.seed + attempt,
                )
            )
            if completion.finish_reason == "length":
                reasons.append(f"attempt {attempt}: cut off at {budget} tokens")
                log.warning("completion_cut_off", generation_attempt=attempt)
                continue
            try:
                summary = DischargeSummary.model_validate_json(
                    completion.text, context={"note_ids": allowed}
                )
            except ValidationError as exc:
                reasons.append(f"attempt {attempt}: {_describe(exc)}")
                log.warning("completion_invalid", generation_attempt=attempt)
                continue
            return _Generated(summary, completion)
        raise CompletionInvalidError(
            f"no valid summary after {len(reasons)} generation attempts: "
            + "; ".join(reasons)
        )

    def _end_permanently(
        self, claim: ClaimedJob, exc: PermanentError, started: float
    ) -> JobOutcome:
        state = JobState(exc.job_state)
        self.store.fail_job(
            claim.job_id, state=state, error_code=type(exc).__name__, error=str(exc)
        )
        job = self.store.get_job(claim.job_id)
        outcome = JobOutcome(
            job_id=claim.job_id,
            state=state,
            stay_id=claim.stay_id,
            route=job.route if job else None,
            prompt_tokens=job.prompt_tokens if job else None,
            duration_ms=int((time.perf_counter() - started) * 1000),
            error=str(exc),
        )
        self._log_outcome(outcome, claim, error_code=type(exc).__name__)
        return outcome

    def _not_claimed(self, job_id: str) -> JobOutcome:
        job = self.store.get_job(job_id)
        state = job.state if job is not None else "unknown"
        log.info("job_not_claimed", job_id=job_id, state=state)
        return JobOutcome(job_id=job_id, state=state, ran=False)

    def _log_outcome(
        self, outcome: JobOutcome, claim: ClaimedJob, **extra: Any
    ) -> None:
        log.info(
            "job_completed",
            outcome=outcome.state,
            route=outcome.route,
            duration_ms=outcome.duration_ms,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            model=self.engine.model_name,
            attempt=claim.attempt,
            **extra,
        )


def _describe(exc: ValidationError) -> str:
    # Locations and messages only: pydantic's str() would quote the input,
    # which is model output that may repeat note text.
    first = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "<root>"
    return f"{exc.error_count()} validation error(s), first at {where}: {first['msg']}"
