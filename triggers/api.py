"""The triggers API in Mage's names: `pipeline_schedules` (triggers), the API trigger
`POST /api/pipeline_schedules/<id>/pipeline_runs/<token>`, and `events`.

Every write goes through `triggers.services`; this module only reads requests, checks
roles (config/permissions.py) and shapes answers.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import Prefetch, QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import exceptions, generics, serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.common import jsonsafe
from config.common.api import (
    Conflict,
    ErrorSerializer,
    PayloadTooLarge,
    envelope,
    envelope_schema,
    json_body_error,
    unwrap,
)
from config.common.permissions import user_can_edit
from pipelines.models import Pipeline
from runs.api import PipelineRunCreatedSerializer, PipelineRunSerializer
from runs.models import PipelineRun
from triggers import services
from triggers.models import Event, ScheduleType, Trigger, TriggerStatus

# The API trigger reads at most this much; Django's own limit (2.5 MB) is for forms.
API_TRIGGER_MAX_BODY = 1024 * 1024
IDEMPOTENCY_KEY_MAX = 255  # ApiRequest.key


# --- pipeline schedules ------------------------------------------------------------------------

class PipelineScheduleSerializer(serializers.ModelSerializer):
    """A trigger (Mage's pipeline schedule). `token`, the secret of an API trigger, is
    shown to editors and staff only."""

    # A viewer must not be able to start runs with the token: `to_representation`
    # drops it unless the view says the caller may edit.

    pipeline_uuid = serializers.CharField(source="pipeline.uuid", read_only=True)
    token = serializers.CharField(read_only=True, required=False, help_text="Editors and staff only.")

    class Meta:
        model = Trigger
        fields = [
            "id", "name", "description", "pipeline_uuid", "schedule_type", "schedule_interval",
            "start_time", "status", "variables", "settings", "timezone", "event_matcher",
            "next_run_at", "last_run_at", "error", "created_at", "updated_at", "token",
        ]
        read_only_fields = fields

    def to_representation(self, instance: Trigger) -> dict[str, Any]:
        data = super().to_representation(instance)
        if not self.context.get("show_token"):
            data.pop("token", None)
        return data


class _DictOrNull(serializers.DictField):
    """A JSON object; `null` means an empty one (Mage clients send `null`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_null=True, required=False, **kwargs)

    def validate_empty_values(self, data: Any) -> tuple[bool, Any]:
        if data is None:
            return True, {}
        return super().validate_empty_values(data)


class PipelineScheduleInputSerializer(serializers.Serializer):
    """The fields of a pipeline schedule that can be set. An unknown field, a bad value
    or a setting out of bounds is a 400 naming the field."""

    # Only the types are checked here; what the values mean (a valid cron, a known time
    # zone, bounded settings) is checked by triggers.services, for every interface.

    name = serializers.CharField(max_length=255)
    description = serializers.CharField(allow_blank=True, required=False)
    schedule_type = serializers.ChoiceField(choices=ScheduleType.choices, required=False)
    schedule_interval = serializers.CharField(allow_blank=True, max_length=100, required=False)
    start_time = serializers.DateTimeField(allow_null=True, required=False)
    timezone = serializers.CharField(max_length=64, required=False)
    status = serializers.ChoiceField(choices=TriggerStatus.choices, required=False)
    variables = _DictOrNull()
    settings = _DictOrNull()
    event_matcher = _DictOrNull()


# Sent back by clients that PUT the object they read; ignored rather than refused.
_READ_ONLY = frozenset(
    {"id", "pipeline_uuid", "token", "next_run_at", "last_run_at", "error", "created_at", "updated_at"}
)


def _schedule_input(request: Request, *, partial: bool) -> dict[str, Any]:
    data = {k: v for k, v in unwrap(request.data, "pipeline_schedule").items() if k not in _READ_ONLY}
    known = PipelineScheduleInputSerializer().fields
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        # A misspelt field silently ignored is a setting the user thinks they made.
        raise exceptions.ValidationError({k: ["Unknown field."] for k in unknown})
    serializer = PipelineScheduleInputSerializer(data=data, partial=partial)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


def _schedule_body(request: Request, trigger: Trigger) -> dict[str, Any]:
    return PipelineScheduleSerializer(trigger, context={"show_token": user_can_edit(request.user)}).data


def _trigger_get(trigger_id: int) -> Trigger:
    return get_object_or_404(Trigger.objects.select_related("pipeline"), pk=trigger_id)


class PipelineScheduleFilter(django_filters.FilterSet):
    pipeline_uuid = django_filters.CharFilter(field_name="pipeline__uuid")
    status = django_filters.ChoiceFilter(choices=TriggerStatus.choices)
    schedule_type = django_filters.ChoiceFilter(choices=ScheduleType.choices)

    class Meta:
        model = Trigger
        fields: list[str] = []


class _ScheduleListView(generics.ListAPIView):
    """A list of pipeline schedules, with their tokens for those who may edit."""

    envelope_many = "pipeline_schedules"
    serializer_class = PipelineScheduleSerializer

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        context["show_token"] = user_can_edit(self.request.user)
        return context


class PipelineScheduleList(_ScheduleListView):
    """Every pipeline schedule, filtered by `?pipeline_uuid=&status=&schedule_type=`.
    Create one with `POST /api/pipelines/<pipeline uuid>/pipeline_schedules`."""

    filterset_class = PipelineScheduleFilter

    def get_queryset(self) -> QuerySet[Trigger]:
        return Trigger.objects.select_related("pipeline").order_by("pipeline__uuid", "name", "id")

    # DRF's own stub narrows View's HttpRequest to Request here, with the same ignore.
    def http_method_not_allowed(self, request: Request, *args: Any, **kwargs: Any) -> Response:  # type: ignore[override]
        # Mage's clients POST here; a bare "not allowed" leaves them guessing.
        if request.method == "POST":
            raise exceptions.MethodNotAllowed(
                "POST",
                detail="A pipeline schedule is created with POST /api/pipelines/<pipeline uuid>/pipeline_schedules; "
                "this URL only lists them (GET).",
            )
        return super().http_method_not_allowed(request, *args, **kwargs)

    @extend_schema(responses=envelope_schema("pipeline_schedules", PipelineScheduleSerializer, many=True))
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class PipelinePipelineSchedules(_ScheduleListView):
    """The pipeline schedules of one pipeline (`GET`, viewers), and a new one (`POST`,
    editors)."""

    def get_queryset(self) -> QuerySet[Trigger]:
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular reading the view
            return Trigger.objects.none()
        pipeline = get_object_or_404(Pipeline, uuid=self.kwargs["pipeline_uuid"])
        return Trigger.objects.filter(pipeline=pipeline).select_related("pipeline").order_by("name", "id")

    @extend_schema(responses=envelope_schema("pipeline_schedules", PipelineScheduleSerializer, many=True))
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=envelope_schema("pipeline_schedule", PipelineScheduleInputSerializer),
        responses={201: envelope_schema("pipeline_schedule", PipelineScheduleSerializer), 400: ErrorSerializer},
    )
    def post(self, request: Request, pipeline_uuid: str) -> Response:
        pipeline = get_object_or_404(Pipeline, uuid=pipeline_uuid)
        fields = _schedule_input(request, partial=False)
        trigger = services.trigger_create(pipeline=pipeline, created_by=request.user, **fields)
        return envelope("pipeline_schedule", _schedule_body(request, trigger), status.HTTP_201_CREATED)


class PipelineScheduleDetail(APIView):
    """One pipeline schedule: read it, change it (`PUT` and `PATCH` both change only
    the fields given, as in Mage; `status` activates or pauses it), delete it."""

    @extend_schema(responses=envelope_schema("pipeline_schedule", PipelineScheduleSerializer))
    def get(self, request: Request, pk: int) -> Response:
        return envelope("pipeline_schedule", _schedule_body(request, _trigger_get(pk)))

    @extend_schema(
        request=envelope_schema("pipeline_schedule", PipelineScheduleInputSerializer),
        responses={200: envelope_schema("pipeline_schedule", PipelineScheduleSerializer), 400: ErrorSerializer},
    )
    def put(self, request: Request, pk: int) -> Response:
        trigger = _trigger_get(pk)
        fields = _schedule_input(request, partial=True)
        # Fields and status in one service call (the admin's change form makes the same
        # one): one validation, one transaction, so activating reads the new schedule.
        trigger = services.trigger_update(trigger, **fields)
        return envelope("pipeline_schedule", _schedule_body(request, _trigger_get(trigger.pk)))

    @extend_schema(
        request=envelope_schema("pipeline_schedule", PipelineScheduleInputSerializer),
        responses={200: envelope_schema("pipeline_schedule", PipelineScheduleSerializer), 400: ErrorSerializer},
    )
    def patch(self, request: Request, pk: int) -> Response:
        return self.put(request, pk)

    @extend_schema(responses=envelope_schema("pipeline_schedule", PipelineScheduleSerializer))
    def delete(self, request: Request, pk: int) -> Response:
        trigger = _trigger_get(pk)
        body = _schedule_body(request, trigger)
        services.trigger_delete(trigger)
        return envelope("pipeline_schedule", body)


class PipelineScheduleRotateToken(APIView):
    """A new token for an API trigger; the old token stops working at once."""

    @extend_schema(request=None, responses=envelope_schema("pipeline_schedule", PipelineScheduleSerializer))
    def post(self, request: Request, pk: int) -> Response:
        trigger = _trigger_get(pk)
        services.trigger_rotate_token(trigger)
        return envelope("pipeline_schedule", _schedule_body(request, _trigger_get(pk)))


_RUN_BODY = inline_serializer(
    "PipelineRunVariablesBody",
    fields={
        "pipeline_run": inline_serializer(
            "PipelineRunVariables", fields={"variables": serializers.DictField(required=False)}
        )
    },
)


def _run_variables(data: Any) -> Any:
    """`variables` of `{"pipeline_run": {"variables": {...}}}` (or of `{"variables": ...}`);
    None when absent. Whether they are an object is for the services to say."""
    if data is None or data == {}:
        return None
    inner = unwrap(data, "pipeline_run")
    return inner.get("variables")


class PipelineScheduleRunNow(APIView):
    """Run the schedule's pipeline once now, with the schedule's variables and then
    the body's on top; works whether the schedule is active or paused."""

    @extend_schema(request=_RUN_BODY, responses={201: envelope_schema("pipeline_run", PipelineRunSerializer)})
    def post(self, request: Request, pk: int) -> Response:
        trigger = _trigger_get(pk)
        variables = _run_variables(request.data)
        if variables is not None and not isinstance(variables, dict):
            raise exceptions.ValidationError({"variables": ["Must be a JSON object."]})
        run = services.trigger_run_now(trigger, variables=variables, created_by=request.user)
        run = PipelineRun.objects.select_related("pipeline").get(pk=run.pk)
        return envelope("pipeline_run", PipelineRunSerializer(run).data, status.HTTP_201_CREATED)


# --- the API trigger ---------------------------------------------------------------------------

def _read_limited_body(request: Request) -> bytes:
    """The raw body, refused with 413 past `API_TRIGGER_MAX_BODY` before any of it is
    parsed: by its declared length when there is one, else by what arrives."""
    declared = request.META.get("CONTENT_LENGTH") or "0"
    try:
        length = int(declared)
    except ValueError:
        raise exceptions.ParseError(f"Invalid Content-Length {declared!r}.") from None
    if length > API_TRIGGER_MAX_BODY:
        raise PayloadTooLarge(f"The request body may be at most {API_TRIGGER_MAX_BODY} bytes.")
    # Read from the stream ourselves (not `request.body`) so a body without a length
    # is still cut at the limit.
    raw = request._request.read(API_TRIGGER_MAX_BODY + 1)
    if len(raw) > API_TRIGGER_MAX_BODY:
        raise PayloadTooLarge(f"The request body may be at most {API_TRIGGER_MAX_BODY} bytes.")
    return raw


def _is_json_media_type(content_type: str) -> bool:
    """`application/json` or a JSON suffix type (`application/vnd.x+json`), with any
    parameters (`; charset=utf-8`)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _parse_json_body(raw: bytes, content_type: str) -> Any:
    """The body as JSON, by jsonsafe's rules. An empty body without a Content-Type
    carries no data (None: no variables); anything else must say it is JSON (415)."""
    if not raw.strip() and not content_type:
        return None
    if not _is_json_media_type(content_type):
        raise exceptions.UnsupportedMediaType(
            content_type or "(none)",
            detail=f"The body must be JSON (Content-Type: application/json), not {content_type or 'untyped'}.",
        )
    if not raw.strip():
        return None
    try:
        return jsonsafe.loads(raw)
    except jsonsafe.JSONValueError as exc:
        raise json_body_error(exc) from None


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > IDEMPOTENCY_KEY_MAX:
        raise exceptions.ValidationError(
            {"Idempotency-Key": [f"Must be 1 to {IDEMPOTENCY_KEY_MAX} characters."]}
        )
    return key


class ApiTriggerView(APIView):
    """Start a run of an API trigger's pipeline. The token in the URL is the
    credential: no login is needed. The body, `{"pipeline_run": {"variables": {...}}}`,
    is optional and must be JSON (`Content-Type: application/json`).

    200 `{"pipeline_run": {...}}`; 400 malformed JSON, a value that cannot be stored
    (NaN, a NUL character, ...) or `variables` not an object, naming the field; 403
    wrong or missing token; 404 unknown trigger; 409 paused trigger; 413 body over
    1 MiB; 415 a body that is not JSON. A retry with the same `Idempotency-Key` header
    answers the first call's run."""

    # No session is read and DRF exempts its views from CSRF: the token is all.
    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        request=_RUN_BODY,
        parameters=[OpenApiParameter("Idempotency-Key", str, OpenApiParameter.HEADER, required=False)],
        responses={
            200: envelope_schema("pipeline_run", PipelineRunCreatedSerializer),
            400: ErrorSerializer, 403: ErrorSerializer, 404: ErrorSerializer,
            409: ErrorSerializer, 413: ErrorSerializer, 415: ErrorSerializer,
        },
    )
    def post(self, request: Request, pk: int, token: str = "") -> Response:
        body = _parse_json_body(_read_limited_body(request), request.content_type or "")
        variables = _run_variables(body)
        key = _idempotency_key(request)
        try:
            run, created = services.trigger_fire_api(
                trigger_id=pk, token=token, variables=variables, idempotency_key=key
            )
        except services.TriggerNotFound:
            raise exceptions.NotFound("No pipeline schedule with this id.") from None
        except services.TokenRejected:
            raise exceptions.PermissionDenied("Invalid token for this pipeline schedule.") from None
        except services.TriggerInactive:
            raise Conflict("This pipeline schedule is not active.") from None
        run = PipelineRun.objects.select_related("pipeline").get(pk=run.pk)
        headers = {} if created else {"Idempotent-Replayed": "true"}
        return envelope("pipeline_run", PipelineRunCreatedSerializer(run).data, headers=headers)


@extend_schema(exclude=True)
class ApiTriggerMissingTokenView(ApiTriggerView):
    """`POST /api/pipeline_schedules/<id>/pipeline_runs` without a token: 403 (or 404 for
    an unknown trigger), in JSON, from the same code path."""


# --- events -----------------------------------------------------------------------------------

class EventSerializer(serializers.ModelSerializer):
    pipeline_run_ids = serializers.SerializerMethodField()

    class Meta:
        model = Event
        fields = ["id", "source", "name", "payload", "created_at", "pipeline_run_ids"]
        read_only_fields = fields

    def get_pipeline_run_ids(self, event: Event) -> list[int]:
        return [run.pk for run in event.runs.all()]


class EventInputSerializer(serializers.Serializer):
    # The serializer's metaclass takes declared fields off the class, so this does not
    # replace `Field.source` as the stub believes.
    source = serializers.CharField(max_length=255)  # type: ignore[assignment]
    name = serializers.CharField(max_length=255)
    payload = _DictOrNull()


class EventFilter(django_filters.FilterSet):
    source = django_filters.CharFilter()
    name = django_filters.CharFilter()

    class Meta:
        model = Event
        fields: list[str] = []


def _events_with_runs() -> QuerySet[Event]:
    # The run ids of a whole page in one query, not one per event.
    return Event.objects.prefetch_related(
        Prefetch("runs", queryset=PipelineRun.objects.only("id").order_by("id"))
    ).order_by("-created_at", "-id")


class EventList(generics.ListAPIView):
    """Events, newest first, with the runs they started (`GET`, viewers); `POST`
    (editors) records one and starts a run of every active event trigger it matches."""

    serializer_class = EventSerializer
    filterset_class = EventFilter
    envelope_many = "events"

    def get_queryset(self) -> QuerySet[Event]:
        return _events_with_runs()

    @extend_schema(responses=envelope_schema("events", EventSerializer, many=True))
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=envelope_schema("event", EventInputSerializer),
        responses={201: envelope_schema("event", EventSerializer), 400: ErrorSerializer},
    )
    def post(self, request: Request) -> Response:
        serializer = EventInputSerializer(data=unwrap(request.data, "event"))
        serializer.is_valid(raise_exception=True)
        event = services.event_record(created_by=request.user, **serializer.validated_data)
        event = _events_with_runs().get(pk=event.pk)
        return envelope("event", EventSerializer(event).data, status.HTTP_201_CREATED)

