"""The stop flag of a worker cluster, shared by all its processes.

`manage.py qcluster` (runs/cluster.py) imports this module before django-q2 forks its
sentinel and workers, so the value below lives in memory every one of them shares:
when the cluster's main process is told to stop, its workers see it at once, with no
message to pass and nothing to lock (a signal handler only writes a float). Any other
process (the web server, `run_pipeline --sync`) has a flag of its own that nobody sets.
"""

from __future__ import annotations

import multiprocessing
import time

# The monotonic time at which running blocks are killed and handed back; 0: not stopping.
_deadline = multiprocessing.RawValue("d", 0.0)


def request(grace: float) -> None:
    """Stop: take no new block, and let running ones go on for `grace` seconds. Safe in a
    signal handler. A second request never extends the first one's grace."""
    deadline = time.monotonic() + max(0.0, grace)
    if not _deadline.value or deadline < _deadline.value:
        _deadline.value = deadline


def requested() -> bool:
    """Whether this process's cluster is stopping."""
    return _deadline.value > 0


def grace_over() -> bool:
    """Whether blocks still running must now be stopped and handed back."""
    return _deadline.value > 0 and time.monotonic() >= _deadline.value


def deadline() -> float:
    """The monotonic time at which running blocks are handed back (0: not stopping)."""
    return _deadline.value


def reset() -> None:
    """Forget a stop (tests that stop and start clusters in one process)."""
    _deadline.value = 0.0
