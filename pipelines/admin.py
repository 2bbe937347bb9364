"""Admin for pipeline definitions. Every write goes through `pipelines.services` (via
the forms in `pipelines.forms`), so the admin refuses bad code and cycles exactly as the
API and the import do."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.db import models
from django.db.models import Count, Prefetch, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from pipelines import services
from pipelines.forms import BlockAdminForm, BlockEdgeAdminForm, PipelineAdminForm
from pipelines.models import Block, BlockEdge, Pipeline
from pipelines.selectors import block_upstream_uuids


def _block_link(block: Block) -> str:
    return format_html('<a href="{}">{}</a>', reverse("admin:pipelines_block_change", args=[block.pk]), block.uuid)


def _upstream_edges_prefetch() -> Prefetch:
    """One query for the upstreams of every listed block, in edge order."""
    return Prefetch(
        "upstream_edges",
        queryset=BlockEdge.objects.select_related("upstream").order_by("position"),
    )


def _edge_delete(edge: BlockEdge) -> None:
    """Remove one edge by setting the downstream block's upstreams again without it, so
    the remaining edges are renumbered by the service."""
    downstream = edge.downstream
    services.block_set_upstreams(downstream, [u for u in block_upstream_uuids(downstream) if u != edge.upstream.uuid])


def _upstream_list(block: Block) -> str:
    # Reads the prefetched edges; `.all()` keeps the prefetch's ordering.
    return ", ".join(edge.upstream.uuid for edge in block.upstream_edges.all()) or "-"


def json_text(value: Any) -> str:
    """A JSON value as indented text for a page, whatever was stored: NaN shows as
    NaN, and a lone surrogate (stored before config.common.jsonsafe refused them; no
    page can be encoded with one) as its `\\ud800` escape."""
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, indent=2, sort_keys=True, default=str)
    return text


def json_pre(value: Any) -> str:
    if value in (None, {}, [], ""):
        return "-"
    return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', json_text(value))


_SHOWN = "_shown"


if TYPE_CHECKING:
    # What SafeJSONReadOnly is mixed into, so that its calls to the ModelAdmin's
    # methods type-check; at run time the mixin's base is object.
    _ModelAdminBase = admin.ModelAdmin[Any]
else:
    _ModelAdminBase = object


class SafeJSONReadOnly(_ModelAdminBase):
    """Django shows a JSON field of a read-only change page (a viewer's, a backfill's)
    with `json.dumps(ensure_ascii=False)`, and a lone surrogate stored before jsonsafe
    existed then fails the whole page. On such a page each JSON field is shown by
    `json_pre` instead, under its own label (`<name>_shown` in the fieldsets)."""

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or self.has_change_permission(request, obj):
            return fieldsets
        names = _json_field_names(self.model)
        return [(title, {**options, "fields": _swap(options["fields"], names)}) for title, options in fieldsets]

    def __getattr__(self, name: str) -> Callable[[Any], str]:
        base = name.removesuffix(_SHOWN)
        if base != name and base in _json_field_names(self.model):
            field = next(f for f in self.model._meta.concrete_fields if f.name == base)

            @admin.display(description=field.verbose_name)
            def shown(obj: Any) -> str:
                return json_pre(getattr(obj, base))

            return shown
        raise AttributeError(name)


def _json_field_names(model: type[models.Model]) -> frozenset[str]:
    return frozenset(f.name for f in model._meta.concrete_fields if isinstance(f, models.JSONField))


def _swap(fields: Sequence[Any], names: frozenset[str]) -> list[Any]:
    return [
        f"{f}{_SHOWN}" if isinstance(f, str) and f in names
        else _swap(f, names) if isinstance(f, list | tuple) else f
        for f in fields
    ]


class ViewOnly:
    """Shown, never added, changed or deleted from this admin page."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class BlockInline(ViewOnly, admin.TabularInline):
    """The pipeline's blocks, read-only: a block is edited on its own page, where its
    code and edges are validated by the service."""

    model = Block
    fields = ("block_link", "name", "type", "language", "position", "upstream_list")
    readonly_fields = fields
    ordering = ("position", "id")
    extra = 0
    can_delete = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Block]:
        return super().get_queryset(request).prefetch_related(_upstream_edges_prefetch())


    @admin.display(description="uuid")
    def block_link(self, block: Block) -> str:
        return _block_link(block)

    @admin.display(description="upstream blocks")
    def upstream_list(self, block: Block) -> str:
        return _upstream_list(block)


@admin.register(Pipeline)
class PipelineAdmin(SafeJSONReadOnly, admin.ModelAdmin):
    form = PipelineAdminForm
    list_display = ("uuid", "name", "type", "block_count", "updated_at")
    list_filter = ("type",)
    search_fields = ("uuid", "name")
    readonly_fields = ("add_block_link", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("uuid", "name", "description", "tags", "type")}),
        ("Execution", {"fields": (
            "variables", "concurrency_config", "retry_config",
            "cache_block_output_in_memory", "run_pipeline_in_one_process",
        )}),
        ("Notifications and extra keys", {"classes": ("collapse",), "fields": ("notification_config", "extra")}),
        ("Blocks", {"fields": ("add_block_link",)}),
        ("Timestamps", {"fields": ("created_at", "updated_at")}),
    )
    inlines = (BlockInline,)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Pipeline]:
        return super().get_queryset(request).annotate(block_count=Count("blocks"))

    def get_readonly_fields(self, request: HttpRequest, obj: Pipeline | None = None) -> tuple[str, ...]:
        # The uuid is the public id (URLs, Mage folders): fixed once created.
        return (*self.readonly_fields, "uuid") if obj else self.readonly_fields

    def get_inlines(self, request: HttpRequest, obj: Pipeline | None) -> tuple[type, ...]:
        return self.inlines if obj else ()

    @admin.display(description="blocks", ordering="block_count")
    def block_count(self, pipeline: Pipeline) -> int:
        return pipeline.block_count  # type: ignore[attr-defined]

    @admin.display(description="add a block")
    def add_block_link(self, pipeline: Pipeline) -> str:
        if not pipeline.pk:
            return "Save the pipeline first."
        url = reverse("admin:pipelines_block_add") + f"?pipeline={pipeline.pk}"
        return format_html('<a class="addlink" href="{}">Add a block to {}</a>', url, pipeline.uuid)

    def save_model(self, request: HttpRequest, obj: Pipeline, form: PipelineAdminForm, change: bool) -> None:
        form.save_with_service(obj, change=change)

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        # The blocks inline is read-only: commit=False records what changed (nothing)
        # for the history message and writes no block around its service.
        formset.save(commit=False)


@admin.register(Block)
class BlockAdmin(SafeJSONReadOnly, admin.ModelAdmin):
    form = BlockAdminForm
    list_display = ("uuid", "pipeline", "type", "language", "position", "upstream_list", "updated_at")
    list_filter = ("type", "language", "pipeline")
    list_select_related = ("pipeline",)
    search_fields = ("uuid", "name", "pipeline__uuid")
    readonly_fields = ("content_hash", "downstream_list", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("pipeline", "uuid", "name", "type", "language", "position")}),
        ("Code", {"fields": ("content", "content_hash")}),
        ("Edges", {"fields": ("upstream_blocks", "downstream_list")}),
        ("Settings", {"fields": ("configuration", "retry_config", "timeout", "extra")}),
        ("Timestamps", {"fields": ("created_at", "updated_at")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Block]:
        return super().get_queryset(request).prefetch_related(_upstream_edges_prefetch())

    def get_readonly_fields(self, request: HttpRequest, obj: Block | None = None) -> tuple[str, ...]:
        # block_update changes neither: a block's uuid is its name in edges and runs.
        return (*self.readonly_fields, "pipeline", "uuid") if obj else self.readonly_fields

    @admin.display(description="upstream blocks")
    def upstream_list(self, block: Block) -> str:
        return _upstream_list(block)

    @admin.display(description="downstream blocks")
    def downstream_list(self, block: Block) -> str:
        if not block.pk:
            return "-"
        edges = BlockEdge.objects.filter(upstream=block).select_related("downstream").order_by("downstream__position")
        return format_html_join(", ", "{}", ((_block_link(e.downstream),) for e in edges)) or "-"

    def save_model(self, request: HttpRequest, obj: Block, form: BlockAdminForm, change: bool) -> None:
        # The block and its upstream edges are written together by the service.
        form.save_with_service(obj, change=change)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        # The edges were saved with the block by the service (`upstreams` is a
        # through-model relation, not a form field); there is no inline.
        pass

    def delete_model(self, request: HttpRequest, obj: Block) -> None:
        services.block_delete(obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Block]) -> None:
        for block in queryset:
            services.block_delete(block)


@admin.register(BlockEdge)
class BlockEdgeAdmin(admin.ModelAdmin):
    """Edges one by one. Adding or deleting one sets the downstream block's upstreams
    again through the service (cycle check, order); an edge is never changed in place:
    the downstream block's page edits the whole ordered list."""

    form = BlockEdgeAdminForm
    list_display = ("id", "pipeline", "upstream_uuid", "downstream_link", "position")
    list_filter = ("downstream__pipeline",)
    list_select_related = ("downstream__pipeline", "upstream")
    search_fields = ("downstream__uuid", "upstream__uuid", "downstream__pipeline__uuid")

    def get_fields(self, request: HttpRequest, obj: BlockEdge | None = None) -> tuple[str, ...]:
        return ("pipeline", "upstream", "downstream_link", "position") if obj else ("downstream", "upstream", "position")

    def get_readonly_fields(self, request: HttpRequest, obj: BlockEdge | None = None) -> tuple[str, ...]:
        return self.get_fields(request, obj) if obj else ()

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="pipeline", ordering="downstream__pipeline__uuid")
    def pipeline(self, edge: BlockEdge) -> str:
        return edge.downstream.pipeline.uuid

    @admin.display(description="upstream", ordering="upstream__uuid")
    def upstream_uuid(self, edge: BlockEdge) -> str:
        return edge.upstream.uuid

    @admin.display(description="downstream (edit its upstreams)", ordering="downstream__uuid")
    def downstream_link(self, edge: BlockEdge) -> str:
        return _block_link(edge.downstream)

    def save_model(self, request: HttpRequest, obj: BlockEdge, form: BlockEdgeAdminForm, change: bool) -> None:
        form.save_with_service(obj)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        pass  # no inline, no many-to-many: the service wrote the edges

    def delete_model(self, request: HttpRequest, obj: BlockEdge) -> None:
        _edge_delete(obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[BlockEdge]) -> None:
        for edge in queryset.select_related("downstream", "upstream"):
            _edge_delete(edge)
