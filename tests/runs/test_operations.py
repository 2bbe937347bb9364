"""Retry (manual and automatic), cancel and the batch operations, through the
orchestrator with real child processes; the workers' side is in test_*_workers.py."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
import time_machine
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from pipelines import services as pipeline_services
from pipelines import variables
from runs import orchestrator, services
from runs.apps import check_queue_settings
from runs.models import BlockRun, LogEntry, PipelineRun, RunAction
from runs.services import run_execute_sync
from tests.helpers import ROOT, block_code, chain, make_pipeline

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sqlite]

FAIL = "raise ValueError('boom')"


def statuses(run: PipelineRun) -> dict[str, str]:
    return dict(run.block_runs.values_list("block_uuid", "status"))


def attempts(run: PipelineRun) -> dict[str, int]:
    return dict(run.block_runs.values_list("block_uuid", "attempt"))


def output_keys(run: PipelineRun, uuid: str) -> list[str]:
    return [m["key"] for m in run.block_runs.get(block_uuid=uuid).outputs]


def value(run: PipelineRun, uuid: str):
    return [variables.read_value(m) for m in run.block_runs.get(block_uuid=uuid).outputs]


def fan(uuid: str, failing: str = "right"):
    """load -> left, load -> right; `failing` raises."""
    def body(name: str) -> str:
        return FAIL if name == failing else "return (args[0] if args else 0) + 1"
    return make_pipeline(uuid, [
        ("load", "data_loader", block_code("data_loader", body("load"))),
        ("left", "transformer", block_code("transformer", body("left")), ["load"]),
        ("right", "transformer", block_code("transformer", body("right")), ["load"]),
    ])


def fix(pipeline, uuid: str, body: str = "return args[0] * 10") -> None:
    block = pipeline.blocks.get(uuid=uuid)
    pipeline_services.block_update(block=block, content=block_code(block.type, body))


def run_sync(pipeline, **kwargs) -> PipelineRun:
    return run_execute_sync(orchestrator.run_create(pipeline, start=False, **kwargs))


# --- manual retry ---------------------------------------------------------------------------

def test_retry_incomplete_reruns_only_what_did_not_complete_and_reuses_stored_outputs(editor_user):
    pipeline = fan("inc")
    run = run_sync(pipeline)
    assert run.status == "failed" and statuses(run) == {"load": "completed", "left": "completed", "right": "failed"}
    load_keys = output_keys(run, "load")
    old_hash = run.block_runs.get(block_uuid="right").code_hash
    fix(pipeline, "right")

    changed = orchestrator.run_retry(run.pk, mode="incomplete", user=editor_user)
    assert changed == ["right"]
    run = run_execute_sync(PipelineRun.objects.get(pk=run.pk))

    assert run.status == "completed"
    assert attempts(run) == {"load": 1, "left": 1, "right": 2}
    assert output_keys(run, "load") == load_keys  # not run again: its stored output was read
    assert value(run, "right") == [10]  # the fixed code ran, on load's stored output (1)
    right = run.block_runs.get(block_uuid="right")
    assert right.code_hash != old_hash
    assert [a["status"] for a in right.attempts] == ["failed"] and "boom" in right.attempts[0]["error"]
    action = RunAction.objects.get(pipeline_run=run)
    assert (action.action, action.user, action.detail["block_runs"]) == ("retry_incomplete", editor_user, ["right"])


def test_retry_all_runs_every_block_again_and_keeps_the_attempt_counters():
    pipeline = fan("all", failing="none")
    run = run_sync(pipeline)
    assert run.status == "completed"
    first_keys = output_keys(run, "load")
    orchestrator.run_retry(run.pk, mode="all")
    run = run_execute_sync(PipelineRun.objects.get(pk=run.pk))
    assert run.status == "completed"
    assert attempts(run) == {"load": 2, "left": 2, "right": 2}
    assert output_keys(run, "load") != first_keys  # a new attempt wrote new outputs


def test_retry_from_a_block_reruns_it_and_everything_downstream_whatever_their_status():
    pipeline = chain("from", 4, body="return (args[0] if args else 0) + 1")
    run = run_sync(pipeline)
    assert run.status == "completed"
    assert orchestrator.run_retry(run.pk, mode="from_block", block_uuid="b001") == ["b001", "b002", "b003"]
    run = run_execute_sync(PipelineRun.objects.get(pk=run.pk))
    assert attempts(run) == {"b000": 1, "b001": 2, "b002": 2, "b003": 2}
    assert value(run, "b003") == [4]


def test_retry_is_refused_with_a_reason_when_it_makes_no_sense():
    pipeline = chain("refuse", 2)
    run = orchestrator.run_create(pipeline, start=False)
    with pytest.raises(orchestrator.ActionRefused, match="only a finished run"):
        orchestrator.run_retry(run.pk)
    run = run_execute_sync(run)
    with pytest.raises(orchestrator.ActionRefused, match="nothing to retry"):
        orchestrator.run_retry(run.pk, mode="incomplete")
    with pytest.raises(orchestrator.ActionRefused, match="no block 'nope'"):
        orchestrator.run_retry(run.pk, mode="from_block", block_uuid="nope")
    assert not RunAction.objects.exists()
    assert statuses(run) == {"b000": "completed", "b001": "completed"}


def test_retry_after_a_timeout_starts_the_timeout_clock_again():
    pipeline = chain("clock", 1)
    run = orchestrator.run_create(pipeline, start=False, timeout=60)
    PipelineRun.objects.filter(pk=run.pk).update(status="running", started_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert orchestrator.enforce_deadlines()["timed_out"] == 1
    run.refresh_from_db()
    assert run.status == "failed"
    orchestrator.run_retry(run.pk, mode="incomplete")
    run = run_execute_sync(PipelineRun.objects.get(pk=run.pk))
    assert run.status == "completed"
    assert run.started_at > datetime(2026, 1, 2, tzinfo=UTC)
    assert orchestrator.enforce_deadlines()["timed_out"] == 0


# --- automatic retries ----------------------------------------------------------------------

def test_automatic_retries_wait_with_exponential_backoff_capped_by_max_delay():
    pipeline = make_pipeline("backoff", [("flaky", "data_loader", block_code("data_loader", FAIL))],
                             retry_config={"retries": 3, "delay": 10, "exponential_backoff": True, "max_delay": 25})
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    with time_machine.travel(t0, tick=False) as clock:
        run = orchestrator.run_create(pipeline, start=False)
        [queued] = orchestrator.advance(run.pk)
        orchestrator.block_run_execute(queued)
        waits = []
        for _ in range(3):
            br = BlockRun.objects.get(pk=queued)
            assert br.status == "initial" and br.next_retry_at is not None
            wait = (br.next_retry_at - _now()).total_seconds()
            waits.append(wait)
            clock.shift(wait - 1)
            assert orchestrator.retries_due() == [] and orchestrator.advance(run.pk) == []  # not due yet
            clock.shift(1)
            assert orchestrator.retries_due() == [queued]
            orchestrator.block_run_execute(queued)
    assert waits == [10, 20, 25]  # 10, 10*2, min(10*4, 25)
    br = BlockRun.objects.get(pk=queued)
    run.refresh_from_db()
    assert (br.status, br.attempt, run.status) == ("failed", 4, "failed")
    assert [a["attempt"] for a in br.attempts] == [1, 2, 3]
    errors = LogEntry.objects.filter(block_run=br, level="ERROR").values_list("attempt", flat=True)
    assert sorted(errors) == [1, 2, 3, 4]  # each attempt's error is kept in the log


def _now() -> datetime:
    from django.utils import timezone

    return timezone.now()


def test_a_block_without_its_own_retry_config_uses_the_pipelines_and_its_own_wins():
    pipeline = make_pipeline("inherit", [
        ("uses_pipeline", "data_loader", block_code("data_loader", FAIL)),
        ("own", "data_loader", block_code("data_loader", FAIL), [], {"retry_config": {"retries": 0}}),
    ], retry_config={"retries": 1, "delay": 0})
    run = run_sync(pipeline)
    assert run.status == "failed"
    assert attempts(run) == {"uses_pipeline": 2, "own": 1}


def test_retries_zero_means_one_attempt_also_on_a_timeout():
    pipeline = make_pipeline("once", [
        ("slow", "data_loader", block_code("data_loader", "while True:\n    pass"), [], {"timeout": 1, "retry_config": {"retries": 0}}),
    ], retry_config={"retries": 5, "delay": 0})
    run = run_sync(pipeline)
    br = run.block_runs.get()
    assert (run.status, br.status, br.attempt) == ("failed", "failed", 1)
    assert "Timed out after 1 s" in br.error


def test_a_retried_attempt_that_succeeds_completes_the_run():
    marker = "/tmp/millrace-test-flaky-{}"
    body = (
        "import os\n"
        "path = kwargs['marker']\n"
        "if not os.path.exists(path):\n"
        "    open(path, 'w').close()\n"
        "    raise RuntimeError('first attempt fails')\n"
        "return kwargs['retry']['attempts']"
    )
    pipeline = make_pipeline("flaky", [("f", "data_loader", block_code("data_loader", body))],
                             retry_config={"retries": 2, "delay": 0})
    path = marker.format(os.getpid())
    if os.path.exists(path):
        os.remove(path)
    try:
        run = run_sync(pipeline, variables={"marker": path})
    finally:
        if os.path.exists(path):
            os.remove(path)
    assert run.status == "completed"
    assert value(run, "f") == [2]


# --- cancel ---------------------------------------------------------------------------------

def test_cancel_marks_every_unfinished_block_run_and_twice_changes_nothing(editor_user):
    pipeline = chain("cancel", 3)
    run = orchestrator.run_create(pipeline)  # queued, no worker here
    orchestrator.run_cancel(run.pk, user=editor_user)
    run.refresh_from_db()
    assert run.status == "cancelled"
    assert set(statuses(run).values()) == {"cancelled"}
    before = LogEntry.objects.filter(pipeline_run=run).count()
    with pytest.raises(orchestrator.ActionRefused, match="already finished"):
        orchestrator.run_cancel(run.pk)
    assert LogEntry.objects.filter(pipeline_run=run).count() == before
    assert list(RunAction.objects.values_list("action", "user__username")) == [("cancel", "erin")]


def test_a_cancelled_block_stops_its_branch_and_the_run_ends_cancelled():
    pipeline = fan("onecancel", failing="none")
    run = orchestrator.run_create(pipeline, start=False)
    [load] = orchestrator.advance(run.pk)
    orchestrator.block_run_execute(load)  # queues left and right
    right = run.block_runs.get(block_uuid="right")
    orchestrator.block_run_cancel(right.pk)
    run = run_execute_sync(PipelineRun.objects.get(pk=run.pk))
    assert statuses(run) == {"load": "completed", "left": "completed", "right": "cancelled"}
    assert run.status == "cancelled"
    with pytest.raises(orchestrator.ActionRefused):
        orchestrator.block_run_cancel(right.pk)


def test_a_cancelled_run_can_be_retried():
    pipeline = chain("again", 2)
    run = orchestrator.run_create(pipeline)
    orchestrator.run_cancel(run.pk)
    orchestrator.run_retry(run.pk, mode="incomplete")
    run = run_execute_sync(PipelineRun.objects.get(pk=run.pk))
    assert run.status == "completed"


# --- batch operations, commands, admin --------------------------------------------------------

def test_batch_operations_count_what_they_changed_and_refuse_the_rest():
    pipeline = fan("batch")
    failed = run_sync(pipeline)
    going = orchestrator.run_create(pipeline)
    result = services.runs_retry([failed.pk, going.pk])
    assert result.changed == [failed.pk]
    assert "only a finished run" in result.refused[going.pk]
    result = services.runs_cancel([failed.pk, going.pk])
    assert set(result.changed) == {failed.pk, going.pk}  # the retried run had not finished either
    assert services.runs_cancel([going.pk]).refused  # twice: refused
    assert services.pipeline_cancel_running(pipeline).count == 0
    result = services.pipeline_retry_incomplete(pipeline)
    assert result.count == 2
    assert PipelineRun.objects.filter(pipeline=pipeline, status="initial").count() + \
        PipelineRun.objects.filter(pipeline=pipeline, status="running").count() == 2
    assert services.pipeline_cancel_running(pipeline).count == 2


def test_cancel_run_and_retry_run_commands_print_what_changed(capsys):
    pipeline = fan("cmd")
    run = run_sync(pipeline)
    call_command("retry_run", str(run.pk), "--incomplete")
    assert "1 block run(s) will run again: right" in capsys.readouterr().out
    call_command("cancel_run", str(run.pk))
    assert f"Run {run.pk} cancelled" in capsys.readouterr().out
    with pytest.raises(CommandError):
        call_command("cancel_run", str(run.pk))
    with pytest.raises(CommandError, match="no block 'zz'"):
        call_command("retry_run", str(run.pk), "--from-block", "zz")


def test_admin_actions_retry_and_cancel_selected_runs(client, staff_user):
    pipeline = fan("adm")
    failed = run_sync(pipeline)
    client.force_login(staff_user)
    url = reverse("admin:runs_pipelinerun_changelist")
    response = client.post(url, {"action": "retry_runs", "_selected_action": [failed.pk]}, follow=True)
    assert [m.message for m in response.context["messages"]] == ["Retried 1 run"]
    failed.refresh_from_db()
    assert failed.status in ("initial", "running")
    response = client.post(url, {"action": "cancel_running_of_pipelines", "_selected_action": [failed.pk]}, follow=True)
    assert [m.message for m in response.context["messages"]] == ["adm: cancelled 1 run"]
    failed.refresh_from_db()
    assert failed.status == "cancelled"


def test_admin_actions_are_not_offered_to_a_viewer(client):
    viewer = User.objects.create_user("vic", password="x", is_staff=True)
    from django.contrib.auth.models import Permission

    viewer.user_permissions.add(Permission.objects.get(codename="view_pipelinerun"))
    run_sync(fan("view"))
    client.force_login(viewer)
    page = client.get(reverse("admin:runs_pipelinerun_changelist")).content.decode()
    assert "cancel_runs" not in page and "retry_runs" not in page


# --- settings -------------------------------------------------------------------------------

def test_queue_settings_that_would_redeliver_a_running_block_are_refused():
    check_queue_settings({"timeout": 100, "retry": 160, "max_attempts": 1})
    with pytest.raises(ImproperlyConfigured, match="must be greater than"):
        check_queue_settings({"timeout": 100, "retry": 100, "max_attempts": 1})
    with pytest.raises(ImproperlyConfigured, match="max_attempts"):
        check_queue_settings({"timeout": 100, "retry": 160, "max_attempts": 3})


def test_a_global_concurrency_of_zero_is_refused_with_a_clear_message():
    env = dict(os.environ, MILLRACE_CONCURRENCY="0")
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "MILLRACE_CONCURRENCY is 0: no block could ever run" in result.stderr
