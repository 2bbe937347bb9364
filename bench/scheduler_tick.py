"""Cost of one scheduler tick with 10,000 active cron triggers: (a) nothing due, (b) 1,000
due (each makes one run of a one-block pipeline and starts it), on the configured
database. Cleans up after itself.

    .venv/bin/python bench/scheduler_tick.py [--triggers 10000] [--due 1000] [--repeat 7]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/millrace_bench .venv/bin/python bench/scheduler_tick.py

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

from _setup import setup, vacuum

PIPELINE = "bench_scheduler_tick"
CRON = "17 3 * * *"  # daily at 03:17 UTC


class QueryCounter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute, sql, params, many, context):
        self.count += 1
        return execute(sql, params, many, context)


@contextmanager
def counting():
    from django.db import connection

    counter = QueryCounter()
    with connection.execute_wrapper(counter):
        yield counter


def build(n: int):
    from pipelines import services as pipeline_services
    from pipelines.models import Pipeline
    from triggers import schedule
    from triggers.models import Trigger

    Pipeline.objects.filter(uuid=PIPELINE).delete()
    pipeline = pipeline_services.pipeline_create(uuid=PIPELINE)
    pipeline_services.block_create(
        pipeline=pipeline, uuid="load", type="data_loader", content="@data_loader\ndef load(*args, **kwargs):\n    return 1\n",
    )
    from django.utils import timezone

    upcoming = schedule.next_fire_time(CRON, after=timezone.now())
    Trigger.objects.bulk_create(
        (
            Trigger(pipeline=pipeline, name=f"bench {i:05d}", schedule_interval=CRON, status="active", next_run_at=upcoming)
            for i in range(n)
        ),
        batch_size=1000,
    )
    return pipeline


def timed_tick(now) -> tuple[float, int, dict[str, int]]:
    from triggers import scheduler

    with counting() as counter:
        started = time.perf_counter()
        counts = scheduler.tick(now)
        elapsed = time.perf_counter() - started
    return elapsed, counter.count, counts


def reset_due(pipeline, due: int, due_at, block_runs: set[int]) -> None:
    """The first `due` triggers due again at `due_at`, and the runs of the previous round
    gone, so that every round creates the same number of runs."""
    from runs.models import BlockRun, PipelineRun
    from triggers.models import Trigger

    block_runs.update(BlockRun.objects.filter(pipeline_run__pipeline=pipeline).values_list("id", flat=True))
    PipelineRun.objects.filter(pipeline=pipeline).delete()
    ids = list(Trigger.objects.filter(pipeline=pipeline).order_by("id").values_list("id", flat=True)[:due])
    Trigger.objects.filter(id__in=ids).update(next_run_at=due_at)


def drop_tasks(first_task: int, block_runs: set[int]) -> None:
    """Delete the broker tasks the bench's runs queued (their block runs are gone), and
    only those: the database may have a live queue."""
    from django_q.models import OrmQ
    from django_q.signing import SignedPackage

    for task in OrmQ.objects.filter(id__gte=first_task):
        try:
            payload = SignedPackage.loads(task.payload)
        except Exception:  # not ours to judge
            continue
        if payload.get("func") == "runs.tasks.block_run_execute" and payload.get("args", (None,))[0] in block_runs:
            task.delete()


def explain_due_query(now) -> str:
    from django.db import connection

    from triggers.models import Trigger

    qs = Trigger.objects.filter(status="active", schedule_type="time", next_run_at__lte=now).order_by("next_run_at", "id")[:100]
    plan = qs.explain()
    lines = plan.splitlines()
    index_line = next((line.strip() for line in lines if "trigger_due" in line), lines[0].strip() if lines else "")
    return f"{connection.vendor}: {index_line}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--triggers", type=int, default=10_000)
    parser.add_argument("--due", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    setup()
    from django.db import connection
    from django.utils import timezone
    from django_q.models import OrmQ

    from pipelines.models import Pipeline
    from triggers import schedule

    first_task = (OrmQ.objects.order_by("-id").values_list("id", flat=True).first() or 0) + 1
    pipeline = build(args.triggers)
    vacuum()
    block_runs: set[int] = set()
    try:
        now = timezone.now()
        print(f"database: {connection.vendor}; {os.cpu_count()} cores; {args.triggers:,} active cron triggers; median of {args.repeat} ticks")
        print(f"due query plan: {explain_due_query(now)}")

        timed_tick(now)  # warm caches (parsed crons, pipeline definition)
        quiet = [timed_tick(now) for _ in range(args.repeat)]
        median = statistics.median(t for t, _, _ in quiet)
        print(f"\n(a) nothing due: {median * 1000:8.1f} ms per tick   ({quiet[0][1]} queries; min {min(t for t, _, _ in quiet) * 1000:.1f} ms, max {max(t for t, _, _ in quiet) * 1000:.1f} ms)")

        due_at = schedule.latest_fire_time(CRON, at_or_before=now)
        busy = []
        for _ in range(args.repeat):
            reset_due(pipeline, args.due, due_at, block_runs)
            elapsed, queries, counts = timed_tick(now)
            if counts["created"] != args.due:
                raise SystemExit(f"expected {args.due} runs, the tick created {counts['created']}: {counts}")
            busy.append((elapsed, queries))
        median = statistics.median(t for t, _ in busy)
        print(
            f"(b) {args.due:,} due:    {median * 1000:8.1f} ms per tick   ({median / args.due * 1000:.2f} ms per trigger; "
            f"{busy[0][1] / args.due:.1f} queries per trigger; min {min(t for t, _ in busy) * 1000:.0f} ms, max {max(t for t, _ in busy) * 1000:.0f} ms)"
        )
    finally:
        reset_due(pipeline, 0, None, block_runs)
        Pipeline.objects.filter(uuid=PIPELINE).delete()
        drop_tasks(first_task, block_runs)
        print("\ncleaned up: the bench pipeline, its triggers and runs, and the tasks they queued")


if __name__ == "__main__":
    main()
