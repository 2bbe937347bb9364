"""Read-only API over pipeline runs, in Mage's names (`pipeline_runs`, `block_runs`).

`runs` knows nothing of `triggers`: the trigger that started a run is its `trigger_id`
column, shown as Mage's `pipeline_schedule_id`.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from django.db.models import Prefetch, QuerySet
from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, generics, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.common.api import ErrorSerializer, envelope, envelope_schema
from config.common.permissions import CanView
from pipelines import variables
from runs.models import BlockRun, PipelineRun, PipelineRunStatus, RunType
from runs.selectors import pipeline_runs_list


class BlockRunBriefSerializer(serializers.ModelSerializer):
    class Meta:
        model = BlockRun
        fields = ["id", "block_uuid", "status", "attempt", "started_at", "completed_at", "error"]
        read_only_fields = fields


class PipelineRunCreatedSerializer(serializers.ModelSerializer):
    """The run an API trigger started: its id, status, pipeline, execution date,
    variables and schedule."""

    # The API trigger's caller holds only a token: it learns this much and no more.

    pipeline_uuid = serializers.CharField(source="pipeline.uuid", read_only=True)
    pipeline_schedule_id = serializers.IntegerField(source="trigger_id", read_only=True, allow_null=True)

    class Meta:
        model = PipelineRun
        fields = [
            "id", "status", "pipeline_uuid", "execution_date", "variables",
            "pipeline_schedule_id", "created_at",
        ]
        read_only_fields = fields


class PipelineRunSerializer(serializers.ModelSerializer):
    pipeline_uuid = serializers.CharField(source="pipeline.uuid", read_only=True)
    pipeline_schedule_id = serializers.IntegerField(source="trigger_id", read_only=True, allow_null=True)
    backfill_id = serializers.IntegerField(read_only=True, allow_null=True)

    class Meta:
        model = PipelineRun
        fields = [
            "id", "pipeline_uuid", "pipeline_schedule_id", "backfill_id", "status", "run_type",
            "execution_date", "variables", "event", "started_at", "completed_at", "passed_sla",
            "created_at", "updated_at",
        ]
        read_only_fields = fields


class PipelineRunDetailSerializer(PipelineRunSerializer):
    block_runs = BlockRunBriefSerializer(many=True, read_only=True)

    class Meta(PipelineRunSerializer.Meta):
        fields = [*PipelineRunSerializer.Meta.fields, "block_runs"]
        read_only_fields = fields


class _IntegerFilter(django_filters.Filter):
    # django-filter's NumberFilter takes decimals; an id is an integer or an error.
    field_class = forms.IntegerField


class PipelineRunFilter(django_filters.FilterSet):
    pipeline_uuid = django_filters.CharFilter(field_name="pipeline__uuid")
    status = django_filters.ChoiceFilter(choices=PipelineRunStatus.choices)
    run_type = django_filters.ChoiceFilter(choices=RunType.choices)
    pipeline_schedule_id = _IntegerFilter(field_name="trigger_id")

    class Meta:
        model = PipelineRun
        fields: list[str] = []


class PipelineRunList(generics.ListAPIView):
    """Pipeline runs, newest first, filtered by
    `?pipeline_uuid=&status=&run_type=&pipeline_schedule_id=` and paginated with
    `?_limit=&_offset=`."""

    permission_classes = [CanView]
    serializer_class = PipelineRunSerializer
    filterset_class = PipelineRunFilter
    envelope_many = "pipeline_runs"

    def get_queryset(self) -> QuerySet[PipelineRun]:
        return pipeline_runs_list()

    @extend_schema(responses=envelope_schema("pipeline_runs", PipelineRunSerializer, many=True))
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class PipelineRunDetail(generics.RetrieveAPIView):
    """One pipeline run, with its block runs."""

    permission_classes = [CanView]
    serializer_class = PipelineRunDetailSerializer

    def get_queryset(self) -> QuerySet[PipelineRun]:
        return pipeline_runs_list().prefetch_related(
            Prefetch("block_runs", queryset=BlockRun.objects.order_by("id"))
        )

    @extend_schema(responses=envelope_schema("pipeline_run", PipelineRunDetailSerializer))
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return envelope("pipeline_run", self.get_serializer(self.get_object()).data)


class BlockRunLogFile(APIView):
    """The whole output of a block run that printed more lines than
    MILLRACE_LOG_LINES_PER_BLOCK (of which only the first and last are kept as log
    lines), as a gzip file of text lines "time level message". 404 when no line was
    left out, or when the file was cleaned up with the run's outputs."""

    permission_classes = [CanView]

    @extend_schema(responses={(200, "application/gzip"): OpenApiTypes.BINARY, 404: ErrorSerializer})
    def get(self, request: Request, pk: int) -> FileResponse:
        row = BlockRun.objects.filter(pk=pk).values("pipeline_run_id", "block_uuid", "attempt", "metrics").first()
        if row is None:
            raise exceptions.NotFound("No block run with this id.")
        key = (row["metrics"] or {}).get("log_file") if isinstance(row["metrics"], dict) else None
        if not isinstance(key, str) or not key:
            raise exceptions.NotFound("This block run has no log file: every line of its output is stored as a log entry.")
        try:
            handle = variables.open_file(key)
        except (FileNotFoundError, variables.VariableError):
            raise exceptions.NotFound("This block run's log file has been removed (with its outputs).") from None
        name = f"run-{row['pipeline_run_id']}-{row['block_uuid']}-attempt-{row['attempt']}.log.gz"
        return FileResponse(handle, as_attachment=True, filename=name, content_type="application/gzip")
