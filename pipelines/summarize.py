"""Processing one job: chart in, validated summary stored, one log line out.

This is the whole of the work a Celery task (or the embedded runner) does;
it never imports Celery. Retryable failures propagate to the caller after
the job is handed back; permanent ones end the job with their reason.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from pipelines.chunked import say_each_once, shared_embedder, summarize_chart_chunked
from pipelines.engine import Completion, CompletionRequest, Engine
from pipelines.errors import (
    CompletionInvalidError,
    EngineDeadError,
    InternalError,
    PermanentError,
    RetriesExhaustedError,
    RetryableError,
    StoreUnavailableError,
)
from pipelines.longitudinal import check_longitudinal, summarize_patient
from pipelines.prompts import Prompt, build_discharge_prompt
from pipelines.retrieval import Embedder
from pipelines.routing import EffectiveContext, Route, RouteDecision, choose_route
from pipelines.stays import Chart
from pipelines.store import ChartStore, ClaimedJob, NewSummary
from pipelines.support import SummarySupport, check_summary
from pipelines.tokens import TokenCounter
from schemas.longitudinal import SCHEMA_VERSION as LONGITUDINAL_SCHEMA_VERSION
from schemas.settings import Settings
from schemas.summary import SCHEMA_VERSION, DischargeSummary, discharge_json_schema
from schemas.tables import JobState, SummaryKind

log = structlog.get_logger("chartsum.job")

#: Lease renewals per lease: a lease survives two failed renewals in a row
#: (a short database outage) before it runs out.
RENEWALS_PER_LEASE = 3

#: Called at each stage of a job with the stage name and ids/counts only;
#: the Celery task turns it into a task state operators see on Flower.
ProgressCallback = Callable[[str, dict[str, Any]], None]


def _no_progress(_stage: str, _meta: dict[str, Any]) -> None:
    return None


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
    #: False when this delivery found the job already final or leased, at
    #: its claim or (its lease lost) at its final write.
    ran: bool = True
    #: Share of statements supported by their cited notes, when stored.
    support_rate: float | None = None

    def as_result(self) -> dict[str, Any]:
        """A task result safe for Redis and Flower: no text, just ids and counts."""
        return {
            "job_id": self.job_id,
            "state": self.state,
            "route": self.route,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "support_rate": self.support_rate,
            "ran": self.ran,
        }


@dataclass(frozen=True)
class _Generated:
    summary: DischargeSummary
    completion: Completion


@dataclass(frozen=True)
class _Made:
    """A validated, checked summary of either kind, ready to store."""

    kind: SummaryKind
    stay_id: str | None
    patient_id: str
    schema_version: str
    payload: dict[str, Any]
    route: str
    prompt_tokens: int
    completion_tokens: int
    generation_ms: int
    input_sha256: str
    support: SummarySupport
    #: Optional sections of the chunked route that never validated.
    failed_sections: list[str]


class LeaseRenewer:
    """Keeps the leases of a process's running jobs from running out.

    One thread renews every held lease each ``interval_s``. It starts with
    the first held job and ends once none is held, so an idle process (or
    one that forks after building its Summarizer, as Celery's prefork pool
    does) has no thread to lose.

    Args:
        store: The database.
        lease_s: Seconds each renewal extends a lease by, from now.
        interval_s: Seconds between renewals; None means a third of
            ``lease_s`` (see RENEWALS_PER_LEASE).
    """

    def __init__(
        self, store: ChartStore, *, lease_s: int, interval_s: float | None = None
    ) -> None:
        self.store = store
        self.lease_s = lease_s
        self.interval_s = (
            lease_s / RENEWALS_PER_LEASE if interval_s is None else interval_s
        )
        # Lease owner by job id; guarded by _changed, like the fields below.
        self._held: dict[str, str] = {}
        self._renewing: str | None = None
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()

    def hold(self, claim: ClaimedJob) -> None:
        """Renew this job's lease until it is dropped."""
        with self._changed:
            self._held[claim.job_id] = claim.lease_owner
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._renew_until_idle,
                    name="chartsum-lease-renewer",
                    daemon=True,
                )
                self._thread.start()

    def drop(self, claim: ClaimedJob) -> None:
        """Stop renewing this job's lease (safe to repeat).

        Returns once no renewal of the job is in flight, so a final write
        made after it cannot be followed by a renewal that reports the
        ended job's lease as lost.
        """
        with self._changed:
            # A later delivery of the same job in this process holds it
            # under another owner: leave that one be.
            if self._held.get(claim.job_id) == claim.lease_owner:
                del self._held[claim.job_id]
            self._changed.notify_all()
            while self._renewing == claim.job_id:
                self._changed.wait()

    def held_job_ids(self) -> list[str]:
        """The jobs whose leases are being renewed."""
        with self._changed:
            return list(self._held)

    def _renew_until_idle(self) -> None:
        due_at = time.monotonic() + self.interval_s
        while True:
            with self._changed:
                while self._held and (wait_s := due_at - time.monotonic()) > 0:
                    self._changed.wait(wait_s)
                if not self._held:
                    self._thread = None
                    return
                due = list(self._held.items())
            due_at = time.monotonic() + self.interval_s
            for job_id, owner in due:
                self._renew(job_id, owner)

    def _renew(self, job_id: str, owner: str) -> None:
        with self._changed:
            if self._held.get(job_id) != owner:
                return  # dropped since this round began
            self._renewing = job_id
        lost = False
        try:
            lost = not self._renew_lease(job_id, owner)
        finally:
            with self._changed:
                self._renewing = None
                if lost:
                    self._held.pop(job_id, None)
                self._changed.notify_all()

    def _renew_lease(self, job_id: str, owner: str) -> bool:
        """Renew one lease; False only when it is known to be lost."""
        try:
            held = self.store.renew_lease(job_id, owner=owner, lease_s=self.lease_s)
        except StoreUnavailableError as exc:
            # The lease outlasts two more ticks: the database may be back.
            log.warning(
                "job_lease_renewal_failed",
                job_id=job_id,
                error=str(exc),
                next_try_s=round(self.interval_s, 1),
            )
            return True
        except Exception as exc:
            # This thread is the boundary for renewals: a bug here must not
            # stop the renewal of other jobs, nor end the worker. Frames
            # only, as at the task boundary.
            log.error(
                "job_lease_renewal_crashed",
                job_id=job_id,
                error_type=type(exc).__name__,
                traceback="".join(traceback.format_tb(exc.__traceback__)),
            )
            return True
        if not held:
            # Another delivery took the job over, or an operator ended it;
            # this delivery's final write will be refused.
            log.warning("job_lease_lost", job_id=job_id)
        return held


class Summarizer:
    """Everything one worker process needs to run jobs, built once.

    Args:
        settings: The process's settings.
        store: The database.
        engine: The generation engine, shared by all of this process's jobs.
        tokens: The served model's tokenizer (exact counts).
        model_fingerprint: Identity of the served weights and template.
        context: The effective context to route by.
        embedder: Returns the dense retrieval model for the chunked route;
            the default loads MiniLM once per process on first use. A
            function returning None ranks by BM25 alone.
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
        embedder: Callable[[], Embedder | None] = shared_embedder,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.tokens = tokens
        self.model_fingerprint = model_fingerprint
        self.context = context
        self.embedder = embedder
        self.leases = LeaseRenewer(store, lease_s=settings.pipeline.job_lease_s)

    def process_job(
        self,
        job_id: str,
        *,
        on_progress: ProgressCallback = _no_progress,
        last_try: bool = False,
    ) -> JobOutcome:
        """Run one job to a final state, or hand it back for a retry.

        Every write that ends the job names this delivery's lease, so a
        delivery that lost its lease to another one never ends the job
        under it: not with a summary, a permanent error, the last retry or
        a crash.

        Args:
            job_id: The job to run.
            on_progress: Told each stage (claimed, routed, generating,
                storing) with ids and counts.
            last_try: This is the job's last delivery: a retryable failure
                ends it as ``retries_exhausted`` instead of handing it back.

        Raises:
            RetryableError: The engine or database failed in a way that may
                pass; the job is back in the queue and the caller retries.
                On the last try the job is ended instead, and only two
                errors are raised: EngineDeadError (so the worker still
                restarts) and StoreUnavailableError when the database failed
                the final write too (the job's lease runs out and the sweeper
                sends it again).
        """
        started = time.perf_counter()
        claim = self.store.claim_job(
            job_id,
            lease_s=self.settings.pipeline.job_lease_s,
            owner=uuid.uuid4().hex,
            max_lost_deliveries=self.settings.operations.max_lost_deliveries,
        )
        if claim is None:
            return self._not_claimed(job_id)
        structlog.contextvars.bind_contextvars(
            job_id=job_id, stay_id=claim.stay_id, attempt=claim.attempt
        )
        # Renewed until the final write; each final write drops it first.
        self.leases.hold(claim)
        try:
            on_progress("claimed", {"attempt": claim.attempt})
            outcome = self._run(claim, started, on_progress)
        except PermanentError as exc:
            outcome = self._end_permanently(claim, exc, started)
        except RetryableError as exc:
            self.leases.drop(claim)
            if not last_try:
                self.store.release_job(job_id, owner=claim.lease_owner, error=str(exc))
                log.warning("job_released_for_retry", error=str(exc))
                raise
            log.error("job_retries_exhausted", error=str(exc))
            gave_up = RetriesExhaustedError(
                f"gave up after {claim.attempt} tries: {exc}"
            )
            try:
                outcome = self._end_permanently(claim, gave_up, started)
            except RetryableError:
                if isinstance(exc, EngineDeadError):
                    raise exc from None  # the worker must still restart
                raise
            if isinstance(exc, EngineDeadError):
                raise
        except Exception as exc:
            # A bug, not a bad stay: end this job, keep the worker and the
            # rest of the queue going.
            outcome = self._end_permanently(claim, crash_error(exc, job_id), started)
        finally:
            self.leases.drop(claim)
            structlog.contextvars.unbind_contextvars("job_id", "stay_id", "attempt")
        return outcome

    def explain_route(
        self, stay_id: str, *, stage_ms: dict[str, float] | None = None
    ) -> tuple[Chart, Prompt, RouteDecision]:
        """The prompt and route a stay would get, without running the model.

        Args:
            stay_id: The stay to route.
            stage_ms: When given, gets the milliseconds spent on
                ``chart_load``, ``tokenize`` and ``route``.
        """
        stages: dict[str, float] = {} if stage_ms is None else stage_ms
        lap = time.perf_counter()
        chart = self.store.load_chart(stay_id)
        lap = _lap(stages, "chart_load", lap)
        prompt = build_discharge_prompt(chart, tokens=self.tokens)
        lap = _lap(stages, "tokenize", lap)
        decision = choose_route(
            prompt_tokens=prompt.tokens,
            completion_budget_tokens=self.settings.pipeline.max_completion_tokens,
            context=self.context,
        )
        _lap(stages, "route", lap)
        return chart, prompt, decision

    def _run(
        self, claim: ClaimedJob, started: float, on_progress: ProgressCallback
    ) -> JobOutcome:
        # Where a job's time goes, logged on its canonical line (ms per stage).
        stage_ms: dict[str, float] = {}
        _lap(stage_ms, "claim", started)
        if claim.kind == SummaryKind.LONGITUDINAL and claim.patient_id is not None:
            made = self._make_longitudinal(
                claim, claim.patient_id, on_progress, stage_ms
            )
        elif claim.kind == SummaryKind.DISCHARGE and claim.stay_id is not None:
            made = self._make_discharge(claim, claim.stay_id, on_progress, stage_ms)
        else:
            raise PermanentError(
                f"job {claim.job_id}: kind {claim.kind} needs a"
                f" {'patient' if claim.kind == SummaryKind.LONGITUDINAL else 'stay'}"
                " id; the job was created incomplete"
            )
        on_progress(
            "storing",
            {
                "route": made.route,
                "prompt_tokens": made.prompt_tokens,
                "completion_tokens": made.completion_tokens,
            },
        )
        total_ms = int((time.perf_counter() - started) * 1000)
        lap = time.perf_counter()
        state = self._store_summary(claim, made, total_ms)
        _lap(stage_ms, "write", lap)
        if state is None:
            return self._lease_lost(claim, "summary", total_ms)
        outcome = JobOutcome(
            job_id=claim.job_id,
            state=state,
            stay_id=made.stay_id,
            route=made.route,
            prompt_tokens=made.prompt_tokens,
            completion_tokens=made.completion_tokens,
            duration_ms=total_ms,
            support_rate=made.support.support_rate,
        )
        self._log_outcome(
            outcome,
            claim,
            stage_ms=stage_ms,
            support_rate=round(made.support.support_rate, 3),
        )
        return outcome

    def _make_discharge(
        self,
        claim: ClaimedJob,
        stay_id: str,
        on_progress: ProgressCallback,
        stage_ms: dict[str, float],
    ) -> _Made:
        chart, prompt, decision = self.explain_route(stay_id, stage_ms=stage_ms)
        lap = time.perf_counter()
        self.store.record_route(
            claim.job_id,
            route=decision.route,
            prompt_tokens=decision.prompt_tokens,
            completion_budget_tokens=decision.completion_budget_tokens,
            effective_context_tokens=decision.context.tokens,
            context_source=decision.context.source,
        )
        _lap(stage_ms, "write", lap)
        log.debug(
            "route_chosen",
            route=decision.route,
            prompt_tokens=prompt.tokens,
            neutralized_tokens=prompt.neutralized_tokens,
        )
        on_progress(
            "generating",
            {"route": decision.route, "prompt_tokens": decision.prompt_tokens},
        )
        failed: list[str] = []
        if decision.route is Route.SINGLE_PASS:
            generated = self._generate(claim, chart, prompt, stage_ms=stage_ms)
            summary, completion = generated.summary, generated.completion
            counts = (
                completion.prompt_tokens,
                completion.completion_tokens,
                completion.duration_ms,
            )
        else:
            lap = time.perf_counter()
            chunked = summarize_chart_chunked(
                chart,
                engine=self.engine,
                counter=self.tokens,
                embedder=self.embedder(),
                context_tokens=self.context.tokens,
                settings=self.settings.pipeline,
                seed=self.settings.vllm.seed,
                request_prefix=f"{claim.job_id}-{claim.attempt}",
                on_round=lambda: self.store.count_generation_attempt(claim.job_id),
            )
            _lap(stage_ms, "engine", lap)
            summary, failed = chunked.summary, chunked.failed_sections
            totals = chunked.totals
            counts = (
                totals.prompt_tokens,
                totals.completion_tokens,
                totals.duration_ms,
            )
        lap = time.perf_counter()
        support = check_summary(summary, chart=chart)
        _lap(stage_ms, "validate", lap)
        return _Made(
            kind=SummaryKind.DISCHARGE,
            stay_id=chart.stay_id,
            patient_id=chart.patient_id,
            schema_version=SCHEMA_VERSION,
            payload=summary.model_dump(mode="json"),
            route=decision.route,
            prompt_tokens=counts[0],
            completion_tokens=counts[1],
            generation_ms=counts[2],
            input_sha256=chart.content_sha256,
            support=support,
            failed_sections=failed,
        )

    def _make_longitudinal(
        self,
        claim: ClaimedJob,
        patient_id: str,
        on_progress: ProgressCallback,
        stage_ms: dict[str, float],
    ) -> _Made:
        lap = time.perf_counter()
        charts = self.store.load_patient_charts(patient_id)
        reused = self.store.current_discharge_summaries(charts)
        lap = _lap(stage_ms, "chart_load", lap)
        # What one pass would have to read: every note of the stays that
        # have no summary to reuse.
        record_tokens = sum(
            self.tokens.count(note.text)
            for chart in charts
            if chart.stay_id not in reused
            for note in chart.notes
        )
        lap = _lap(stage_ms, "tokenize", lap)
        self.store.record_route(
            claim.job_id,
            route=Route.CHUNKED,
            prompt_tokens=record_tokens,
            completion_budget_tokens=self.settings.pipeline.chunk_completion_tokens,
            effective_context_tokens=self.context.tokens,
            context_source=self.context.source,
        )
        lap = _lap(stage_ms, "write", lap)
        log.debug(
            "longitudinal_sources",
            stays=len(charts),
            reused_summaries=len(reused),
            record_tokens=record_tokens,
        )
        on_progress(
            "generating", {"route": Route.CHUNKED, "prompt_tokens": record_tokens}
        )
        result = summarize_patient(
            charts,
            reused=reused,
            engine=self.engine,
            counter=self.tokens,
            embedder=self.embedder(),
            context_tokens=self.context.tokens,
            settings=self.settings.pipeline,
            seed=self.settings.vllm.seed,
            request_prefix=f"{claim.job_id}-{claim.attempt}",
            on_round=lambda: self.store.count_generation_attempt(claim.job_id),
        )
        lap = _lap(stage_ms, "engine", lap)
        support = check_longitudinal(result.summary, charts=charts)
        _lap(stage_ms, "validate", lap)
        digest = hashlib.sha256(
            "\n".join(c.content_sha256 for c in charts).encode()
        ).hexdigest()
        return _Made(
            kind=SummaryKind.LONGITUDINAL,
            stay_id=None,
            patient_id=patient_id,
            schema_version=LONGITUDINAL_SCHEMA_VERSION,
            payload=result.summary.model_dump(mode="json"),
            route=Route.CHUNKED,
            prompt_tokens=result.totals.prompt_tokens,
            completion_tokens=result.totals.completion_tokens,
            generation_ms=result.totals.duration_ms,
            input_sha256=digest,
            support=support,
            failed_sections=result.failed_sections,
        )

    def _store_summary(
        self, claim: ClaimedJob, made: _Made, total_ms: int
    ) -> JobState | None:
        """Store the summary; a low support rate or a failed section flags it.

        A flagged summary is stored all the same, so a clinician can review
        it; the job ends needs_review and its error names the unsupported
        statements by position (never their text).

        Returns:
            The job's final state, or None when nothing was stored because
            this delivery no longer holds the job's lease.
        """
        min_rate = self.settings.pipeline.min_support_rate
        summary = NewSummary(
            job_id=claim.job_id,
            kind=made.kind,
            stay_id=made.stay_id,
            patient_id=made.patient_id,
            schema_version=made.schema_version,
            payload=made.payload,
            model_name=self.engine.model_name,
            model_fingerprint=self.model_fingerprint,
            route=made.route,
            prompt_tokens=made.prompt_tokens,
            completion_tokens=made.completion_tokens,
            input_sha256=made.input_sha256,
            generation_ms=made.generation_ms,
            total_ms=total_ms,
            support_rate=made.support.support_rate,
            support=support_record(made.support, min_rate=min_rate),
        )
        reasons = review_reasons(
            made.support, min_rate=min_rate, failed_sections=made.failed_sections
        )
        self.leases.drop(claim)
        if not reasons:
            stored = self.store.complete_job(summary, owner=claim.lease_owner)
            return JobState.SUCCEEDED if stored else None
        code = "low_support" if made.support.support_rate < min_rate else "incomplete"
        stored = self.store.complete_job_for_review(
            summary,
            error_code=code,
            error="; ".join(reasons),
            owner=claim.lease_owner,
        )
        if not stored:
            return None
        log.info(
            "summary_needs_review",
            error_code=code,
            unsupported_statements=len(made.support.unsupported),
            failed_sections=len(made.failed_sections),
        )
        return JobState.NEEDS_REVIEW

    def _generate(
        self,
        claim: ClaimedJob,
        chart: Chart,
        prompt: Prompt,
        *,
        stage_ms: dict[str, float],
    ) -> _Generated:
        budget = self.settings.pipeline.max_completion_tokens
        schema = discharge_json_schema(list(prompt.aliases))
        allowed = set(chart.note_ids)
        reasons: list[str] = []
        for attempt in range(1, self.settings.pipeline.max_generation_attempts + 1):
            lap = time.perf_counter()
            self.store.count_generation_attempt(claim.job_id)
            lap = _lap(stage_ms, "write", lap)
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
                    repetition_penalty=self.settings.pipeline.repetition_penalty,
                )
            )
            lap = _lap(stage_ms, "engine", lap)
            if completion.finish_reason == "length":
                reasons.append(f"attempt {attempt}: cut off at {budget} tokens")
                log.warning("completion_cut_off", generation_attempt=attempt)
                continue
            try:
                summary = DischargeSummary.model_validate(
                    resolve_aliases(json.loads(completion.text), prompt.aliases),
                    context={"note_ids": allowed},
                )
            except json.JSONDecodeError as exc:
                reasons.append(f"attempt {attempt}: not JSON ({exc.msg})")
                log.warning("completion_invalid", generation_attempt=attempt)
                continue
            except ValidationError as exc:
                reasons.append(f"attempt {attempt}: {_describe(exc)}")
                log.warning("completion_invalid", generation_attempt=attempt)
                continue
            finally:
                _lap(stage_ms, "validate", lap)
            sections = {
                name: getattr(summary, name) for name in DischargeSummary.model_fields
            }
            return _Generated(
                summary.model_copy(update=say_each_once(sections)), completion
            )
        raise CompletionInvalidError(
            f"no valid summary after {len(reasons)} generation attempts: "
            + "; ".join(reasons)
        )

    def _end_permanently(
        self, claim: ClaimedJob, exc: PermanentError, started: float
    ) -> JobOutcome:
        state = JobState(exc.job_state)
        self.leases.drop(claim)
        ended = self.store.fail_job(
            claim.job_id,
            state=state,
            error_code=exc.code,
            error=str(exc),
            owner=claim.lease_owner,
        )
        if not ended:
            duration_ms = int((time.perf_counter() - started) * 1000)
            return self._lease_lost(claim, "failure", duration_ms)
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
        self._log_outcome(outcome, claim, error_code=exc.code)
        return outcome

    def _lease_lost(
        self, claim: ClaimedJob, result: str, duration_ms: int
    ) -> JobOutcome:
        """The outcome of a delivery whose final write was refused.

        Another delivery took the job over (or an operator ended it) after
        this one's lease was lost; the job row keeps that outcome.
        """
        job = self.store.get_job(claim.job_id)
        state = job.state if job is not None else "unknown"
        log.warning("job_result_discarded", result=result, state=state)
        outcome = JobOutcome(
            job_id=claim.job_id,
            state=state,
            stay_id=claim.stay_id,
            duration_ms=duration_ms,
            error="lease lost before the final write; nothing was written",
            ran=False,
        )
        self._log_outcome(outcome, claim, lease_lost=True)
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


def crash_error(exc: Exception, job_id: str) -> InternalError:
    """Log a job's unexpected exception and give the error that ends the job.

    The log gets the exception type and its frames; neither it nor the job
    row gets the exception's message, which could quote patient text.
    """
    log.error(
        "job_crashed",
        error_type=type(exc).__name__,
        traceback="".join(traceback.format_tb(exc.__traceback__)),
    )
    return InternalError(
        f"internal error ({type(exc).__name__}); see the worker log for job {job_id}"
    )


def support_record(support: SummarySupport, *, min_rate: float) -> dict[str, Any]:
    """Per-statement support as stored with the summary (JSON)."""
    return {
        "rate": support.support_rate,
        "min_rate": min_rate,
        "statements": [
            {
                "section": item.section,
                "index": item.index,
                "supported": item.supported,
                "missing": [
                    {"kind": fact.kind, "text": fact.text} for fact in item.missing
                ],
                "unknown_note_ids": list(item.unknown_note_ids),
            }
            for item in support.statements
        ],
    }


def review_reasons(
    support: SummarySupport, *, min_rate: float, failed_sections: list[str]
) -> list[str]:
    """Why a summary needs review, by section and position only; [] if it does not."""
    reasons = []
    if support.support_rate < min_rate:
        where = ", ".join(f"{s.section}[{s.index}]" for s in support.unsupported)
        reasons.append(
            f"support rate {support.support_rate:.2f} is below {min_rate:.2f};"
            f" unsupported statements: {where}"
        )
    if failed_sections:
        reasons.append(
            "sections left empty after every generation attempt failed: "
            + ", ".join(failed_sections)
        )
    return reasons


def _lap(stage_ms: dict[str, float], stage: str, since: float) -> float:
    """Add the milliseconds since ``since`` to ``stage``; return the time now."""
    now = time.perf_counter()
    stage_ms[stage] = round(stage_ms.get(stage, 0.0) + (now - since) * 1000, 1)
    return now


def resolve_aliases(data: Any, aliases: dict[str, str]) -> Any:
    """Replace note aliases (N1, ...) by note ids in every statement's citations.

    Anything that is not an alias is left as it is, so validation rejects it.
    """
    if not isinstance(data, dict):
        return data
    for statements in data.values():
        if not isinstance(statements, list):
            continue
        for statement in statements:
            if isinstance(statement, dict) and isinstance(
                statement.get("note_ids"), list
            ):
                statement["note_ids"] = [
                    aliases.get(n, n) if isinstance(n, str) else n
                    for n in statement["note_ids"]
                ]
    return data


def _describe(exc: ValidationError) -> str:
    # Locations and messages only: pydantic's str() would quote the input,
    # which is model output that may repeat note text.
    first = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "<root>"
    return f"{exc.error_count()} validation error(s), first at {where}: {first['msg']}"
