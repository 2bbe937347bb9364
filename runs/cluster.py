"""`manage.py qcluster`: django-q2's worker cluster, stopped cleanly and watched by a
heartbeat of its own.

django-q2 (1.11) stops badly on a signal (its issue #346): its main process stops the
cluster from inside the signal handler, setting a multiprocessing Event and joining the
sentinel, which take locks the interrupted code may hold, and hangs; its sentinel,
pusher, monitor and workers die at once on SIGTERM (their default action), killing the
blocks they run; SIGINT they ignore, and then a running block holds the stop for as long
as it runs. So a deploy (systemd's SIGTERM to the whole group) ended in a SIGKILL.

Here:

1. Only the main process acts on SIGTERM and SIGINT; the sentinel and every process
   under it ignore both, so a signal to the whole process group reaches the main one
   only. Its handler records the stop in `runs.stopping` (a float in memory shared with
   the workers) and does nothing else: no lock, no I/O.
2. The main thread sees it, marks the cluster stopping and sets django-q2's stop event:
   the pusher takes no more tasks from the broker, tasks already taken are sent back
   unclaimed (`runs.tasks`), and running blocks go on for MILLRACE_SHUTDOWN_GRACE
   seconds, after which their workers kill them and hand their block runs back
   (`runs.orchestrator`). A second signal ends the grace at once.
3. Once the sentinel has stopped its workers, the main process deletes the cluster's
   heartbeat row and exits 0. If it has not within the grace plus STOP_MARGIN seconds,
   the main process kills what is left and hands the block runs back itself.
4. While the cluster runs, a thread of the main process writes its heartbeat (a
   `Heartbeat` row) every BEAT_EVERY seconds, and every process under the main one dies
   with its parent (PR_SET_PDEATHSIG): a cluster whose heartbeat stopped has nothing
   left running blocks, and the scheduler's reconcile pass takes its work back.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import signal
import threading
import time
import uuid
from datetime import datetime
from typing import Any

import psutil
from django.conf import settings
from django.db import close_old_connections, connections
from django.utils import timezone
from django_q import cluster as q_cluster
from django_q.conf import Conf

from pipelines.execution.libc import libc_function
from runs import orchestrator, stopping
from runs.models import HeartbeatKind
from runs.orchestrator import CLUSTER_ENV
from runs.services import heartbeat_beat, heartbeat_end

log = logging.getLogger("millrace.worker")

BEAT_EVERY = 2.0
STOP_MARGIN = 10.0

_prctl = libc_function("prctl")
_PR_SET_PDEATHSIG = 1


def _quiet() -> None:
    """Leave SIGTERM and SIGINT to the main process (see the module's docstring)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Sentinel(q_cluster.Sentinel):
    """django-q2's sentinel, which sets SIGTERM back to its default action as it starts
    (so that a signal to the group would kill it): set to ignore again before it starts
    its workers, which inherit that."""

    def __init__(self, stop_event: Any, start_event: Any, cluster_id: Any, broker: Any = None, timeout: Any = None, start: bool = True):
        super().__init__(stop_event, start_event, cluster_id, broker, timeout, start=False)
        _quiet()
        if start:
            self.start()


class _AfterFork:
    """Run in every process django-q2 forks under the main one (the sentinel, then its
    pusher, monitor and workers), before its own code."""


_after_fork = _AfterFork()


def _in_forked_process(_: object) -> None:
    _quiet()
    _die_with_parent()


class _Beat(threading.Thread):
    """The cluster's heartbeat, from a thread of the main process (with a database
    connection of its own)."""

    def __init__(self, name: str, info: dict[str, Any]):
        super().__init__(name="millrace-cluster-heartbeat", daemon=True)
        self.cluster = name
        self.info = info
        self.started_at = timezone.now()
        self.done = threading.Event()

    def beat(self, *, stopping_since: datetime | None = None) -> None:
        heartbeat_beat(
            kind=HeartbeatKind.CLUSTER, name=self.cluster, started_at=self.started_at, info=self.info,
            stopping_since=stopping_since,
        )

    def run(self) -> None:
        try:
            while not self.done.wait(BEAT_EVERY):
                try:
                    close_old_connections()
                    self.beat(stopping_since=timezone.now() if stopping.requested() else None)
                except Exception:  # a database hiccup: the next beat tries again
                    log.exception("cluster %s: heartbeat failed", self.cluster)
        finally:
            connections.close_all()

    def end(self) -> None:
        self.done.set()
        self.join(timeout=BEAT_EVERY + 5)
        heartbeat_end(kind=HeartbeatKind.CLUSTER, name=self.cluster)


def run(*, run_once: bool = False) -> int:
    """Run a worker cluster until it is told to stop; returns the exit code."""
    name = uuid.uuid4().hex[:12]
    os.environ[CLUSTER_ENV] = name  # the worker label of every block run it claims
    grace = max(0.0, settings.MILLRACE_SHUTDOWN_GRACE)
    # Every process django-q2 forks under this one is set up by `_in_forked_process`
    # and the sentinel is ours (django_q.cluster.Cluster.start names the class there).
    multiprocessing.util.register_after_fork(_after_fork, _in_forked_process)
    q_cluster.Sentinel = _Sentinel
    cluster = q_cluster.Cluster()

    def on_signal(signum: int, frame: Any) -> None:
        # Nothing but a write to shared memory: the main thread does the rest.
        stopping.request(0.0 if stopping.requested() else grace)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)  # over the handlers django-q2's Cluster set
    info = {"workers": Conf.WORKERS, "broker": "redis" if Conf.REDIS else "orm", "grace": grace}
    beat = _Beat(name, info)
    beat.beat()
    connections.close_all()  # the sentinel must not inherit this process's connection
    cluster.start()
    beat.start()
    log.info(
        "Millrace worker cluster %s ready: %s worker processes, %s broker, pid %s, shutdown grace %g s",
        name, info["workers"], info["broker"], os.getpid(), grace,
    )
    if run_once:
        stopping.request(grace)
    while not stopping.requested():
        if not cluster.sentinel.is_alive():
            log.error("cluster %s: its sentinel died (exit code %s); stopping", name, cluster.sentinel.exitcode)
            _recover(name, beat, "its sentinel process died", interrupted=False)
            return 1
        time.sleep(0.2)
    return _stop(cluster, name, beat, grace)


def _stop(cluster: q_cluster.Cluster, name: str, beat: _Beat, grace: float) -> int:
    log.info("cluster %s stopping: no new block; running blocks have %g s to finish", name, grace)
    cluster.stop_event.set()
    while cluster.sentinel.is_alive():
        # A second signal shortens the grace: the margin counts from the deadline now.
        if stopping.grace_over() and time.monotonic() > stopping.deadline() + STOP_MARGIN:
            log.error("cluster %s did not stop within the grace; killing what is left", name)
            _kill_tree(cluster.sentinel.pid)
            _recover(name, beat, "its worker cluster was stopped and did not finish in time", interrupted=True)
            return 0
        cluster.sentinel.join(0.2)
    beat.end()
    log.info("cluster %s stopped", name)
    return 0


def _kill_tree(pid: int) -> None:
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass


def _recover(name: str, beat: _Beat, why: str, *, interrupted: bool) -> None:
    """Take back the block runs the cluster's processes held (they are gone)."""
    beat.done.set()
    now = timezone.now()
    orchestrator.cluster_recover(name, reason=f"Worker cluster {name}: {why}", before=now, now=now, interrupted=interrupted)
