"""Pieces every API module shares: Mage's envelopes and pagination, the JSON error
format (DRF's exception handler), and JSON 404/500 pages for `/api/` URLs. Roles and
the Bearer token class are in config/common/permissions.py.

Every error the API answers has one shape, whatever raised it:

    {"error": {"code": 400, "type": "invalid", "message": "schedule_interval: ...",
               "fields": {"schedule_interval": ["..."]}}}

`fields` is present on validation errors only; `message` is always a readable sentence.

Request bodies are read by `StrictJSONParser` (jsonsafe's rules: a value either
database cannot store is a 400 naming where it is) and answers written by
`SafeJSONRenderer` (a value stored before those rules, that JSON cannot carry, is sent
escaped instead of failing the whole answer).

DRF loads this module while `rest_framework.generics` is still loading (it is the default
pagination class), so nothing here may touch DRF's or drf-spectacular's view machinery at
import time: no view classes, no `extend_schema` on a class.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from typing import IO, Any

from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from drf_spectacular.utils import extend_schema_serializer, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from config.common import jsonsafe

log = logging.getLogger("millrace.api")

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


# --- errors --------------------------------------------------------------------------------

class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the current state of the resource."
    default_code = "conflict"


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "payload_too_large"


def error_body(code: int, type_: str, message: str, fields: Mapping[str, Any] | None = None) -> dict:
    error: dict[str, Any] = {"code": code, "type": type_, "message": message}
    if fields is not None:
        error["fields"] = dict(fields)
    return {"error": error}


def _flatten(messages: Any) -> list[str]:
    """Every message in a DRF error detail, however nested (lists of dicts of lists)."""
    if isinstance(messages, Mapping):
        return [m for value in messages.values() for m in _flatten(value)]
    if isinstance(messages, list | tuple):
        return [m for value in messages for m in _flatten(value)]
    return [str(messages)]


def _summary(fields: Mapping[str, Any], loose: Iterable[str] = ()) -> str:
    parts = [f"{name}: {' '.join(_flatten(msgs))}" for name, msgs in fields.items() if name != "non_field_errors"]
    general = list(loose) + _flatten(fields.get("non_field_errors", []))
    return "; ".join(general + parts) or "Invalid input."


def _plain(detail: Any) -> Any:
    """DRF's ErrorDetail strings and lazy translations as plain JSON values."""
    if isinstance(detail, Mapping):
        return {str(k): _plain(v) for k, v in detail.items()}
    if isinstance(detail, list | tuple):
        return [_plain(v) for v in detail]
    return str(detail)


def validation_fields(exc: DjangoValidationError) -> tuple[dict[str, list[str]], list[str]]:
    """(messages by field, messages about no field) of a Django ValidationError, which
    may carry a dict (`{"schedule_interval": [...]}`) or a plain list."""
    if hasattr(exc, "error_dict"):
        fields = {("non_field_errors" if k == NON_FIELD_ERRORS else k): v for k, v in exc.message_dict.items()}
        return fields, []
    return {}, list(exc.messages)


def _drf_views() -> Any:
    # Imported when first needed, not with this module: the first import of
    # rest_framework.views loads DEFAULT_RENDERER_CLASSES and DEFAULT_PARSER_CLASSES,
    # which are classes of this module.
    from rest_framework import views

    return views


def _validation_response(fields: Mapping[str, Any], loose: list[str]) -> Response:
    _drf_views().set_rollback()
    return Response(error_body(400, "invalid", _summary(fields, loose), fields), status=400)


def exception_handler(exc: Exception, context: Mapping[str, Any]) -> Response:
    """DRF's exception handler, answering every error as the JSON shape above; anything
    unexpected is logged with its traceback and answered as a JSON 500."""
    if isinstance(exc, DjangoValidationError):
        fields, loose = validation_fields(exc)
        return _validation_response(fields, loose)
    if isinstance(exc, exceptions.ValidationError):
        detail = _plain(exc.detail)
        if isinstance(detail, dict):
            return _validation_response(detail, [])
        return _validation_response({}, _flatten(detail))
    exc = _as_api_exception(exc)
    response = _drf_views().exception_handler(exc, context)
    if response is None or not isinstance(exc, exceptions.APIException):
        view = context.get("view")
        log.error("unhandled error in %s", type(view).__name__ if view else "an API view", exc_info=exc)
        _drf_views().set_rollback()
        return Response(error_body(500, "server_error", "Internal server error."), status=500)
    codes = exc.get_codes()
    response.data = error_body(
        response.status_code,
        codes if isinstance(codes, str) else "error",
        " ".join(_flatten(_plain(exc.detail))) or "Error.",
    )
    return response


def _as_api_exception(exc: Exception) -> Exception:
    if isinstance(exc, Http404):
        return exceptions.NotFound(*exc.args)
    if isinstance(exc, DjangoPermissionDenied):
        return exceptions.PermissionDenied(*exc.args)
    if isinstance(exc, RequestDataTooBig):
        return PayloadTooLarge()
    if isinstance(exc, SuspiciousOperation):
        return exceptions.ParseError(str(exc) or None)
    return exc


def json_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler404: JSON under `/api/`, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse(error_body(404, "not_found", "Not found."), status=404)
    return defaults.page_not_found(request, exception)


def json_server_error(request: HttpRequest) -> HttpResponse:
    """handler500: an error outside any API view (a middleware, say) under `/api/` is
    still answered in JSON."""
    if request.path.startswith("/api/"):
        return JsonResponse(error_body(500, "server_error", "Internal server error."), status=500)
    return defaults.server_error(request)


# --- reading and writing JSON ---------------------------------------------------------------

def json_body_error(exc: jsonsafe.JSONValueError) -> exceptions.APIException:
    """The answer to a body jsonsafe refused: a 400 naming the value's path in the body
    (`pipeline_run.variables.ratio`) when it has one, else a 400 parse error about the
    body as a whole (not JSON, not UTF-8, nested beyond any limit)."""
    if exc.path:
        return exceptions.ValidationError({exc.path: [str(exc)]})
    return exceptions.ParseError(f"The request body {exc.problem}.")


class StrictJSONParser(JSONParser):
    """DRF's JSON parser with jsonsafe's rules: NaN, Infinity, 1e999, NUL characters,
    lone surrogates, integers beyond 64 bits and nesting deeper than 64 levels are
    refused before any view sees them; a body over 1 MiB is a 413."""

    def parse(self, stream: IO[bytes] | None, media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        raw = stream.read(jsonsafe.MAX_BYTES + 1) if stream is not None else b""
        if len(raw) > jsonsafe.MAX_BYTES:
            raise PayloadTooLarge(f"The request body may be at most {jsonsafe.MAX_BYTES:,} bytes.")
        data: str | bytes = raw
        encoding = ((parser_context or {}).get("encoding") or settings.DEFAULT_CHARSET).lower()
        if encoding.replace("-", "") != "utf8":
            # JSON is UTF-8 (RFC 8259); a client that says otherwise is taken at its word.
            try:
                data = raw.decode(encoding)
            except (LookupError, UnicodeDecodeError) as exc:
                raise exceptions.ParseError(f"The request body is not {encoding} text: {exc}") from None
        try:
            return jsonsafe.loads(data)
        except jsonsafe.JSONValueError as exc:
            raise json_body_error(exc) from None


_FLOAT_TEXT = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _escaped(value: Any, depth: int = 0) -> Any:
    """`value` with what JSON cannot carry made into text: NaN and infinities as "NaN"
    and "Infinity", lone surrogates as `\\ud800` escapes, anything nested deeper than
    jsonsafe allows as a note. Bounded recursion (MAX_DEPTH levels)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return _FLOAT_TEXT[str(value)]
    if isinstance(value, Mapping | list | tuple) and depth >= jsonsafe.MAX_DEPTH:
        return f"(nested more than {jsonsafe.MAX_DEPTH} levels deep: not shown)"
    if isinstance(value, Mapping):
        return {_escaped(str(k)): _escaped(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v, depth + 1) for v in value]
    return value


class SafeJSONRenderer(JSONRenderer):
    """DRF's JSON renderer. When the data holds a value JSON cannot carry (stored
    before jsonsafe refused such values, or written straight into the database), the
    data is rendered again with those values escaped, so one bad row never fails a
    whole list. The normal path costs nothing more than DRF's."""

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Mapping[str, Any] | None = None) -> bytes:
        try:
            return super().render(data, accepted_media_type, renderer_context)
        except (ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
            view = (renderer_context or {}).get("view")
            log.warning("%s: rendered with escaped values (%s)", type(view).__name__ if view else "an API answer", exc)
            return super().render(_escaped(data), accepted_media_type, renderer_context)


# --- envelopes and pagination ----------------------------------------------------------------

def envelope(key: str, data: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A single object the way Mage answers it: `{"pipeline_schedule": {...}}`."""
    return Response({key: data}, status=status_code, headers=headers)


def unwrap(data: Any, key: str) -> dict[str, Any]:
    """The object of a request body `{key: {...}}`; a body without `key` is taken as the
    object itself (`{"name": ...}`), which is what people type by hand."""
    if not isinstance(data, Mapping):
        raise exceptions.ValidationError({"non_field_errors": ["The request body must be a JSON object."]})
    if key not in data:
        return dict(data)
    inner = data[key]
    if not isinstance(inner, Mapping):
        raise exceptions.ValidationError({key: ["Must be a JSON object."]})
    return dict(inner)


def _query_int(request: Request, name: str, default: int, *, minimum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise exceptions.ValidationError({name: [f"Must be an integer; got {raw!r}."]}) from None
    if value < minimum:
        raise exceptions.ValidationError({name: [f"Must be at least {minimum}."]})
    return value


class MagePagination(LimitOffsetPagination):
    """Mage's `?_limit=&_offset=`, answering `{<plural>: [...], "metadata": {...}}`.

    The plural key is the view's `envelope_many`. The limit is capped at 1000 (a larger
    one is lowered, as Mage does); a limit or offset that is not a number is refused
    rather than silently replaced."""

    limit_query_param = "_limit"
    offset_query_param = "_offset"
    default_limit = DEFAULT_PAGE_SIZE
    max_limit = MAX_PAGE_SIZE
    template = None
    # Set by paginate_queryset before anything reads them, and never None here: the
    # limit always has a value (DRF's may be None, meaning "do not paginate").
    count: int
    limit: int
    offset: int

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> list | None:
        self.key = getattr(view, "envelope_many", "results")
        return super().paginate_queryset(queryset, request, view)

    def get_limit(self, request: Request) -> int:
        return min(_query_int(request, self.limit_query_param, self.default_limit, minimum=1), self.max_limit)

    def get_offset(self, request: Request) -> int:
        return _query_int(request, self.offset_query_param, 0, minimum=0)

    def get_paginated_response(self, data: list) -> Response:
        return Response({self.key: data, "metadata": self.metadata()})

    def metadata(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "limit": self.limit,
            "offset": self.offset,
            "next": self.offset + self.limit < self.count,
        }


class MetadataSerializer(serializers.Serializer):
    count = serializers.IntegerField(help_text="Total number of matching rows.")
    limit = serializers.IntegerField()
    offset = serializers.IntegerField()
    next = serializers.BooleanField(help_text="Whether another page follows.")


@functools.cache
def envelope_schema(key: str, serializer: type[serializers.BaseSerializer], many: bool = False) -> Any:
    """The OpenAPI shape of an envelope, for `extend_schema(responses=...)`. Cached so a
    shape used by several views is one component."""
    fields: dict[str, serializers.Field]
    if many:
        fields = {key: serializer(many=True), "metadata": MetadataSerializer()}
    else:
        fields = {key: serializer()}
    base = serializer.__name__.removesuffix("Serializer")
    name = f"{base}{'List' if many else ''}Envelope"
    # drf-spectacular types the decorator for classes and functions; it sets its override
    # on the serializer instance inline_serializer returns just as well.
    return extend_schema_serializer(many=False)(inline_serializer(name, fields=fields))  # type: ignore[type-var]


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.IntegerField()
    type = serializers.CharField()
    message = serializers.CharField()
    # The error body's key. DRF's metaclass takes declared fields off the class, so this
    # does not hide Serializer.fields, which the stubs cannot tell.
    fields = serializers.DictField(  # type: ignore[assignment]
        child=serializers.ListField(child=serializers.CharField()), required=False,
    )


class ErrorSerializer(serializers.Serializer):
    error = ErrorDetailSerializer()


def drop_slash_twins(endpoints: list[tuple], **kwargs: Any) -> list[tuple]:
    """drf-spectacular preprocessing hook: every route answers with and without a
    trailing slash; the schema lists each once, without (Mage's spelling)."""
    paths = {endpoint[0] for endpoint in endpoints}
    return [
        endpoint for endpoint in endpoints
        if not (endpoint[0].endswith("/") and endpoint[0].rstrip("/") in paths)
    ]
