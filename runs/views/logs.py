"""The logs page: every log line of a pipeline's runs, newest first, filtered and paged
by a cursor; an HTMX request for the table gets only the table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, render
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_safe
from django_htmx.middleware import HtmxDetails

from pipelines.models import BlockType, Pipeline
from runs.models import LogEntry
from runs.selectors import LOG_LEVELS, LogCursor, LogFilters, pipeline_logs_page

# A message longer than this, or of more lines, is folded in a <details>.
FOLD_CHARS = 400
FOLD_LINES = 4
_MAX_ID = 2**63 - 1  # the databases' integer; a bigger one makes them raise


class UtcDateTimeField(forms.DateTimeField):
    """A datetime-local input, read as UTC whatever the active time zone."""

    def to_python(self, value: Any) -> datetime | None:
        with timezone.override(UTC):
            return super().to_python(value)


class LogFilterForm(forms.Form):
    level = forms.ChoiceField(
        label="Level at least", required=False, choices=[("", "any")] + [(lv, lv) for lv in LOG_LEVELS],
    )
    block_type = forms.ChoiceField(label="Block type", required=False, choices=[("", "any"), *BlockType.choices])
    block_uuid = forms.CharField(label="Block", required=False, max_length=255)
    pipeline_run_id = forms.IntegerField(label="Run id", required=False, min_value=1, max_value=_MAX_ID)
    since = UtcDateTimeField(
        label="From (UTC)", required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": "1"}),
    )
    until = UtcDateTimeField(
        label="To (UTC)", required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": "1"}),
    )
    q = forms.CharField(label="Message contains", required=False, max_length=1000)

    def filters(self) -> LogFilters:
        """The valid filters only: a field that failed validation filters nothing."""
        data = self.cleaned_data if hasattr(self, "cleaned_data") else {}
        return LogFilters(
            min_level=data.get("level") or "",
            block_type=data.get("block_type") or "",
            block_uuid=(data.get("block_uuid") or "").strip(),
            pipeline_run_id=data.get("pipeline_run_id"),
            since=data.get("since"),
            until=data.get("until"),
            q=data.get("q") or "",
        )

    def problems(self) -> list[str]:
        return [
            f"{self.fields[name].label}: {' '.join(str(e) for e in errors)} This filter is ignored."
            for name, errors in self.errors.items()
        ]


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


@dataclass
class LogRow:
    entry: LogEntry
    folded: bool
    summary: str


def _row(entry: LogEntry) -> LogRow:
    message = entry.message
    lines = message.split("\n", FOLD_LINES)
    folded = len(message) > FOLD_CHARS or len(lines) > FOLD_LINES
    summary = lines[0][:200] if folded else ""
    return LogRow(entry, folded, summary)


def _link(params: QueryDict, before: str | None) -> str:
    query = params.copy()
    query.pop("before", None)
    if before:
        query["before"] = before
    return f"?{query.urlencode()}" if query else "?"


@require_safe
@login_required
def pipeline_logs(request: HtmxHttpRequest, uuid: str) -> HttpResponse:
    pipeline = get_object_or_404(Pipeline, uuid=uuid)
    form = LogFilterForm(request.GET)
    form.is_valid()
    problems = form.problems()
    cursor = None
    if raw := request.GET.get("before", ""):
        try:
            cursor = LogCursor.decode(raw)
        except ValueError:
            problems.append("Older than: this page link is not valid; showing the newest lines.")
    entries, next_cursor = pipeline_logs_page(pipeline.pk, form.filters(), before=cursor)
    context = {
        "pipeline": pipeline,
        "tab": "logs",
        "form": form,
        "rows": [_row(entry) for entry in entries],
        "problems": problems,
        "filtered": any(form.data.get(name) for name in form.fields),
        "older_url": _link(request.GET, next_cursor.encode()) if next_cursor else "",
        "newest_url": _link(request.GET, None) if cursor else "",
    }
    # A history restore asks for the whole page, though it comes from htmx.
    partial = bool(request.htmx) and not request.htmx.history_restore_request and not request.htmx.boosted
    template = "runs/partials/_logs_table.html" if partial else "runs/logs.html"
    response = render(request, template, context)
    patch_vary_headers(response, ["HX-Request"])
    return response


urlpatterns: list[URLPattern] = [
    path("pipelines/<slug:uuid>/logs", pipeline_logs, name="pipeline-logs"),
]
