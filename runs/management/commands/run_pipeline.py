"""`manage.py run_pipeline <uuid> [--runtime-vars JSON] [--sync] [--timeout S]`."""

from __future__ import annotations

import os
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from config.common import jsonsafe
from pipelines import execution
from pipelines.models import Pipeline
from runs import orchestrator
from runs.models import PipelineRun, PipelineRunStatus
from runs.selectors import run_summary
from runs.services import run_execute_sync, run_wait

TRACEBACK_LINES = 12


class Command(BaseCommand):
    help = "Run a pipeline and print each block's status. Exits 0 only when the run completed."
    # A command people run often and time: the project's system checks (URLs, admin,
    # API schema) have nothing to say about running a pipeline and cost a tenth of a
    # second. `manage.py check` and every other command still run them.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("uuid")
        parser.add_argument("--runtime-vars", default=None, help='JSON object, e.g. \'{"k": "v"}\'')
        parser.add_argument("--sync", action="store_true", help="Execute here, with no worker running.")
        parser.add_argument("--timeout", type=float, default=None, help="Seconds to wait for the workers.")

    def run_from_argv(self, argv: list[str]) -> None:
        """On the command line only (call_command never comes here), end the process at
        once when the command is done: everything is printed and committed, and the
        interpreter's orderly shutdown would add a tenth of a second to every run."""
        code = 0
        try:
            super().run_from_argv(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        connections.close_all()
        os._exit(code)

    def handle(self, *args: Any, **opts: Any) -> None:
        if opts["sync"]:
            # The fork server starts (a new interpreter) while this process reads the
            # pipeline and creates the run, instead of after.
            execution.prepare()
        pipeline = Pipeline.objects.filter(uuid=opts["uuid"]).first()
        if pipeline is None:
            raise CommandError(f"No pipeline {opts['uuid']!r}")
        variables = _parse_vars(opts["runtime_vars"])
        run = orchestrator.run_create(pipeline, variables=variables, start=not opts["sync"])
        self.stdout.write(f"Run {run.pk} of {pipeline.uuid} created")

        def waiting(reason: str) -> None:
            # On stderr, so that it does not mix with the report on stdout.
            self.stderr.write(f"Run {run.pk}: {reason}")

        if opts["sync"]:
            run = run_execute_sync(run, on_wait=waiting)
        else:
            run = run_wait(run, timeout=opts["timeout"], on_wait=waiting)
        self._report(run)
        if run.status != PipelineRunStatus.COMPLETED:
            raise SystemExit(1)

    def _report(self, run: PipelineRun) -> None:
        for row in run_summary(run):
            duration = f"{row['duration']:.3f}s" if row["duration"] is not None else "-"
            self.stdout.write(f"  {row['block_uuid']:<32} {row['status']:<17} {duration}")
            if row["error"] and row["status"] == "failed":
                self.stdout.write(f"    error: {row['error']}")
                if row["traceback"]:
                    for line in row["traceback"].rstrip().splitlines()[-TRACEBACK_LINES:]:
                        self.stdout.write(f"    {line}")
        duration = f" in {run.duration:.3f}s" if run.duration is not None else ""
        self.stdout.write(f"Run {run.pk} {run.status}{duration}")


def _parse_vars(raw: str | None) -> dict[str, Any]:
    """The `--runtime-vars` JSON object, by the rules every other entry point uses
    (config.common.jsonsafe): the error names the option and where in it."""
    if raw is None:
        return {}
    try:
        value = jsonsafe.loads(raw, root="--runtime-vars")
    except jsonsafe.JSONValueError as exc:
        raise CommandError(str(exc)) from None
    if not isinstance(value, dict):
        raise CommandError(f"--runtime-vars must be a JSON object, not {type(value).__name__}")
    return value
