"""`manage.py health`: is Millrace able to work, from here."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from runs.selectors import health_report


class Command(BaseCommand):
    help = (
        "Check the database, the worker clusters' and schedulers' heartbeats and the queued "
        "backlog. Exits 0 when all is well, 1 when something is down."
    )
    requires_system_checks: list[str] = []  # a probe must answer even when a check would not

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="One JSON object on stdout.")

    def handle(self, *args: Any, **options: Any) -> None:
        report = health_report()
        if options["json"]:
            checks = [{"check": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks]
            self.stdout.write(json.dumps({"ok": report.ok, "checks": checks}))
        else:
            for check in report.checks:
                self.stdout.write(f"{check.name:<15} {'ok' if check.ok else 'DOWN':<5} {check.detail}")
            self.stdout.write("all is well" if report.ok else "something is down")
        if not report.ok:
            raise SystemExit(1)
