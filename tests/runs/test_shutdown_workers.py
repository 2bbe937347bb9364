"""Worker clusters stop cleanly and are watched by a heartbeat of their own, on real
`manage.py qcluster` processes and real process-group signals (what systemd, honcho and a
terminal's Ctrl-C send).

A stopping cluster takes no new block; a running block has MILLRACE_SHUTDOWN_GRACE seconds
to finish, then is killed and handed back (queued again, the attempt kept as
`interrupted` and not counted against the block's retries); the cluster exits 0 and
leaves no process behind. A cluster killed outright is noticed through its heartbeat and
its work taken back within 15 s."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from runs import orchestrator
from runs.models import BlockRun, Heartbeat, LogEntry, PipelineRun
from runs.services import run_wait
from tests.helpers import (
    ROOT,
    WorkerCluster,
    alive,
    block_code,
    database_url,
    make_pipeline,
    process_tree,
    wait_for,
    worker_pid,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workers]

ROUNDS = 10
GRACE = 1.0
CLUSTER_ENV = {"MILLRACE_HEARTBEAT_INTERVAL": "0.5", "MILLRACE_SHUTDOWN_GRACE": str(GRACE)}

# Sleeps a minute on each of its first ROUNDS attempts, then returns its attempt.
SLEEPS_UNTIL_LAST_ROUND = block_code("data_loader", f"""
import time
attempt = kwargs["retry"]["attempts"]
print(f"attempt {{attempt}} started", flush=True)
if attempt <= {ROUNDS}:
    time.sleep(60)
return attempt
""")
PLUS_ONE = block_code("transformer", "return args[0] + 1")


def _ready(c: WorkerCluster) -> None:
    wait_for(lambda: "ready:" in c.output, timeout=60)


def _started(run: PipelineRun, attempt: int) -> BlockRun:
    """The first block run of `run`, once its code runs its attempt `attempt`."""
    wait_for(lambda: LogEntry.objects.filter(pipeline_run=run, message=f"attempt {attempt} started").exists(), timeout=60)
    return BlockRun.objects.get(pipeline_run=run, block_uuid="sleepy")


def test_an_idle_cluster_stops_on_a_group_signal_ten_times_in_a_row(cluster):
    for i in range(ROUNDS):
        c = cluster(workers=2, **CLUSTER_ENV)
        _ready(c)
        tree = process_tree(c.proc.pid)
        assert len(tree) >= 5  # main, sentinel, pusher, monitor, workers
        assert Heartbeat.objects.filter(kind="cluster").count() == 1
        took, code = c.signal_group(signal.SIGTERM if i % 2 == 0 else signal.SIGINT)
        assert code == 0, c.output
        assert took < 3, f"round {i}: {took:.1f} s\n{c.output}"
        assert alive(tree) == set(), "nothing is left behind"
        assert not Heartbeat.objects.filter(kind="cluster").exists()
        assert "stopped" in c.output


def test_a_running_block_is_handed_back_after_the_grace_ten_times_in_a_row(cluster):
    pipeline = make_pipeline("handback", [
        ("sleepy", "data_loader", SLEEPS_UNTIL_LAST_ROUND),
        ("after", "transformer", PLUS_ONE, ["sleepy"]),
    ], retry_config={"retries": 0})
    run = orchestrator.run_create(pipeline)
    for i in range(1, ROUNDS + 1):
        c = cluster(workers=1, **CLUSTER_ENV)
        br = _started(run, i)
        tree = process_tree(c.proc.pid)
        assert worker_pid(br.worker) in tree
        took, code = c.signal_group(signal.SIGTERM if i % 2 else signal.SIGINT)
        assert code == 0, c.output
        # The grace, then a heartbeat interval at most to notice it, then the stop.
        assert GRACE <= took < GRACE + 5, f"round {i}: {took:.1f} s\n{c.output}"
        assert alive(tree) == set(), "the block's processes went with it"
        br.refresh_from_db()
        assert br.status == "queued" and br.attempt == i
        assert br.attempt - br.attempt_base == 0, "the interrupted attempts are not counted against retries"
        assert [a["status"] for a in br.attempts] == ["interrupted"] * i
        assert "worker is shutting down" in br.attempts[-1]["error"]
        assert f"block sleepy attempt {i} interrupted" in c.output
    # `retries: 0`, and yet the block still gets its one real attempt, which completes.
    cluster(workers=1, **CLUSTER_ENV)
    run = run_wait(run, timeout=60)
    assert run.status == "completed", run.status
    assert BlockRun.objects.get(pipeline_run=run, block_uuid="after").outputs[0]["value"] == ROUNDS + 2


def test_a_block_that_ends_within_the_grace_completes_and_the_next_block_waits_for_another_cluster(cluster):
    pipeline = make_pipeline("within", [
        ("sleepy", "data_loader", block_code("data_loader", "import time\nprint('attempt 1 started', flush=True)\ntime.sleep(2)\nreturn 1")),
        ("after", "transformer", PLUS_ONE, ["sleepy"]),
    ])
    c = cluster(workers=1, MILLRACE_HEARTBEAT_INTERVAL="0.5", MILLRACE_SHUTDOWN_GRACE="20")
    run = orchestrator.run_create(pipeline)
    _started(run, 1)
    took, code = c.signal_group(signal.SIGTERM)
    assert code == 0 and took < 10, (took, c.output)
    rows = dict(run.block_runs.values_list("block_uuid", "status"))
    # The chain's next block was not taken by the stopping cluster: it waits, queued.
    assert rows == {"sleepy": "completed", "after": "queued"}
    assert "block sleepy attempt 1 completed in" in c.output
    cluster(workers=1)
    assert run_wait(run, timeout=60).status == "completed"


def test_a_second_signal_ends_the_grace_at_once(cluster):
    pipeline = make_pipeline("twice", [("sleepy", "data_loader", SLEEPS_UNTIL_LAST_ROUND)])
    c = cluster(workers=1, MILLRACE_HEARTBEAT_INTERVAL="0.5", MILLRACE_SHUTDOWN_GRACE="60")
    run = orchestrator.run_create(pipeline)
    _started(run, 1)
    started = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)  # to the main process only, this time
    wait_for(lambda: "stopping" in c.output, timeout=10)
    took, code = c.signal_group(signal.SIGINT)
    assert code == 0 and time.monotonic() - started < 10, c.output
    assert BlockRun.objects.get(pipeline_run=run).status == "queued"


def _scheduler() -> subprocess.Popen:
    """A real scheduler with its default interval (5 s), on the test database."""
    env = {**__import__("os").environ, "DATABASE_URL": database_url()}
    return subprocess.Popen(
        [sys.executable, "manage.py", "run_scheduler"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


# The first of these to run sleeps a minute (and leaves a marker); the others return.
SLEEPS_ONCE = block_code("data_loader", """
import os, time
print(f"attempt {kwargs['retry']['attempts']} started", flush=True)
if not os.path.exists(kwargs["marker"]):
    open(kwargs["marker"], "w").close()
    time.sleep(60)
return kwargs["retry"]["attempts"]
""")


def test_a_killed_cluster_s_running_and_prefetched_work_is_recovered_within_15_s(cluster, tmp_path):
    pipeline = make_pipeline("killed", [("sleepy", "data_loader", SLEEPS_ONCE)], retry_config={"retries": 1, "delay": 0})
    c = cluster(workers=1, **CLUSTER_ENV)
    _ready(c)
    runs = [orchestrator.run_create(pipeline, variables={"marker": str(tmp_path / "marker")}) for _ in range(3)]
    first = wait_for(lambda: BlockRun.objects.filter(pipeline_run__in=runs, status="running").first(), timeout=60)
    wait_for(lambda: LogEntry.objects.filter(block_run=first, message="attempt 1 started").exists(), timeout=60)
    time.sleep(1)  # the pusher takes the next task from the broker into its queue
    scheduler = _scheduler()
    try:
        tree = process_tree(c.proc.pid)
        killed_at = timezone.now()
        c.signal_group(signal.SIGKILL)
        wait_for(lambda: not alive(tree), timeout=5)  # the block died with its cluster

        def recovered() -> bool:
            rows = list(BlockRun.objects.filter(pipeline_run__in=runs).values_list("status", "queued_at"))
            # The killed attempt was retried (queued for attempt 2); the other two were
            # sent to the broker again, whether or not the dead cluster had taken them.
            return all(status == "queued" and queued_at >= killed_at for status, queued_at in rows)

        wait_for(recovered, timeout=20, interval=0.1)
        took = (timezone.now() - killed_at).total_seconds()
        assert took <= 15, took
        first.refresh_from_db()
        assert first.attempts[0]["status"] == "failed" and "is gone (its process has ended)" in first.attempts[0]["error"]
        assert not Heartbeat.objects.filter(kind="cluster").exists()
    finally:
        scheduler.send_signal(signal.SIGTERM)
        scheduler.wait(timeout=30)
    cluster(workers=2, **CLUSTER_ENV)
    for run in runs:
        assert run_wait(run, timeout=60).status == "completed"
    first.refresh_from_db()
    assert first.attempt == 2 and first.outputs[0]["value"] == 2


@pytest.mark.sqlite
def test_the_reconcile_pass_takes_back_only_the_work_of_clusters_that_are_gone(settings):
    """Heartbeat rows as clusters on other hosts and on this one leave them: a remote
    one is gone when its heartbeat is older than the limit, a local one as soon as its
    process is."""
    settings.MILLRACE_CLUSTER_HEARTBEAT_LIMIT = 10
    pipeline = make_pipeline("rows", [("sleepy", "data_loader", SLEEPS_UNTIL_LAST_ROUND)])
    now = timezone.now()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    clusters = {
        "remote-silent": ("elsewhere", 1234, now - timedelta(seconds=11)),
        "remote-fresh": ("elsewhere", 1235, now - timedelta(seconds=5)),
        "local-gone": (_hostname(), int(finished.stdout), now),
        "local-alive-but-silent": (_hostname(), _my_pid(), now - timedelta(seconds=60)),
    }
    block_runs = {}
    for name, (host, pid, beat) in clusters.items():
        Heartbeat.objects.create(kind="cluster", name=name, host=host, pid=pid, started_at=now, beat_at=beat)
        run = orchestrator.run_create(pipeline, start=False)
        BlockRun.objects.filter(pipeline_run=run).update(
            status="running", claim="c", attempt=1, started_at=now, heartbeat_at=now, worker=f"{host}:{pid}@{name}",
        )
        PipelineRun.objects.filter(pk=run.pk).update(status="running", started_at=now)
        block_runs[name] = BlockRun.objects.get(pipeline_run=run)

    done = orchestrator.reconcile()

    assert done["clusters_lost"] == 2
    statuses = {name: BlockRun.objects.get(pk=br.pk).status for name, br in block_runs.items()}
    assert statuses == {
        "remote-silent": "failed", "remote-fresh": "running", "local-gone": "failed", "local-alive-but-silent": "running",
    }
    assert set(Heartbeat.objects.values_list("name", flat=True)) == {"remote-fresh", "local-alive-but-silent"}


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _my_pid() -> int:
    import os

    return os.getpid()
