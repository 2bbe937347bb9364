"""`manage.py qcluster`: django-q2's worker cluster, with Millrace's clean stop and
heartbeat (see `runs.cluster`). It takes the place of django-q2's own command of the
same name (`runs` comes before `django_q` in INSTALLED_APPS)."""

from __future__ import annotations

import os
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = (
        "Start a worker cluster (django-q2) that runs block runs. SIGTERM or SIGINT stops it "
        "cleanly: no new block is taken, running blocks have MILLRACE_SHUTDOWN_GRACE seconds "
        "to finish and are then handed back to run elsewhere; a second signal ends the grace."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--run-once", action="store_true", help="Start, then stop at once (as django-q2's).")
        parser.add_argument(
            "-n", "--name", dest="cluster_name", default=None,
            help="Another queue name than Q_CLUSTER's (django-q2's multi-queue setup).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        settings.SECRET_KEY  # noqa: B018 - signing needs it: fail now, not in a worker
        if options["cluster_name"]:
            os.environ["Q_CLUSTER_NAME"] = options["cluster_name"]
        # Imported here: django_q.cluster sets Django up as it loads, which a command
        # module must not do when Django merely lists the commands.
        from runs import cluster

        code = cluster.run(run_once=options["run_once"])
        if code:
            sys.exit(code)
