"""URL patterns in Mage's spelling, shared by every app's `urls.py`."""

from __future__ import annotations

from typing import Any

from django.urls import URLPattern, path


def mage_route(route: str, view: Any, name: str) -> list[URLPattern]:
    """`route` with and without a trailing slash, both answered by `view`; the name is on
    the spelling without (Mage's).

    Mage's clients call `/api/pipeline_runs/1`; Django's habit is a trailing slash. Both
    answer, with no redirect (a redirected POST loses its body)."""
    return [path(route, view, name=name), path(f"{route}/", view)]
