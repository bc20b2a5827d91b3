"""``chartsum worker`` with the instant responder in place of the engine.

For the benchmark only: ``python -m benchmarks.instant_worker --concurrency N
--queues Q`` runs the same Celery worker as ``chartsum worker``, so what it
measures is chartsum's own cost per job.
"""

from __future__ import annotations

import sys

from benchmarks import worker_entry
from benchmarks.instant import InstantEngine
from pipelines.logs import configure_logging
from pipelines.model import model_fingerprint
from pipelines.runtime import effective_context, open_store
from pipelines.summarize import Summarizer
from pipelines.tokens import TokenCounter
from schemas.settings import Settings
from workers.app import create_app
from workers.tasks import install_summarizer


def main(argv: list[str]) -> None:
    """Build an instant-responder summarizer and run a Celery worker."""
    settings = Settings()
    configure_logging(settings.logging)
    assert worker_entry.keep_chartsum_logging  # Celery leaves logging alone
    store = open_store(settings)
    fingerprint = model_fingerprint(settings.model_dir)
    install_summarizer(
        Summarizer(
            settings=settings,
            store=store,
            engine=InstantEngine(),
            tokens=TokenCounter.from_model_dir(settings.model_dir),
            model_fingerprint=fingerprint,
            context=effective_context(settings, fingerprint, store=store),
        )
    )
    app = create_app(settings)
    # The same worker options as `chartsum worker` (chartsum/cli.py).
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            *argv,
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
        ]
    )


if __name__ == "__main__":
    main(sys.argv[1:])
