"""Admin for triggers, backfills and events. Every write goes through `triggers.services`
(the forms validate with the same function that saves), so the admin refuses a bad cron
or a negative timeout exactly as the API does, on the field that is wrong."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from pipelines.admin import SafeJSONReadOnly, ViewOnly, json_pre
from pipelines.forms import add_service_errors, copy_saved, json_field_classes
from runs.models import PipelineRun
from triggers import schedule, services
from triggers.models import Backfill, Event, Trigger

UPCOMING_SHOWN = 5


def _json_default(cleaned: dict[str, Any], names: tuple[str, ...]) -> None:
    """An emptied JSON box means "nothing", not SQL NULL in a NOT NULL column."""
    for name in names:
        if name in cleaned and cleaned[name] is None:
            cleaned[name] = {}


# --- triggers ------------------------------------------------------------------------------

class TriggerAdminForm(forms.ModelForm):
    class Meta:
        model = Trigger
        fields = services.TRIGGER_FIELDS
        field_classes = json_field_classes(Trigger)

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        _json_default(cleaned, ("variables", "settings", "event_matcher"))
        if not self.errors:
            try:
                services.validate_trigger_fields(self._all_fields())
            except ValidationError as exc:
                add_service_errors(self, exc)
        return cleaned

    def _all_fields(self) -> dict[str, Any]:
        current = {name: getattr(self.instance, name, None) for name in services.TRIGGER_FIELDS}
        if self.instance.pk is None:
            current["pipeline"] = None
        return {**current, **self._given()}

    def _given(self) -> dict[str, Any]:
        return {k: self.cleaned_data[k] for k in services.TRIGGER_FIELDS if k in self.cleaned_data}

    def save_with_service(self, obj: Trigger, *, change: bool, user: Any) -> Trigger:
        if change:
            # The service the API's PUT calls too: fields and status in one validation
            # and one transaction. A fresh copy: the form has already set the new values
            # on `obj`, and the service compares against the stored ones to know what
            # changed.
            saved = services.trigger_update(Trigger.objects.get(pk=obj.pk), **self._given())
        else:
            saved = services.trigger_create(created_by=user, **self._given())
        copy_saved(obj, saved)
        return obj


class HasErrorFilter(admin.SimpleListFilter):
    title = "scheduler error"
    parameter_name = "has_error"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Flagged"), ("no", "Healthy")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.exclude(error="")
        if self.value() == "no":
            return queryset.filter(error="")
        return queryset


@admin.register(Trigger)
class TriggerAdmin(SafeJSONReadOnly, admin.ModelAdmin):
    form = TriggerAdminForm
    list_display = ("name", "pipeline", "schedule_type", "status", "schedule_interval", "timezone", "next_run_at", "short_error")
    list_filter = ("schedule_type", "status", HasErrorFilter, "pipeline")
    list_select_related = ("pipeline",)
    search_fields = ("name", "pipeline__uuid", "schedule_interval")
    actions = ("activate", "pause", "run_now", "rotate_token")
    readonly_fields = ("next_run_at", "last_run_at", "upcoming", "error", "created_by", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("pipeline", "name", "description", "schedule_type", "status")}),
        ("Schedule (time triggers)", {"fields": ("schedule_interval", "timezone", "start_time", "next_run_at", "last_run_at", "upcoming", "error")}),
        ("Event (event triggers)", {"fields": ("event_matcher",)}),
        ("Runs", {"fields": ("variables", "settings")}),
        ("History", {"fields": ("created_by", "created_at", "updated_at")}),
    )

    def get_fieldsets(self, request: HttpRequest, obj: Trigger | None = None) -> Any:
        fieldsets = list(super().get_fieldsets(request, obj))
        if obj is not None and self.has_change_permission(request, obj):
            # The API token is a secret: shown, read-only, to those who may change the
            # trigger (and so rotate it), never to view-only staff.
            fieldsets.insert(1, ("API (api triggers)", {"fields": ("token",)}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Trigger | None = None) -> tuple[str, ...]:
        fields = (*self.readonly_fields, "token")
        # A trigger stays with its pipeline; its runs are that pipeline's.
        return (*fields, "pipeline") if obj else fields

    @admin.display(description="error")
    def short_error(self, trigger: Trigger) -> str:
        return (trigger.error[:80] + "...") if len(trigger.error) > 80 else (trigger.error or "-")

    @admin.display(description=f"next {UPCOMING_SHOWN} fire times (UTC)")
    def upcoming(self, trigger: Trigger) -> str:
        if not trigger.pk or not trigger.is_active or trigger.next_run_at is None:
            return "-"
        if not schedule.is_periodic(trigger.schedule_interval):
            return f"{trigger.next_run_at:%Y-%m-%d %H:%M:%S}"
        after = max(trigger.next_run_at, timezone.now())
        times = [trigger.next_run_at, *schedule.upcoming(
            trigger.schedule_interval, after=after, count=UPCOMING_SHOWN - 1, tz=trigger.timezone, start_time=trigger.start_time,
        )]
        return format_html_join(", ", "{}", ((f"{t:%Y-%m-%d %H:%M}",) for t in times))

    def save_model(self, request: HttpRequest, obj: Trigger, form: TriggerAdminForm, change: bool) -> None:
        form.save_with_service(obj, change=change, user=request.user)

    def delete_model(self, request: HttpRequest, obj: Trigger) -> None:
        services.trigger_delete(obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Trigger]) -> None:
        for trigger in queryset:
            services.trigger_delete(trigger)

    def _each(self, request: HttpRequest, queryset: QuerySet[Trigger], verb: str, call: Any) -> None:
        done, refused = 0, []
        for trigger in queryset.select_related("pipeline"):
            try:
                call(trigger)
                done += 1
            except ValidationError as exc:
                refused.append(f"{trigger.name}: {'; '.join(f'{k}: {v[0]}' for k, v in exc.message_dict.items())}")
        if done:
            self.message_user(request, f"{verb} {done} trigger{'s' if done != 1 else ''}.", messages.SUCCESS)
        for line in refused:
            self.message_user(request, f"Not {verb.lower()}: {line}", messages.ERROR)

    @admin.action(description="Activate the selected triggers", permissions=["change"])
    def activate(self, request: HttpRequest, queryset: QuerySet[Trigger]) -> None:
        self._each(request, queryset, "Activated", services.trigger_activate)

    @admin.action(description="Pause the selected triggers", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet[Trigger]) -> None:
        self._each(request, queryset, "Paused", services.trigger_pause)

    @admin.action(description="Run the selected triggers once now", permissions=["change"])
    def run_now(self, request: HttpRequest, queryset: QuerySet[Trigger]) -> None:
        self._each(request, queryset, "Ran", lambda t: services.trigger_run_now(t, created_by=request.user))

    @admin.action(description="Rotate the API tokens of the selected triggers", permissions=["change"])
    def rotate_token(self, request: HttpRequest, queryset: QuerySet[Trigger]) -> None:
        self._each(request, queryset, "Rotated the token of", services.trigger_rotate_token)


# --- backfills -----------------------------------------------------------------------------

class BackfillAdminForm(forms.ModelForm):
    """Creates a backfill through `backfill_create`; a backfill is never edited."""

    class Meta:
        model = Backfill
        fields = ("pipeline", "name", "start_datetime", "end_datetime", "interval", "timezone", "variables")
        field_classes = json_field_classes(Backfill)
        help_texts = {
            "interval": "@hourly, @daily, @weekly, @monthly or a 5-field cron expression.",
            "start_datetime": "The first logical date (inclusive).",
            "end_datetime": "The last logical date (inclusive).",
        }

    _FIELD_NAMES = {"start": "start_datetime", "end": "end_datetime"}

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        _json_default(cleaned, ("variables",))
        if not self.errors:
            try:
                services.backfill_dates(
                    start=cleaned["start_datetime"], end=cleaned["end_datetime"],
                    interval=cleaned["interval"], timezone=cleaned.get("timezone") or "UTC",
                )
                services.validate_json_object("variables", cleaned.get("variables"))
            except ValidationError as exc:
                add_service_errors(self, ValidationError(
                    {self._FIELD_NAMES.get(k, k): v for k, v in exc.error_dict.items()}
                ))
        return cleaned

    def save_with_service(self, obj: Backfill, user: Any) -> Backfill:
        data = self.cleaned_data
        saved = services.backfill_create(
            pipeline=data["pipeline"], name=data.get("name") or "", start=data["start_datetime"], end=data["end_datetime"],
            interval=data["interval"], timezone=data.get("timezone") or "UTC", variables=data.get("variables") or {},
            created_by=user,
        )
        copy_saved(obj, saved)
        return obj


def _finished_runs() -> Coalesce:
    rows = (
        PipelineRun.objects.filter(backfill=OuterRef("pk"), status__in=["completed", "failed", "cancelled"])
        .order_by().values("backfill").annotate(n=Count("id")).values("n")
    )
    return Coalesce(Subquery(rows, output_field=IntegerField()), 0)


@admin.register(Backfill)
class BackfillAdmin(SafeJSONReadOnly, admin.ModelAdmin):
    form = BackfillAdminForm
    list_display = ("id", "name", "pipeline", "interval", "timezone", "start_datetime", "end_datetime", "status", "progress", "created_at")
    list_display_links = ("id", "name")
    list_filter = ("status",)
    list_select_related = ("pipeline",)
    search_fields = ("name", "pipeline__uuid")
    actions = ("cancel",)
    readonly_fields = ("status", "total_runs", "progress", "runs_link", "created_by", "created_at", "completed_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Backfill]:
        return super().get_queryset(request).annotate(finished=_finished_runs())

    def get_fields(self, request: HttpRequest, obj: Backfill | None = None) -> tuple[str, ...]:
        return BackfillAdminForm.Meta.fields if obj is None else (*BackfillAdminForm.Meta.fields, *self.readonly_fields)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The page of an existing backfill is read-only; the list-level change permission
        # still allows the cancel action.
        return obj is None and super().has_change_permission(request, obj)

    @admin.display(description="finished / runs")
    def progress(self, backfill: Backfill) -> str:
        return f"{getattr(backfill, 'finished', 0)} / {backfill.total_runs}"

    @admin.display(description="runs")
    def runs_link(self, backfill: Backfill) -> str:
        url = reverse("admin:runs_pipelinerun_changelist") + f"?backfill__id__exact={backfill.pk}"
        return format_html('<a href="{}">The {} runs of this backfill</a>', url, backfill.total_runs)

    def save_model(self, request: HttpRequest, obj: Backfill, form: BackfillAdminForm, change: bool) -> None:
        form.save_with_service(obj, request.user)

    @admin.action(description="Cancel the selected backfills (their unfinished runs)", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Backfill]) -> None:
        total = sum(services.backfill_cancel(backfill) for backfill in queryset)
        self.message_user(request, f"Cancelled {total} run{'s' if total != 1 else ''}.", messages.SUCCESS)


# --- events --------------------------------------------------------------------------------

@admin.register(Event)
class EventAdmin(ViewOnly, admin.ModelAdmin):
    list_display = ("id", "source", "name", "created_at", "run_count")
    search_fields = ("source", "name")
    fields = ("source", "name", "created_by", "created_at", "payload_pre", "run_list")
    readonly_fields = fields
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Event]:
        return super().get_queryset(request).annotate(n_runs=Count("runs"))

    @admin.display(description="runs", ordering="n_runs")
    def run_count(self, event: Event) -> int:
        return event.n_runs  # type: ignore[attr-defined]

    @admin.display(description="payload")
    def payload_pre(self, event: Event) -> str:
        return json_pre(event.payload)

    @admin.display(description="runs it started")
    def run_list(self, event: Event) -> str:
        runs = event.runs.select_related("pipeline", "trigger").order_by("id")
        rows = (
            (reverse("admin:runs_pipelinerun_change", args=[r.pk]), r.pk, r.pipeline.uuid, r.trigger.name if r.trigger else "-", r.status)
            for r in runs
        )
        return format_html_join(mark_safe("<br>"), '<a href="{}">run {}</a> of {} (trigger {}): {}', rows) or "-"
