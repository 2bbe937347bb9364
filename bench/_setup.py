"""Shared set-up for the benchmarks: Django on the configured database."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")


def setup() -> None:
    import compileall

    import django

    # What `make install` does: the processes timed here then load the project's
    # bytecode instead of compiling its modules (Python would write it on first use,
    # unless PYTHONDONTWRITEBYTECODE is set).
    for app in ("config", "pipelines", "runs", "triggers", "io_connectors"):
        compileall.compile_dir(ROOT / app, quiet=1)
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)


def vacuum() -> None:
    """On PostgreSQL, VACUUM ANALYZE what the benchmarks churn. Every status change
    leaves a dead row version behind; autovacuum clears them on a normal server, but it
    is off on our development machines, where a day of benchmarks left a hundred
    thousand dead rows under two thousand live ones and made every block slower."""
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
