"""Generated JSON, valid and not, against config.common.jsonsafe and every endpoint that
takes JSON: the checker only ever accepts (and then the value survives a JSON round
trip) or refuses with its own error; an endpoint never answers 5xx, answers a 4xx in
the API's error shape, stores nothing when it refuses, and stores only what the checker
accepts when it does not."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from config.common import jsonsafe
from pipelines.models import Pipeline
from runs.models import BlockRun, PipelineRun
from tests.helpers import block_code, make_pipeline
from triggers import services
from triggers.models import Event, Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

# No example database: nothing written into the checkout; every run draws afresh.
EXAMPLES = settings(
    max_examples=60, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- the strategy: mostly valid JSON, with every kind of bad value mixed in ---------------------

GOOD_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
BAD_TEXT = st.one_of(
    st.builds(lambda a, b: f"{a}\x00{b}", GOOD_TEXT, GOOD_TEXT),
    st.builds(lambda a, s, b: f"{a}{s}{b}", GOOD_TEXT, st.characters(categories=("Cs",)), GOOD_TEXT),
)
GOOD_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-jsonsafe.MAX_INT, jsonsafe.MAX_INT),
    st.floats(allow_nan=False, allow_infinity=False), GOOD_TEXT,
)
BAD_SCALARS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(min_value=jsonsafe.MAX_INT + 1, max_value=2**200), st.integers(max_value=-jsonsafe.MAX_INT - 1, min_value=-(2**200)),
    BAD_TEXT,
    # A string over the size limit, and one just under it.
    st.sampled_from(["x" * (jsonsafe.MAX_BYTES + 1), "y" * (jsonsafe.MAX_BYTES - 100)]),
)


def _nested(depth: int, leaf: Any) -> Any:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


DEEP = st.builds(_nested, st.integers(1, 150), GOOD_SCALARS)
KEYS = st.one_of(GOOD_TEXT, GOOD_TEXT, GOOD_TEXT, BAD_TEXT)
VALUES = st.recursive(
    st.one_of(GOOD_SCALARS, GOOD_SCALARS, GOOD_SCALARS, BAD_SCALARS, DEEP),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=4)),
    max_leaves=12,
)
# What only Python code can pass (not JSON text): tuples, sets, bytes, keys that are not text.
PYTHON_ONLY = st.one_of(
    st.tuples(GOOD_SCALARS), st.frozensets(st.integers(), max_size=2), st.binary(max_size=4),
    st.dictionaries(st.integers(), GOOD_SCALARS, min_size=1, max_size=2),
)
ANY_VALUE = st.one_of(VALUES, VALUES, VALUES, PYTHON_ONLY, st.lists(PYTHON_ONLY, max_size=2))


@given(value=ANY_VALUE)
@EXAMPLES
def test_check_accepts_only_what_survives_a_json_round_trip(value):
    try:
        jsonsafe.check(value)
    except jsonsafe.JSONValueError as exc:
        assert exc.problem
        return
    text = json.dumps(value, allow_nan=False)  # raises if a NaN got through
    assert json.loads(text) == value
    assert jsonsafe.loads(text) == value
    text.encode("utf-8")  # raises if a lone surrogate got through (ensure_ascii escapes it otherwise)
    json.dumps(value, ensure_ascii=False).encode("utf-8")


@given(value=ANY_VALUE)
@EXAMPLES
def test_validate_raises_only_a_validation_error_naming_the_field(value):
    try:
        assert jsonsafe.validate("variables", value) is value
    except ValidationError as exc:
        assert list(exc.message_dict) == ["variables"]
        assert exc.message_dict["variables"][0].startswith("variables")


def _encode(value: Any, ascii_only: bool) -> bytes:
    """JSON text as a careless client writes it: NaN literals, and a lone surrogate either
    escaped (`\\ud800`) or as the bytes Python would write (not UTF-8)."""
    return json.dumps(value, allow_nan=True, ensure_ascii=ascii_only, default=repr).encode("utf-8", "surrogatepass")


BODIES = st.one_of(
    st.builds(_encode, VALUES, st.booleans()),
    st.binary(max_size=40),  # anything at all, invalid UTF-8 included
    st.sampled_from([b"", b"NaN", b"[" * 100000, b"{" * 5000 + b"}" * 5000, b'{"a": 1' + b"0" * 5000 + b"}"]),
)


@given(text=st.one_of(st.builds(lambda v: json.dumps(v, allow_nan=True, ensure_ascii=False), VALUES), st.text(max_size=40)))
@EXAMPLES
def test_loads_of_any_text_raises_only_its_own_error(text):
    try:
        parsed = jsonsafe.loads(text)
    except jsonsafe.JSONValueError:
        return
    jsonsafe.check(parsed)


@given(body=BODIES)
@EXAMPLES
def test_loads_of_any_bytes_raises_only_its_own_error(body):
    try:
        parsed = jsonsafe.loads(body)
    except jsonsafe.JSONValueError:
        return
    jsonsafe.check(parsed)


# --- the endpoints -------------------------------------------------------------------------------

@pytest.fixture
def pipeline() -> Pipeline:
    return make_pipeline("etl", [("load", "data_loader", block_code("data_loader", "return 1"))], variables={"env": "dev"})


@pytest.fixture
def api_trigger(pipeline: Pipeline) -> Trigger:
    return services.trigger_create(pipeline=pipeline, name="hook", schedule_type="api", status="active")


@pytest.fixture
def on_event(pipeline: Pipeline) -> Trigger:
    return services.trigger_create(
        pipeline=pipeline, name="on-event", schedule_type="event", status="active",
        event_matcher={"source": "s", "name": "n"},
    )


@pytest.fixture
def editor(editor: APIClient) -> APIClient:
    editor.raise_request_exception = False  # a crash must show as the 500 it would be
    return editor


def _state() -> tuple:
    triggers = tuple(Trigger.objects.order_by("id").values_list("id", "name", "variables", "settings", "updated_at"))
    return PipelineRun.objects.count(), BlockRun.objects.count(), Event.objects.count(), triggers


def _check_answer(response: Any, before: tuple) -> None:
    """Never a 5xx; JSON always; a 4xx in the error shape changes nothing; whatever a
    2xx stored passes jsonsafe."""
    assert response.status_code < 500, response.content[:300]
    event(f"answered {response.status_code}")  # --hypothesis-show-statistics: a mix, not all 400s
    body = response.json()
    if response.status_code >= 400:
        error = body["error"]
        assert error["code"] == response.status_code
        assert isinstance(error["type"], str) and isinstance(error["message"], str) and error["message"]
        assert _state() == before
        return
    for run in PipelineRun.objects.all():
        jsonsafe.check(run.variables)
        jsonsafe.check(run.event)
    for payload in Event.objects.values_list("payload", flat=True):
        jsonsafe.check(payload)
    for trigger in Trigger.objects.all():
        jsonsafe.check([trigger.variables, trigger.settings, trigger.event_matcher])


def _wrap(template: bytes, inner: bytes) -> bytes:
    return template.replace(b"BODY", inner)


@given(inner=BODIES, wrapped=st.booleans())
@EXAMPLES
def test_the_api_trigger_never_fails_on_any_body(api_trigger, inner, wrapped):
    body = _wrap(b'{"pipeline_run": {"variables": {"v": BODY}}}', inner) if wrapped else inner
    before = _state()
    client = APIClient()
    client.raise_request_exception = False
    response = client.generic(
        "POST", f"/api/pipeline_schedules/{api_trigger.pk}/pipeline_runs/{api_trigger.token}", body,
        content_type="application/json",
    )
    _check_answer(response, before)


@given(inner=BODIES)
@EXAMPLES
def test_events_never_fail_on_any_payload(editor, on_event, inner):
    before = _state()
    response = editor.generic(
        "POST", "/api/events/", _wrap(b'{"event": {"source": "s", "name": "n", "payload": {"v": BODY}}}', inner),
        content_type="application/json",
    )
    _check_answer(response, before)


@given(inner=BODIES, field=st.sampled_from(["variables", "settings", "event_matcher"]), n=st.integers(0, 10**6))
@EXAMPLES
def test_creating_a_schedule_never_fails_on_any_value(editor, pipeline, inner, field, n):
    before = _state()
    template = b'{"pipeline_schedule": {"name": "t%d", "schedule_type": "api", "%s": {"v": BODY}}}' % (n, field.encode())
    response = editor.generic(
        "POST", f"/api/pipelines/{pipeline.uuid}/pipeline_schedules", _wrap(template, inner), content_type="application/json",
    )
    _check_answer(response, before)


@given(inner=BODIES, field=st.sampled_from(["variables", "settings", "name"]))
@EXAMPLES
def test_updating_a_schedule_never_fails_on_any_value(editor, api_trigger, inner, field):
    before = _state()
    value = b"BODY" if field == "name" else b'{"timeout": BODY}' if field == "settings" else b'{"v": BODY}'
    template = b'{"pipeline_schedule": {"%s": %s}}' % (field.encode(), value)
    response = editor.generic(
        "PUT", f"/api/pipeline_schedules/{api_trigger.pk}", _wrap(template, inner), content_type="application/json",
    )
    _check_answer(response, before)


@given(inner=BODIES)
@EXAMPLES
def test_run_now_never_fails_on_any_variables(editor, api_trigger, inner):
    before = _state()
    response = editor.generic(
        "POST", f"/api/pipeline_schedules/{api_trigger.pk}/run",
        _wrap(b'{"pipeline_run": {"variables": {"v": BODY}}}', inner), content_type="application/json",
    )
    _check_answer(response, before)
