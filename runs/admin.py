"""Admin for runs, block runs and logs: read-only. Statuses change only in
`runs.orchestrator`, so nothing here writes a run; operations on runs (retry, cancel)
are admin actions that call the run services.

The lists must stay fast with 100k runs and millions of log lines: no per-row queries
(counts are correlated subqueries, evaluated only for the rows of the page), no full
result count, no filter whose choices come from a DISTINCT over a big table.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import ShowFacets
from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from config.common.permissions import EDITORS_GROUP, user_can_edit
from pipelines.admin import ViewOnly, json_pre
from pipelines.models import BlockType, Pipeline
from runs import services
from runs.models import BlockRun, BlockRunStatus, Heartbeat, LogEntry, PipelineRun, RunAction

LOG_TAIL_LINES = 200
# A fan-out can give a run thousands of block runs; the run page shows the first ones
# and links to the full, paginated list.
BLOCK_RUNS_SHOWN = 500
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_MESSAGE_CHARS = 2000


def _link(viewname: str, pk: Any, text: Any) -> str:
    return format_html('<a href="{}">{}</a>', reverse(viewname, args=[pk]), text)


def _pre(text: str) -> str:
    if not text:
        return "-"
    return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', text)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _count_block_runs(**filters: Any) -> Coalesce:
    rows = (
        BlockRun.objects.filter(pipeline_run=OuterRef("pk"), **filters)
        .order_by().values("pipeline_run").annotate(n=Count("id")).values("n")
    )
    return Coalesce(Subquery(rows, output_field=IntegerField()), 0)


class ReadOnlyAdmin(ViewOnly, admin.ModelAdmin):
    """View-only in the admin. Actions that operate on rows (retry, cancel) are
    declared with `@admin.action(permissions=["operate"])` and a
    `has_operate_permission` method, so they do not depend on the change permission
    that stays off here. Deleting is off too: old runs are to be removed by
    `manage.py prune_runs` (to come), never one by one while a worker may be writing them."""


class _ValueFilter(admin.SimpleListFilter):
    """A filter on one exact value given in the URL (links from the run page), showing
    only the chosen value: listing every run or block uuid would mean a DISTINCT over
    millions of rows."""

    field_name = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = self.value()
        return [(value, value)] if value else []

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        return queryset.filter(**{self.field_name: value}) if value else queryset


class RunIdFilter(_ValueFilter):
    title = "pipeline run"
    parameter_name = "pipeline_run"
    field_name = "pipeline_run_id"

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value and not value.isdigit():
            return queryset.none()
        return super().queryset(request, queryset)


class BlockUuidFilter(_ValueFilter):
    title = "block"
    parameter_name = "block_uuid"
    field_name = "block_uuid"


class BlockTypeFilter(admin.SimpleListFilter):
    title = "block type"
    parameter_name = "block_type"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Any:
        return BlockType.choices

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        return queryset.filter(block_type=value) if value else queryset


class LevelFilter(admin.SimpleListFilter):
    title = "level"
    parameter_name = "level"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        levels = list(LOG_LEVELS)
        value = self.value()
        if value and value not in levels:
            levels.append(value)
        return [(level, level) for level in levels]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        return queryset.filter(level=value) if value else queryset


class _FirstRowsFormSet(BaseInlineFormSet):
    limit = BLOCK_RUNS_SHOWN

    def get_queryset(self) -> QuerySet:
        if not hasattr(self, "_limited"):
            self._limited = super().get_queryset()[: self.limit]
        return self._limited


class BlockRunInline(ViewOnly, admin.TabularInline):
    model = BlockRun
    formset = _FirstRowsFormSet
    fields = ("block_link", "block_type", "status", "attempt", "started_at", "completed_at", "duration", "error_short")
    readonly_fields = fields
    ordering = ("id",)
    extra = 0
    can_delete = False
    verbose_name_plural = f"block runs (the first {BLOCK_RUNS_SHOWN})"


    @admin.display(description="block")
    def block_link(self, br: BlockRun) -> str:
        label = br.block_uuid if br.dynamic_index is None else f"{br.block_uuid}[{br.dynamic_index}]"
        return _link("admin:runs_blockrun_change", br.pk, label)

    @admin.display(description="duration")
    def duration(self, br: BlockRun) -> str:
        return _seconds(br.duration)

    @admin.display(description="error")
    def error_short(self, br: BlockRun) -> str:
        return br.error[:200] if br.error else "-"


class RunActionInline(ViewOnly, admin.TabularInline):
    """The run's audit trail: who retried or cancelled it, when, and what changed."""

    model = RunAction
    # `detail` through json_pre: Django's own display of a JSON field fails the page
    # on a lone surrogate stored before jsonsafe refused them.
    fields = ("created_at", "action", "user", "detail_pre")
    readonly_fields = fields
    extra = 0
    verbose_name = "operation"
    verbose_name_plural = "audit trail"

    @admin.display(description="detail")
    def detail_pre(self, action: RunAction) -> str:
        return json_pre(action.detail)


@admin.register(PipelineRun)
class PipelineRunAdmin(ReadOnlyAdmin):
    list_display = (
        "id", "pipeline", "status", "run_type", "execution_date", "started_at", "completed_at",
        "duration", "blocks", "passed_sla", "created_at",
    )
    list_display_links = ("id",)
    # A created_at filter instead of date_hierarchy: Django builds the hierarchy with a
    # DISTINCT over the dates of every listed run (a cost that grows with the table);
    # these choices cost no query and use the created_at index.
    list_filter = ("status", "run_type", "pipeline", ("created_at", admin.DateFieldListFilter), "passed_sla")
    list_select_related = ("pipeline",)
    search_fields = ("pipeline__uuid",)  # see get_search_results
    search_help_text = "A run id, or part of a pipeline uuid."
    show_full_result_count = False
    list_per_page = 50
    fieldsets = (
        (None, {"fields": (
            "id", "pipeline_link", "status", "run_type", "execution_date", "created_by",
            "started_at", "completed_at", "duration", "passed_sla",
            "waiting_for_slot", "created_at", "updated_at",
        )}),
        ("Variables, event and metrics", {"fields": ("variables_pre", "event_pre", "metrics_pre")}),
        (f"Logs (the last {LOG_TAIL_LINES} lines)", {"fields": ("log_tail",)}),
    )
    readonly_fields = (
        "id", "pipeline_link", "status", "run_type", "execution_date", "created_by",
        "started_at", "completed_at", "duration", "passed_sla", "waiting_for_slot", "created_at",
        "updated_at", "variables_pre", "event_pre", "metrics_pre", "log_tail",
    )
    inlines = (BlockRunInline, RunActionInline)
    actions = ("retry_runs", "retry_incomplete_of_pipelines", "cancel_runs", "cancel_running_of_pipelines")

    def has_operate_permission(self, request: HttpRequest) -> bool:
        """Superusers, editors, and staff given the change permission on runs; a staff
        member with only the view permission is a viewer here."""
        user = request.user
        return user_can_edit(user) and (
            user.is_superuser or user.has_perm("runs.change_pipelinerun") or user.groups.filter(name=EDITORS_GROUP).exists()
        )

    def _report(self, request: HttpRequest, result: services.BatchResult, verb: str) -> None:
        level = messages.WARNING if result.refused else messages.SUCCESS
        self.message_user(request, result.summary(verb), level)

    @admin.action(description="Retry the selected runs", permissions=["operate"])
    def retry_runs(self, request: HttpRequest, queryset: QuerySet[PipelineRun]) -> None:
        ids = list(queryset.order_by("created_at", "id").values_list("id", flat=True))
        self._report(request, services.runs_retry(ids, user=request.user), "Retried")

    @admin.action(description="Retry incomplete blocks of every failed or cancelled run of their pipelines", permissions=["operate"])
    def retry_incomplete_of_pipelines(self, request: HttpRequest, queryset: QuerySet[PipelineRun]) -> None:
        for pipeline in Pipeline.objects.filter(id__in=queryset.values("pipeline_id")):
            self._report(request, services.pipeline_retry_incomplete(pipeline, user=request.user), f"{pipeline.uuid}: retried")

    @admin.action(description="Cancel the selected runs", permissions=["operate"])
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[PipelineRun]) -> None:
        ids = list(queryset.order_by("created_at", "id").values_list("id", flat=True))
        self._report(request, services.runs_cancel(ids, user=request.user), "Cancelled")

    @admin.action(description="Cancel every running run of their pipelines", permissions=["operate"])
    def cancel_running_of_pipelines(self, request: HttpRequest, queryset: QuerySet[PipelineRun]) -> None:
        for pipeline in Pipeline.objects.filter(id__in=queryset.values("pipeline_id")):
            self._report(request, services.pipeline_cancel_running(pipeline, user=request.user), f"{pipeline.uuid}: cancelled")

    def get_queryset(self, request: HttpRequest) -> QuerySet[PipelineRun]:
        return super().get_queryset(request).annotate(
            n_blocks=_count_block_runs(),
            n_completed=_count_block_runs(status=BlockRunStatus.COMPLETED),
            n_failed=_count_block_runs(status=BlockRunStatus.FAILED),
        )

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        """A number is a run id (the primary key: the admin's `=id` compares text and
        scans every run); any term also matches part of a pipeline uuid. The pipelines
        are looked up first, in their small table, and their ids inlined: a subquery
        there made PostgreSQL filter all 100k runs row by row when nothing matched."""
        term = search_term.strip().lstrip("#")
        if not term:
            return queryset, False
        pipeline_ids = list(Pipeline.objects.filter(uuid__icontains=term).values_list("id", flat=True))
        matches = Q(pipeline_id__in=pipeline_ids)
        if term.isdigit():
            matches |= Q(pk=int(term))
        return queryset.filter(matches), False

    @admin.display(description="blocks")
    def blocks(self, run: PipelineRun) -> str:
        text = f"{run.n_completed}/{run.n_blocks} completed"  # type: ignore[attr-defined]
        if run.n_failed:  # type: ignore[attr-defined]
            text += f", {run.n_failed} failed"  # type: ignore[attr-defined]
        return text

    @admin.display(description="duration")
    def duration(self, run: PipelineRun) -> str:
        return _seconds(run.duration)

    @admin.display(description="pipeline")
    def pipeline_link(self, run: PipelineRun) -> str:
        return _link("admin:pipelines_pipeline_change", run.pipeline_id, run.pipeline.uuid)

    @admin.display(description="variables")
    def variables_pre(self, run: PipelineRun) -> str:
        return json_pre(run.variables)

    @admin.display(description="event")
    def event_pre(self, run: PipelineRun) -> str:
        return json_pre(run.event)

    @admin.display(description="metrics")
    def metrics_pre(self, run: PipelineRun) -> str:
        return json_pre(run.metrics)

    @admin.display(description="log")
    def log_tail(self, run: PipelineRun) -> str:
        """The last lines only (the newest by id, through the (run, id) index): a run
        can log millions of lines. The full log is the LogEntry list, filtered."""
        rows = list(
            LogEntry.objects.filter(pipeline_run=run).order_by("-id")
            .values_list("timestamp", "level", "block_uuid", "message")[:LOG_TAIL_LINES]
        )
        rows.reverse()
        url = reverse("admin:runs_logentry_changelist") + f"?pipeline_run={run.pk}"
        link = format_html('<p><a href="{}">All log lines of this run</a></p>', url)
        if not rows:
            return format_html("{}<p>No log lines.</p>", link)
        lines = "\n".join(
            f"{ts:%Y-%m-%d %H:%M:%S} {level:<8} {('[' + block + '] ') if block else ''}{message[:_LOG_MESSAGE_CHARS]}"
            for ts, level, block, message in rows
        )
        return format_html("{}{}", link, _pre(lines))


@admin.register(BlockRun)
class BlockRunAdmin(ReadOnlyAdmin):
    list_display = (
        "id", "block_uuid", "block_type", "status", "attempt", "run_link", "pipeline",
        "started_at", "completed_at", "duration", "worker",
    )
    list_display_links = ("id", "block_uuid")
    list_filter = ("status", BlockTypeFilter, ("created_at", admin.DateFieldListFilter), RunIdFilter, BlockUuidFilter)
    list_select_related = ("pipeline_run__pipeline",)
    search_fields = ("block_uuid",)  # see get_search_results
    search_help_text = "A run id, or part of a block uuid."
    show_full_result_count = False
    show_facets = ShowFacets.NEVER
    list_per_page = 50
    ordering = ("-id",)
    fieldsets = (
        (None, {"fields": (
            "id", "run_link", "pipeline", "block_uuid", "block_type", "status", "attempt",
            "dynamic_parent_link", "dynamic_index", "worker", "code_hash",
            "queued_at", "started_at", "completed_at", "heartbeat_at", "next_retry_at", "duration",
        )}),
        ("Error", {"fields": ("error_pre", "traceback_pre", "attempts_pre")}),
        ("Outputs and metrics", {"fields": ("outputs_pre", "metrics_pre", "logs_link")}),
        ("Timestamps", {"fields": ("created_at", "updated_at")}),
    )
    readonly_fields = (
        "id", "run_link", "pipeline", "block_uuid", "block_type", "status", "attempt",
        "dynamic_parent_link", "dynamic_index", "worker", "code_hash", "queued_at", "started_at",
        "completed_at", "heartbeat_at", "next_retry_at", "duration", "error_pre", "traceback_pre", "attempts_pre", "outputs_pre",
        "metrics_pre", "logs_link", "created_at", "updated_at",
    )

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        """A number is a run id (through the (run, status) index); other terms match
        part of a block uuid, which reads every block run: filter by run first."""
        term = search_term.strip().lstrip("#")
        if not term:
            return queryset, False
        if term.isdigit():
            return queryset.filter(pipeline_run_id=int(term)), False
        return queryset.filter(block_uuid__icontains=term), False

    @admin.display(description="run", ordering="pipeline_run_id")
    def run_link(self, br: BlockRun) -> str:
        return _link("admin:runs_pipelinerun_change", br.pipeline_run_id, f"#{br.pipeline_run_id}")

    @admin.display(description="pipeline")
    def pipeline(self, br: BlockRun) -> str:
        return br.pipeline_run.pipeline.uuid

    @admin.display(description="duration")
    def duration(self, br: BlockRun) -> str:
        return _seconds(br.duration)

    @admin.display(description="dynamic parent")
    def dynamic_parent_link(self, br: BlockRun) -> str:
        if br.dynamic_parent_id is None:
            return "-"
        return _link("admin:runs_blockrun_change", br.dynamic_parent_id, f"#{br.dynamic_parent_id}")

    @admin.display(description="error")
    def error_pre(self, br: BlockRun) -> str:
        return _pre(br.error)

    @admin.display(description="traceback")
    def traceback_pre(self, br: BlockRun) -> str:
        return _pre(br.traceback)

    @admin.display(description="earlier attempts")
    def attempts_pre(self, br: BlockRun) -> str:
        return json_pre(br.attempts)

    @admin.display(description="outputs")
    def outputs_pre(self, br: BlockRun) -> str:
        return json_pre(br.outputs)

    @admin.display(description="metrics")
    def metrics_pre(self, br: BlockRun) -> str:
        return json_pre(br.metrics)

    @admin.display(description="logs")
    def logs_link(self, br: BlockRun) -> str:
        url = reverse("admin:runs_logentry_changelist") + f"?pipeline_run={br.pipeline_run_id}&block_uuid={br.block_uuid}"
        link = format_html('<a href="{}">Log lines of this block in this run</a>', url)
        if isinstance(br.metrics, dict) and br.metrics.get("log_file"):
            # Past MILLRACE_LOG_LINES_PER_BLOCK only the head and tail are log lines.
            file_url = reverse("api-block-run-log-file", args=[br.pk])
            left_out = br.metrics.get("log_lines_left_out")
            link += format_html(
                ' &middot; <a href="{}">the whole output</a> ({} lines not stored as log lines)', file_url,
                f"{left_out:,}" if isinstance(left_out, int) else "some",
            )
        return link


@admin.register(Heartbeat)
class HeartbeatAdmin(ReadOnlyAdmin):
    """The worker clusters and schedulers that say they are alive (`manage.py health`
    reads the same rows)."""

    list_display = ("kind", "name", "host", "pid", "started_at", "beat_at", "stopping_since", "info_pre")
    list_filter = ("kind",)
    ordering = ("kind", "host", "pid")

    @admin.display(description="info")
    def info_pre(self, beat: Heartbeat) -> str:
        return json_pre(beat.info)


@admin.register(LogEntry)
class LogEntryAdmin(ReadOnlyAdmin):
    list_display = ("id", "timestamp", "level", "block_uuid", "run_link", "message_short")
    list_display_links = ("id",)
    list_filter = (RunIdFilter, LevelFilter, BlockUuidFilter, ("timestamp", admin.DateFieldListFilter))
    search_fields = ("message",)
    search_help_text = "Words in the message (scans the log: narrow by run first)."
    show_full_result_count = False
    show_facets = ShowFacets.NEVER
    list_per_page = 100
    # Newest first, on the primary key (and the (run, id) index under a run filter).
    ordering = ("-id",)
    fields = ("id", "run_link", "block_run_link", "block_uuid", "block_type", "timestamp", "level", "message_pre")
    readonly_fields = fields

    @admin.display(description="run", ordering="pipeline_run_id")
    def run_link(self, entry: LogEntry) -> str:
        return _link("admin:runs_pipelinerun_change", entry.pipeline_run_id, f"#{entry.pipeline_run_id}")

    @admin.display(description="block run")
    def block_run_link(self, entry: LogEntry) -> str:
        if entry.block_run_id is None:
            return "-"
        return _link("admin:runs_blockrun_change", entry.block_run_id, f"#{entry.block_run_id}")

    @admin.display(description="message")
    def message_short(self, entry: LogEntry) -> str:
        return entry.message if len(entry.message) <= 200 else entry.message[:200] + "…"

    @admin.display(description="message")
    def message_pre(self, entry: LogEntry) -> str:
        return _pre(entry.message)

