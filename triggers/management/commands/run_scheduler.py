"""`manage.py run_scheduler`: the scheduler loop (see `triggers.scheduler`)."""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from triggers import scheduler


class Command(BaseCommand):
    help = (
        "The scheduler loop: every --interval seconds, fire the time triggers that are due, "
        "enforce run timeouts and SLAs, repair what dead workers left, finish backfills. "
        "On SQLite only one scheduler may run; on PostgreSQL any number."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--interval", type=float, default=5.0, help="Seconds between ticks.")
        parser.add_argument("--ticks", type=int, default=0, help="Stop after this many ticks (0: run until stopped).")

    def handle(self, *args: Any, **opts: Any) -> None:
        if opts["interval"] <= 0:
            raise CommandError(f"--interval must be a number of seconds > 0, not {opts['interval']}")
        if opts["ticks"] < 0:
            raise CommandError(f"--ticks must be 0 (no limit) or more, not {opts['ticks']}")
        stopping = threading.Event()

        def stop(signum: int, frame: Any) -> None:
            stopping.set()  # the current tick finishes; the loop ends after it

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            with scheduler.single_scheduler_lock():
                scheduler.run_loop(interval=opts["interval"], ticks=opts["ticks"], should_stop=stopping.is_set)
        except scheduler.SchedulerAlreadyRunning as exc:
            raise CommandError(str(exc)) from None
        finally:
            # Called in-process (call_command, tests), the caller keeps its own handlers.
            for sig, handler in previous.items():
                signal.signal(sig, handler)
