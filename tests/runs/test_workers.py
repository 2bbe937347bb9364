"""The worker path: real `manage.py qcluster` processes on the test database."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines import variables
from runs import orchestrator
from runs.models import BlockRun
from runs.services import run_wait
from tests.helpers import block_code, chain, make_pipeline, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workers]




def fan_out(uuid: str, width: int, sleep: float, **fields):
    blocks = [("root", "data_loader", block_code("data_loader", "return 0"))]
    body = f"import time\ntime.sleep({sleep})\nreturn 1"
    blocks += [(f"leaf{i:02d}", "transformer", block_code("transformer", body), ["root"]) for i in range(width)]
    return make_pipeline(uuid, blocks, **fields)


class RunningSampler:
    """Samples from the database, every few milliseconds, how many block runs are running."""

    def __init__(self, **filters):
        self.filters = filters
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        from django.db import connection

        try:
            while not self._stop.is_set():
                n = BlockRun.objects.filter(status="running", **self.filters).count()
                self.peak = max(self.peak, n)
                time.sleep(0.01)
        finally:
            connection.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_workers_run_a_chain_and_each_next_block_runs_in_the_same_worker(cluster):
    cluster(workers=2)
    pipeline = chain("wchain", 10, body="return (args[0] if args else 0) + 1")
    run = run_wait(orchestrator.run_create(pipeline), timeout=60)
    assert run.status == "completed"
    rows = list(run.block_runs.order_by("block_uuid").values_list("worker", "outputs"))
    # The chain moved without a broker round trip: one worker process ran every block.
    assert len({worker for worker, _ in rows}) == 1
    assert rows[-1][1][0]["kind"] == "json"


def test_a_run_in_one_process_stays_in_one_process_of_one_worker(cluster):
    cluster(workers=2)
    body = "import os\nreturn {'pid': os.getpid()}"
    pipeline = make_pipeline("wone", [
        ("a", "data_loader", block_code("data_loader", body)),
        ("b", "transformer", block_code("transformer", body), ["a"]),
        ("c", "transformer", block_code("transformer", body), ["a"]),
        ("d", "transformer", block_code("transformer", body), ["b", "c"]),
    ], run_pipeline_in_one_process=True)
    run = run_wait(orchestrator.run_create(pipeline), timeout=60)
    assert run.status == "completed"
    rows = list(run.block_runs.values_list("worker", "outputs"))
    assert len({worker for worker, _ in rows}) == 1
    pids = {variables.read_value(outputs[0])["pid"] for _, outputs in rows}
    assert len(pids) == 1


def test_a_fan_out_spreads_over_several_workers(cluster):
    cluster(workers=3)
    pipeline = fan_out("wfan", 6, sleep=0.5)
    run = run_wait(orchestrator.run_create(pipeline), timeout=60)
    assert run.status == "completed"
    workers = set(run.block_runs.exclude(block_uuid="root").values_list("worker", flat=True))
    assert len(workers) >= 2


def test_the_global_concurrency_limit_holds_with_more_workers_than_slots(cluster):
    cluster(workers=4, MILLRACE_CONCURRENCY="2")
    pipeline = fan_out("wlimit", 8, sleep=0.4)
    with RunningSampler() as sampler:
        run = run_wait(orchestrator.run_create(pipeline), timeout=90)
    assert run.status == "completed"
    assert sampler.peak == 2  # the limit was reached and never passed


def test_block_run_limit_holds_through_the_workers(cluster):
    cluster(workers=3)
    pipeline = fan_out("wblimit", 4, sleep=0.3, concurrency_config={"block_run_limit": 1})
    with RunningSampler(pipeline_run__pipeline__uuid="wblimit") as sampler:
        run = run_wait(orchestrator.run_create(pipeline), timeout=90)
    assert run.status == "completed"
    assert sampler.peak == 1


def test_a_crash_in_user_code_leaves_the_worker_healthy(cluster):
    c = cluster(workers=1)
    crash = make_pipeline("wcrash", [
        ("segv", "data_loader", block_code("data_loader", "import ctypes\nctypes.string_at(0)")),
    ])
    run = run_wait(orchestrator.run_create(crash), timeout=60)
    assert run.status == "failed"
    assert "SIGSEGV" in run.block_runs.get().error
    after = run_wait(orchestrator.run_create(chain("wafter", 2)), timeout=60)
    assert after.status == "completed"
    assert c.proc.poll() is None
    assert after.block_runs.first().worker == run.block_runs.first().worker  # the same worker process


def test_an_infinite_loop_on_a_worker_is_killed_at_its_timeout(cluster):
    cluster(workers=1)
    pipeline = make_pipeline("wloop", [
        ("spin", "data_loader", block_code("data_loader", "while True:\n    pass"), [], {"timeout": 1}),
    ])
    started = time.monotonic()
    run = run_wait(orchestrator.run_create(pipeline), timeout=60)
    assert run.status == "failed"
    assert "Timed out" in run.block_runs.get().error
    assert time.monotonic() - started < 15


def test_run_pipeline_without_sync_waits_for_the_workers(cluster, capsys):
    from django.core.management import call_command

    cluster(workers=1)
    chain("wcli", 3)
    call_command("run_pipeline", "wcli", "--timeout", "60")
    out = capsys.readouterr().out
    assert "b002" in out and "completed" in out
    wait_for(lambda: BlockRun.objects.filter(pipeline_run__pipeline__uuid="wcli", status="completed").count() == 3)
