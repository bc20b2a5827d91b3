"""``chartsum worker`` as the benchmark runs it: chartsum's logging kept intact.

``chartsum worker`` passes ``--loglevel=WARNING`` to Celery, which then sets
the root logger to WARNING and drops every INFO line, the canonical
``job_completed`` line included (reported; the fix belongs in workers/app.py
or chartsum/cli.py). Connecting a ``setup_logging`` receiver tells Celery to
leave logging to chartsum, so the benchmark can read each job's stage times.
Run as ``python -m benchmarks.worker_entry worker --concurrency N ...``.
"""

from __future__ import annotations

import sys
from typing import Any

from celery.signals import setup_logging


@setup_logging.connect
def keep_chartsum_logging(**_kwargs: Any) -> None:
    """Celery calls this instead of configuring logging itself."""
    return None


if __name__ == "__main__":
    from chartsum.cli import main

    sys.argv = ["chartsum", *sys.argv[1:]]
    main()
