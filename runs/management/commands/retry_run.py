"""`manage.py retry_run <id> [--incomplete | --from-block <uuid>]`: a thin command over
`runs.orchestrator.run_retry`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs import orchestrator


class Command(BaseCommand):
    help = (
        "Retry a finished run: from scratch, only its incomplete blocks (--incomplete), or "
        "a block and everything downstream of it (--from-block). The workers run it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("run_id", type=int, metavar="id")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--incomplete", action="store_true", help="Only the block runs that did not complete.")
        group.add_argument("--from-block", metavar="uuid", help="This block and everything downstream of it.")

    def handle(self, *args: Any, **opts: Any) -> None:
        mode = "from_block" if opts["from_block"] else "incomplete" if opts["incomplete"] else "all"
        try:
            blocks = orchestrator.run_retry(opts["run_id"], mode=mode, block_uuid=opts["from_block"])
        except orchestrator.ActionRefused as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Run {opts['run_id']} retried ({mode.replace('_', ' ')}): {len(blocks)} block run(s) will run again: {', '.join(blocks)}")
