"""The Celery app, configured from Settings in one function."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.schedules import crontab
from kombu import Exchange, Queue  # type: ignore[attr-defined]

from schemas.settings import Settings
from workers.constants import (
    QUEUE_BACKFILL,
    QUEUE_CALIBRATION,
    QUEUE_REALTIME,
    RESULT_TTL_S,
    TASK_NIGHTLY_BACKFILL,
    TASK_SWEEP,
)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's settings (and so Flower's broker) derived from chartsum's."""
    redis_url = settings.redis.url.get_secret_value()
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": RESULT_TTL_S,
        # At least once: acknowledge after the job ran, and put a task back
        # when its worker dies. The job row's lease stops double work.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": settings.redis.visibility_timeout_s,
        },
        "broker_connection_retry_on_startup": True,
        "task_track_started": True,
        # Each queue gets its own exchange and routing key; left implicit,
        # Celery binds every queue to the default queue's key and a message
        # would reach all of them.
        "task_queues": [_queue(name) for name in ALL_QUEUES],
        "task_default_queue": QUEUE_REALTIME,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "beat_schedule": beat_schedule(settings),
        "timezone": "UTC",
    }


ALL_QUEUES = (QUEUE_REALTIME, QUEUE_BACKFILL, QUEUE_CALIBRATION)


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """Periodic tasks: the sweep for stuck jobs and the nightly backfill."""
    ops = settings.operations
    schedule: dict[str, Any] = {
        "sweep-stuck-jobs": {
            "task": TASK_SWEEP,
            "schedule": float(ops.sweep_interval_s),
            "options": {"queue": QUEUE_REALTIME},
        }
    }
    if ops.nightly_backfill_enabled:
        schedule["nightly-backfill"] = {
            "task": TASK_NIGHTLY_BACKFILL,
            "schedule": crontab(minute=0, hour=ops.nightly_backfill_hour_utc),
            "options": {"queue": QUEUE_BACKFILL},
        }
    return schedule


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for these settings, with chartsum's tasks registered."""
    settings = settings or Settings()
    app = Celery("chartsum")
    app.config_from_object(celery_config(settings))
    app.conf.chartsum_settings = settings
    from workers import tasks

    tasks.register(app)
    return app


app = create_app()
