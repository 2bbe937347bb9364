from __future__ import annotations

import logging
import signal
import time

from django.core.management.base import BaseCommand

from runs import orchestrator

log = logging.getLogger("millrace.scheduler")


class Command(BaseCommand):
    help = (
        "The scheduler loop. Today it runs the orchestrator's reconcile pass (dead workers, "
        "lost tasks, stalled runs); time, event and API triggers join it with the triggers app."
    )

    def add_arguments(self, parser):
        parser.add_argument("--interval", type=float, default=5.0, help="Seconds between ticks.")
        parser.add_argument("--ticks", type=int, default=0, help="Stop after this many ticks (0: run until stopped).")

    def handle(self, *args, **opts):
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        ticks = 0
        while not stopping:
            started = time.monotonic()
            try:
                done = orchestrator.reconcile()
                if any(done.values()):
                    log.info("reconcile: %s", done)
            except Exception:  # a bad tick is logged; the loop must keep going
                log.exception("scheduler tick failed")
            ticks += 1
            if opts["ticks"] and ticks >= opts["ticks"]:
                break
            remaining = opts["interval"] - (time.monotonic() - started)
            while remaining > 0 and not stopping:
                time.sleep(min(remaining, 0.2))
                remaining -= 0.2
