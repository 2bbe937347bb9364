"""`manage.py cancel_run <id>...`: a thin command over `runs.services.runs_cancel`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs import services


class Command(BaseCommand):
    help = "Cancel runs: every unfinished block run is cancelled and its processes killed. Prints what changed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("run_ids", nargs="+", type=int, metavar="id")

    def handle(self, *args: Any, **opts: Any) -> None:
        result = services.runs_cancel(opts["run_ids"])
        for run_id in result.changed:
            self.stdout.write(f"Run {run_id} cancelled")
        for run_id, reason in result.refused.items():
            self.stderr.write(f"Run {run_id} not cancelled: {reason}")
        if not result.changed:
            raise CommandError("Nothing was cancelled")
