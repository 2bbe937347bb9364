"""`manage.py health` (the database, each worker cluster's and scheduler's heartbeat, the
backlog; non-zero when something is down), the heartbeats it reads, and `make run`'s
Ctrl-C, which must stop web, workers and scheduler quickly with nothing force-killed."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from runs import orchestrator
from runs.models import Heartbeat
from tests.helpers import ROOT, chain, wait_for
from triggers import scheduler


def _health(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("health", *args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, out.getvalue()


def _beat(kind: str, name: str, age: float, **info) -> None:
    now = timezone.now()
    Heartbeat.objects.create(
        kind=kind, name=name, host="elsewhere", pid=1, started_at=now - timedelta(hours=1),
        beat_at=now - timedelta(seconds=age), info=info,
    )


@pytest.mark.django_db
@pytest.mark.sqlite
def test_health_is_down_with_no_worker_and_no_scheduler():
    code, out = _health()
    assert code == 1
    assert "database        ok" in out
    assert "worker cluster  DOWN  none is running (start one: manage.py qcluster)" in out
    assert "scheduler       DOWN  none is running" in out
    assert out.rstrip().endswith("something is down")


@pytest.mark.django_db
@pytest.mark.sqlite
def test_health_is_ok_with_live_heartbeats_and_down_when_one_goes_silent(settings):
    settings.MILLRACE_CLUSTER_HEARTBEAT_LIMIT = 10
    _beat("cluster", "abc", 1, workers=4)
    _beat("scheduler", "elsewhere:1", 2, interval=5)
    orchestrator.run_create(chain("backlog", 2))  # its first block waits, queued
    code, out = _health()
    assert code == 0, out
    assert "abc on elsewhere (pid 1): 4 workers, last heartbeat 1." in out
    assert "last tick 2." in out and "(every 5 s)" in out
    assert "1 block run queued, 0 running" in out
    _beat("cluster", "silent", 30, workers=2)
    code, out = _health("--json")
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False
    assert [c["ok"] for c in report["checks"] if c["check"] == "worker cluster"] == [True, False]


@pytest.mark.django_db(transaction=True)  # the loop closes its connection between ticks
@pytest.mark.sqlite
def test_the_scheduler_loop_keeps_a_heartbeat_and_removes_it_when_it_stops():
    seen = []

    def should_stop() -> bool:
        seen.extend(Heartbeat.objects.filter(kind="scheduler").values_list("name", "info"))
        return len(seen) >= 1

    scheduler.run_loop(interval=0.01, should_stop=should_stop)
    name, info = seen[0]
    assert name == f"{socket.gethostname()}:{os.getpid()}"
    assert info["interval"] == 0.01 and "last_tick" in info
    assert not Heartbeat.objects.filter(kind="scheduler").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.workers
def test_make_run_stops_on_ctrl_c_within_3_s_with_nothing_force_killed(tmp_path):
    """The quickstart's `make run` on its embedded default (SQLite in a fresh var
    folder), stopped as a terminal's Ctrl-C does: SIGINT to its process group."""
    port = _free_port()
    env = {
        **os.environ, "MILLRACE_VAR_DIR": str(tmp_path / "var"), "MILLRACE_PORT": str(port),
        "DATABASE_URL": "", "MILLRACE_ADMIN_PASSWORD": "not-a-real-password",
    }
    env.pop("MILLRACE_SHUTDOWN_GRACE", None)
    output = tmp_path / "make-run.log"
    with open(output, "wb") as log:
        make = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "ready:" in output.read_text() and "Uvicorn running" in output.read_text(), timeout=120, interval=0.2)
        wait_for(lambda: "scheduler.1 started" in output.read_text(), timeout=30)
        time.sleep(1)  # the scheduler's first tick
        started = time.monotonic()
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        try:
            os.killpg(make.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = output.read_text()
    assert took < 3, f"{took:.1f} s\n{text}"
    assert "SIGKILL" not in text, text
    for name in ("web.1", "worker.1", "scheduler.1"):
        assert f"{name} stopped" in text, text
    assert "worker.1 stopped (rc=0)" in text and "scheduler.1 stopped (rc=0)" in text
    assert "cluster" in text and " stopped\n" in text.replace("\r", "")


@pytest.mark.django_db
@pytest.mark.sqlite
def test_the_admin_lists_the_heartbeats(client):
    from django.contrib.auth import get_user_model

    _beat("cluster", "abc123", 1, workers=4)
    client.force_login(get_user_model().objects.create_superuser("root", password="pw"))
    page = client.get("/admin/runs/heartbeat/")
    assert page.status_code == 200 and "abc123" in page.content.decode()


@pytest.mark.django_db
@pytest.mark.sqlite
def test_admin_titles_name_pipelines_by_uuid():
    from triggers import services as triggers

    run = orchestrator.run_create(chain("titled", 1), start=False)
    from datetime import date

    backfill = triggers.backfill_create(pipeline=run.pipeline, start=date(2026, 1, 1), end=date(2026, 1, 2), interval="@daily")
    assert str(run) == f"run {run.pk} of titled (initial)"
    assert str(backfill).startswith(f"backfill {backfill.pk} of titled (")
