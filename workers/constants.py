"""Queue names, task names and delivery timings in one place."""

from __future__ import annotations

#: Jobs from EHR integrations at discharge; workers drain it first.
QUEUE_REALTIME = "chartsum.realtime"
#: Nightly and operator backfills; never delays a discharge.
QUEUE_BACKFILL = "chartsum.backfill"
#: Context-length calibration runs.
QUEUE_CALIBRATION = "chartsum.calibration"

#: Stable task names: operators read these on Flower.
TASK_SUMMARIZE = "chartsum.summarize"
TASK_SWEEP = "chartsum.sweep_jobs"
TASK_NIGHTLY_BACKFILL = "chartsum.nightly_backfill"

#: Retries for failures that may pass (engine or database down).
MAX_RETRIES = 8
#: First retry delay; doubles each time up to RETRY_BACKOFF_MAX_S.
RETRY_BACKOFF_S = 5
RETRY_BACKOFF_MAX_S = 600

#: Task results carry ids and counts only; a day is enough for Flower.
RESULT_TTL_S = 86_400

#: Exit status of ``chartsum worker`` after its in-process engine died
#: (EX_TEMPFAIL): the supervisor should start it again.
EXIT_ENGINE_DEAD = 75
