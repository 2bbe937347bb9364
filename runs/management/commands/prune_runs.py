"""`manage.py prune_runs --older-than 30d [--status completed] [--pipeline uuid] [--dry-run]`:
a thin command over `runs.services.runs_prune`."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.common.env import parse_age
from pipelines.models import Pipeline
from runs import services


class Command(BaseCommand):
    help = (
        "Delete finished runs older than an age (30d, 12h, 2w, 90m) with their block runs, logs and stored "
        "outputs. Runs that have not finished are never touched."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", required=True, metavar="AGE", help="30d, 12h, 2w or 90m")
        parser.add_argument("--status", choices=["completed", "failed", "cancelled"], help="only runs that ended so")
        parser.add_argument("--pipeline", metavar="UUID", help="only the runs of this pipeline")
        parser.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            age = parse_age(opts["older_than"])
        except ValueError as exc:
            raise CommandError(f"--older-than: {exc}") from exc
        pipeline = None
        if opts["pipeline"]:
            pipeline = Pipeline.objects.filter(uuid=opts["pipeline"]).first()
            if pipeline is None:
                raise CommandError(f"--pipeline: no pipeline {opts['pipeline']!r}")
        try:
            done = services.runs_prune(older_than=age, status=opts["status"], pipeline=pipeline, dry_run=opts["dry_run"])
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        verb = "Would delete" if opts["dry_run"] else "Deleted"
        self.stdout.write(f"{verb} {done.runs} runs, {done.block_runs} block runs, {done.logs} log lines")
