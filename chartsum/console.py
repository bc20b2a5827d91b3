"""The console every command prints its tables to.

On a terminal Rich uses the terminal's width. Piped into a file or a log
collector it would assume 80 columns and cut or fold long ids in the
middle; there it gets 200, so ids stay whole and can be pasted back.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

#: Columns used when stdout is not a terminal and COLUMNS is not set.
PIPED_WIDTH = 200


def _width() -> int | None:
    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return None
    return PIPED_WIDTH


console = Console(width=_width())
