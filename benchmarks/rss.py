"""Peak resident memory of process trees, sampled in a background thread.

vLLM runs its engine core (and on the CPU a worker) in child processes, so
a process's own RSS says little: each watched root is sampled with all of
its descendants, and the peak of their sum is kept along with each
process's own peak.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import TracebackType

import psutil


@dataclass
class TreePeak:
    """Peak memory of one watched process tree."""

    label: str
    #: Highest sum of the tree's RSS seen in one sample (bytes).
    peak_total_bytes: int = 0
    #: Each process's own highest RSS (bytes), keyed by pid.
    peak_by_pid: dict[int, int] = field(default_factory=dict)
    #: Each process's latest name (vLLM renames its processes after start).
    names: dict[int, str] = field(default_factory=dict)

    @property
    def peak_by_process(self) -> dict[str, int]:
        """Each process's own peak RSS (bytes), keyed by ``name[pid]``."""
        peaks = self.peak_by_pid.items()
        return {f"{self.names[pid]}[{pid}]": rss for pid, rss in peaks}


class RssSampler:
    """Samples watched process trees every ``interval_s`` seconds.

    Args:
        interval_s: Seconds between samples (default 0.5).
    """

    def __init__(self, *, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._roots: dict[str, int] = {}
        self._peaks: dict[str, TreePeak] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, pid: int, label: str) -> None:
        """Start sampling the tree under ``pid``, reported as ``label``."""
        with self._lock:
            self._roots[label] = pid
            self._peaks.setdefault(label, TreePeak(label))
        self.sample()

    def unwatch(self, label: str) -> None:
        """Stop sampling a tree; its peaks are kept."""
        self.sample()
        with self._lock:
            self._roots.pop(label, None)

    def peaks(self) -> list[TreePeak]:
        """The peaks seen so far, in the order trees were first watched."""
        with self._lock:
            return list(self._peaks.values())

    def sample(self) -> None:
        """Take one sample of every watched tree now."""
        with self._lock:
            roots = dict(self._roots)
        for label, pid in roots.items():
            total, by_pid = _tree_rss(pid)
            with self._lock:
                peak = self._peaks[label]
                peak.peak_total_bytes = max(peak.peak_total_bytes, total)
                for child, (name, rss) in by_pid.items():
                    peak.names[child] = name
                    seen = peak.peak_by_pid.get(child, 0)
                    peak.peak_by_pid[child] = max(seen, rss)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(
            target=self._loop, name="rss-sampler", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


def _tree_rss(pid: int) -> tuple[int, dict[int, tuple[str, int]]]:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, {}
    by_pid: dict[int, tuple[str, int]] = {}
    for process in processes:
        # A child may exit between listing and reading; it simply drops out.
        try:
            by_pid[process.pid] = (process.name(), process.memory_info().rss)
        except psutil.Error:
            continue
    return sum(rss for _, rss in by_pid.values()), by_pid
