"""``chartsum worker`` as the benchmark runs it: chartsum's logging kept intact.

Celery given ``--loglevel`` resets the root logger's level; before commit
0bad80c ``chartsum worker`` passed WARNING, which dropped the canonical INFO
``job_completed`` line. Connecting a ``setup_logging`` receiver tells Celery
to leave logging to chartsum. The instant-responder worker imports this;
``python -m benchmarks.worker_entry worker ...`` runs ``chartsum worker``
the same way.
"""

from __future__ import annotations

import sys
from typing import Any

from celery.signals import setup_logging


@setup_logging.connect  # type: ignore[untyped-decorator]
def keep_chartsum_logging(**_kwargs: Any) -> None:
    """Celery calls this instead of configuring logging itself."""
    return None


if __name__ == "__main__":
    from chartsum.cli import main

    sys.argv = ["chartsum", *sys.argv[1:]]
    main()
