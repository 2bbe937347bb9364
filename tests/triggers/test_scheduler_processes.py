"""Schedulers as real processes on the test database: the single-scheduler lock of
SQLite, and two schedulers splitting the work on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from runs.models import PipelineRun, RunType
from tests.helpers import ROOT, database_url, wait_for
from tests.triggers._support import pipeline
from triggers import scheduler, services
from triggers.models import Trigger
from triggers.schedule import latest_fire_time

pytestmark = [pytest.mark.django_db(transaction=True)]


def child_env(data_dir) -> dict[str, str]:
    return dict(os.environ, DATABASE_URL=database_url(), MILLRACE_DATA_DIR=str(data_dir))


def start_scheduler(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "run_scheduler", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.sqlite
def test_on_sqlite_a_second_scheduler_is_refused_while_the_first_runs(data_dir):
    if connection.vendor != "sqlite":
        pytest.skip("the single-scheduler lock is SQLite's rule; PostgreSQL runs any number of schedulers")
    env = child_env(data_dir)
    lock = scheduler.scheduler_lock_path()
    first = start_scheduler(env, "--ticks", "1000", "--interval", "0.2")
    try:
        # The first scheduler writes its pid into the lock file once it holds the lock.
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), timeout=30)
        second = subprocess.run(
            [sys.executable, "manage.py", "run_scheduler", "--ticks", "1"], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=60,
        )
        assert second.returncode != 0
        assert "another scheduler" in second.stderr and f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first one is not disturbed
    finally:
        # SIGTERM ends the loop cleanly, after the tick in progress.
        assert stop(first) == 0
    # The lock died with its holder: a new scheduler starts.
    third = subprocess.run(
        [sys.executable, "manage.py", "run_scheduler", "--ticks", "1"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert third.returncode == 0, third.stderr


@pytest.mark.sqlite
def test_the_command_ticks_and_refuses_bad_options(data_dir):
    from django.core.management import CommandError, call_command

    trigger = services.trigger_create(pipeline=pipeline("cmd", blocks=0), name="now", schedule_interval="@once", status="active")
    call_command("run_scheduler", "--ticks", "2", "--interval", "0.01")
    assert PipelineRun.objects.filter(trigger=trigger, run_type=RunType.SCHEDULED).count() == 1
    with pytest.raises(CommandError, match="--interval"):
        call_command("run_scheduler", "--interval", "0")
    with pytest.raises(CommandError, match="--ticks"):
        call_command("run_scheduler", "--ticks", "-1")


CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django
    django.setup()
    from django.db import connection
    from triggers import scheduler
    start_at, ticks = float(sys.argv[1]), int(sys.argv[2])
    while time.time() < start_at:
        time.sleep(0.002)
    total = {}
    for _ in range(ticks):
        for key, value in scheduler.tick(batch_size=10).items():
            total[key] = total.get(key, 0) + value
    connection.close()
    print(json.dumps(total))
    """
)


def test_two_schedulers_on_postgresql_make_exactly_one_run_per_trigger_and_due_time(data_dir):
    if connection.vendor != "postgresql":
        pytest.skip("SQLite allows one scheduler by design (the command refuses a second)")
    now = timezone.now()
    target = pipeline("shared", blocks=1)
    # Yearly on 1 January, created over a year ago: each trigger has exactly one due
    # time now, and no other becomes due while the test runs.
    created = now - timedelta(days=400)
    triggers = [
        services.trigger_create(pipeline=target, name=f"t{i:03d}", schedule_interval="0 0 1 1 *", status="active", now=created)
        for i in range(200)
    ]
    due = latest_fire_time("0 0 1 1 *", at_or_before=now)
    assert all(t.next_run_at <= due for t in triggers)
    start_at = time.time() + 3  # both start their first tick at this instant
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(start_at), "3"], cwd=ROOT, env=child_env(data_dir),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    per_trigger = Counter(
        PipelineRun.objects.filter(run_type=RunType.SCHEDULED).values_list("trigger_id", "execution_date")
    )
    assert len(per_trigger) == 200 and set(per_trigger.values()) == {1}
    assert {date for _, date in per_trigger} == {due}
    assert sum(r["created"] for r in results) == 200
    # The row locks split the work: no scheduler even tried a trigger the other had.
    assert sum(r["duplicates"] for r in results) == 0 and sum(r["errors"] for r in results) == 0
    assert not Trigger.objects.filter(next_run_at__lte=now).exists()
    print("runs created by each scheduler:", [r["created"] for r in results])
