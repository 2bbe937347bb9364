"""Retention: `prune_runs` and the scheduler's daily prune delete old finished runs with
everything they left, and never a run that has not finished."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from runs import orchestrator
from runs.models import BlockRun, LogEntry, PipelineRun, RunAction
from runs.services import run_execute_sync
from tests.helpers import chain
from triggers import scheduler

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


def aged(run: PipelineRun, days: int, status: str | None = None) -> PipelineRun:
    changes = {"created_at": timezone.now() - timedelta(days=days)}
    if status:
        changes["status"] = status
    PipelineRun.objects.filter(pk=run.pk).update(**changes)
    return run


def prune(*args: str) -> str:
    out = StringIO()
    call_command("prune_runs", *args, stdout=out)
    return out.getvalue()


def test_old_finished_runs_go_with_block_runs_logs_audit_and_stored_outputs(data_dir):
    pipeline = chain("old", 2)
    old = aged(run_execute_sync(orchestrator.run_create(pipeline, start=False)), 40)
    RunAction.objects.create(pipeline_run=old, action="retry", detail={})
    recent = run_execute_sync(orchestrator.run_create(pipeline, start=False))
    assert (data_dir / "pipeline_runs" / str(old.pk)).is_dir()
    assert BlockRun.objects.filter(pipeline_run=old).count() == 2 and LogEntry.objects.filter(pipeline_run=old).exists()

    out = prune("--older-than", "30d")

    assert out.startswith("Deleted 1 runs, 2 block runs")
    assert list(PipelineRun.objects.values_list("pk", flat=True)) == [recent.pk]
    assert not BlockRun.objects.filter(pipeline_run_id=old.pk).exists()
    assert not LogEntry.objects.filter(pipeline_run_id=old.pk).exists()
    assert not RunAction.objects.filter(pipeline_run_id=old.pk).exists()
    assert not (data_dir / "pipeline_runs" / str(old.pk)).exists()
    assert (data_dir / "pipeline_runs" / str(recent.pk)).is_dir()


def test_a_run_that_has_not_finished_is_never_pruned_however_old():
    pipeline = chain("stuck", 2)
    waiting = aged(orchestrator.run_create(pipeline, start=False), 400)
    running = aged(orchestrator.run_create(pipeline, start=False), 400, status="running")
    failed = aged(orchestrator.run_create(pipeline, start=False), 400, status="failed")
    prune("--older-than", "1d")
    assert set(PipelineRun.objects.values_list("pk", flat=True)) == {waiting.pk, running.pk}
    assert not PipelineRun.objects.filter(pk=failed.pk).exists()


def test_status_pipeline_and_dry_run_narrow_what_goes():
    a, b = chain("a", 1), chain("b", 1)
    done_a = aged(orchestrator.run_create(a, start=False), 10, status="completed")
    failed_a = aged(orchestrator.run_create(a, start=False), 10, status="failed")
    done_b = aged(orchestrator.run_create(b, start=False), 10, status="completed")

    assert prune("--older-than", "2d", "--dry-run").startswith("Would delete 3 runs, 3 block runs")
    assert PipelineRun.objects.count() == 3
    prune("--older-than", "2d", "--status", "failed")
    assert not PipelineRun.objects.filter(pk=failed_a.pk).exists()
    prune("--older-than", "2d", "--pipeline", "b")
    assert list(PipelineRun.objects.values_list("pk", flat=True)) == [done_a.pk]
    assert not PipelineRun.objects.filter(pk=done_b.pk).exists()
    prune("--older-than", "11d")  # younger than that: kept
    assert PipelineRun.objects.filter(pk=done_a.pk).exists()


def test_small_batches_take_every_run():
    from runs.services import runs_prune

    pipeline = chain("many", 1)
    for _ in range(7):
        aged(orchestrator.run_create(pipeline, start=False), 5, status="completed")
    assert runs_prune(older_than=timedelta(days=1), batch=2).runs == 7
    assert not PipelineRun.objects.exists()


@pytest.mark.parametrize("args", [["--older-than", "soon"], ["--older-than", "0d"], ["--older-than", "3d", "--pipeline", "nope"]])
def test_bad_arguments_are_refused_naming_them_and_nothing_goes(args):
    run = aged(orchestrator.run_create(chain("keep", 1), start=False), 50, status="completed")
    with pytest.raises(CommandError, match="--older-than|--pipeline"):
        prune(*args)
    assert PipelineRun.objects.filter(pk=run.pk).exists()


def test_the_scheduler_prunes_once_a_day_when_retention_is_set(settings, monkeypatch):
    monkeypatch.setattr(scheduler, "_last_prune", None)
    pipeline = chain("daily", 1)
    aged(orchestrator.run_create(pipeline, start=False), 100, status="completed")
    settings.MILLRACE_RUN_RETENTION = None
    scheduler.tick()
    assert PipelineRun.objects.count() == 1  # no retention: kept

    settings.MILLRACE_RUN_RETENTION = timedelta(days=90)
    now = timezone.now()
    assert scheduler.tick(now)["runs_pruned"] == 1
    aged(orchestrator.run_create(pipeline, start=False), 100, status="completed")
    assert "runs_pruned" not in scheduler.tick(now + timedelta(hours=23))  # once a day
    assert PipelineRun.objects.count() == 1
    assert scheduler.tick(now + timedelta(hours=25))["runs_pruned"] == 1
    assert not PipelineRun.objects.exists()


def test_the_retention_setting_is_an_age_or_refused(monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    from config.common.env import envage

    monkeypatch.setenv("MILLRACE_RUN_RETENTION", "90d")
    assert envage("MILLRACE_RUN_RETENTION") == timedelta(days=90)
    monkeypatch.setenv("MILLRACE_RUN_RETENTION", "")
    assert envage("MILLRACE_RUN_RETENTION") is None
    monkeypatch.setenv("MILLRACE_RUN_RETENTION", "three months")
    with pytest.raises(ImproperlyConfigured, match="MILLRACE_RUN_RETENTION"):
        envage("MILLRACE_RUN_RETENTION")
