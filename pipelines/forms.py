"""Model forms for the admin. Each validates with the same service that saves it, so a
form error and a refused save can never disagree; `save_with_service` does the write."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from django import forms
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import IntegrityError, models, transaction
from django.forms.fields import InvalidJSONInput, JSONString

from config.common import jsonsafe
from pipelines import services
from pipelines.models import Block, BlockEdge, Pipeline
from pipelines.selectors import block_upstream_uuids

_CODE_WIDGET = forms.Textarea(
    attrs={"rows": 24, "cols": 100, "spellcheck": "false", "style": "font-family: monospace"}
)


class _DryRun(Exception):
    """Raised inside a savepoint to roll back a service call made only to validate."""


def _dry_run(call: Callable[[], Any]) -> None:
    """Run a service call and roll everything it wrote back; its ValidationError escapes."""
    try:
        with transaction.atomic():
            call()
            raise _DryRun
    except _DryRun:
        pass


def add_service_errors(form: forms.BaseForm, exc: ValidationError) -> None:
    """Put a service's ValidationError on the form: a key that names a form field goes
    on that field, anything else above the form."""
    if not hasattr(exc, "error_dict"):
        form.add_error(None, exc)
        return
    for field, errors in exc.error_dict.items():
        target = field if field in form.fields else None
        if target is None and field != NON_FIELD_ERRORS:
            errors = [ValidationError(f"{field}: {'; '.join(e.messages)}") for e in errors]
        form.add_error(target, errors)


class SafeJSONField(forms.JSONField):
    """Django's JSON form field with jsonsafe's rules, for every JSON box of the admin.

    Typed text is parsed by `jsonsafe.loads`, so NaN, a NUL, a lone surrogate or
    nesting beyond the limit is a form error saying where (never a 500 from Python's
    recursion limit). A stored value that breaks those rules (saved before them) is
    shown escaped: a lone surrogate as the text `\\ud800`, so that the page renders and
    the user can see and fix it."""

    def to_python(self, value: Any) -> Any:
        if self.disabled or not isinstance(value, str) or value in self.empty_values:
            return super().to_python(value)
        try:
            converted = jsonsafe.loads(value)
        except jsonsafe.JSONValueError as exc:
            raise ValidationError(str(exc), code="invalid") from None
        return JSONString(converted) if isinstance(converted, str) else converted

    def bound_data(self, data: Any, initial: Any) -> Any:
        # Django parses what was typed again to show it; text it cannot parse is
        # shown as typed.
        try:
            return super().bound_data(data, initial)
        except (ValueError, RecursionError):
            return InvalidJSONInput(data)

    def prepare_value(self, value: Any) -> Any:
        text = super().prepare_value(value)
        if isinstance(value, InvalidJSONInput) or text.isascii():
            return text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, which no page can be written in
            return json.dumps(value, ensure_ascii=True, cls=self.encoder)
        return text


def json_field_classes(model: type[models.Model]) -> dict[str, type[forms.Field]]:
    """`Meta.field_classes` giving every JSON field of `model` a SafeJSONField."""
    return {f.name: SafeJSONField for f in model._meta.concrete_fields if isinstance(f, models.JSONField)}


def _json_default(cleaned: dict[str, Any], defaults: dict[str, Any]) -> None:
    """An emptied JSON box means "nothing", not SQL NULL in a NOT NULL column."""
    for name, empty in defaults.items():
        if name in cleaned and cleaned[name] is None:
            cleaned[name] = empty


def copy_saved(target: Any, saved: Any) -> None:
    """The admin keeps its own instance after `save_model`; give it the row the service
    created (pk and the values the service computed)."""
    for field in type(saved)._meta.concrete_fields:
        setattr(target, field.attname, getattr(saved, field.attname))
    target._state.adding = False
    target._state.db = saved._state.db


class PipelineAdminForm(forms.ModelForm):
    class Meta:
        model = Pipeline
        fields = ("uuid", "name", *services.PIPELINE_FIELDS)
        field_classes = json_field_classes(Pipeline)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "uuid" in self.fields:  # adding
            self.fields["name"].required = False
            self.fields["name"].help_text = "Empty: the same as the uuid."

    def clean(self) -> dict[str, Any]:
        super().clean()  # ModelForm's returns self.cleaned_data
        cleaned = self.cleaned_data
        if not cleaned.get("name") and cleaned.get("uuid"):
            cleaned["name"] = cleaned["uuid"]  # as pipeline_create names it
        _json_default(
            cleaned,
            {"tags": [], "variables": {}, "concurrency_config": {}, "retry_config": {},
             "notification_config": {}, "extra": {}},
        )
        try:
            services.validate_pipeline_fields(self._service_fields())
        except ValidationError as exc:
            add_service_errors(self, exc)
        return cleaned

    def _service_fields(self) -> dict[str, Any]:
        return {k: self.cleaned_data[k] for k in services.PIPELINE_FIELDS if k in self.cleaned_data}

    def save_with_service(self, obj: Pipeline, *, change: bool) -> Pipeline:
        fields = self._service_fields()
        if change:
            return services.pipeline_update(obj, **fields)
        fields.pop("name", None)
        saved = services.pipeline_create(uuid=self.cleaned_data["uuid"], name=self.cleaned_data["name"], **fields)
        copy_saved(obj, saved)
        return obj


class UpstreamBlocksField(forms.Field):
    """Upstream block uuids in order (the order of the block function's positional
    arguments), separated by commas or whitespace, typed in a text box. A Field, not a
    CharField: its value is a list, not text."""

    widget = forms.TextInput

    def to_python(self, value: Any) -> list[str]:
        if isinstance(value, list | tuple):
            return [str(v) for v in value]
        text = "" if value in self.empty_values else str(value)
        return [part for part in re.split(r"[\s,]+", text) if part]

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return ", ".join(value)
        return value


class BlockAdminForm(forms.ModelForm):
    # Named like the service's argument, so its errors land on this field.
    upstream_blocks = UpstreamBlocksField(
        required=False,
        label="Upstream blocks",
        help_text="Uuids of the upstream blocks, in order (the order of the positional "
        "arguments the block's function receives), separated by commas.",
        widget=forms.TextInput(attrs={"size": 80}),
    )

    class Meta:
        model = Block
        fields = (
            "pipeline", "uuid", "name", "type", "language", "content", "configuration",
            "retry_config", "timeout", "position", "extra",
        )
        widgets = {"content": _CODE_WIDGET}
        field_classes = json_field_classes(Block)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        content = self.fields.get("content")
        if isinstance(content, forms.CharField):
            # Keep code exactly as typed, apart from the browser's CRLF line endings.
            content.strip = False
        if "position" in self.fields and self.instance.pk is None:
            self.fields["position"].required = False
            self.fields["position"].help_text = "Leave empty to put the block last."
            self.fields["position"].initial = None
            self.initial.pop("position", None)
        pipeline_id = self.instance.pipeline_id if self.instance.pk else self.initial.get("pipeline")
        if self.instance.pk:
            self.initial["upstream_blocks"] = block_upstream_uuids(self.instance)
        self._list_pipeline_blocks(pipeline_id)
        self._integrity_error: IntegrityError | None = None

    def _list_pipeline_blocks(self, pipeline_id: Any) -> None:
        if not pipeline_id:
            return
        try:
            uuids = list(
                Block.objects.filter(pipeline_id=pipeline_id).exclude(pk=self.instance.pk)
                .values_list("uuid", flat=True)
            )
        except (ValueError, TypeError):  # a hand-typed ?pipeline= that is not an id
            return
        if uuids:
            field = self.fields["upstream_blocks"]
            field.help_text = f"{field.help_text} Blocks of this pipeline: {', '.join(uuids)}."

    def clean_content(self) -> str:
        return (self.cleaned_data.get("content") or "").replace("\r\n", "\n")

    def clean(self) -> dict[str, Any]:
        super().clean()  # ModelForm's returns self.cleaned_data
        cleaned = self.cleaned_data
        _json_default(cleaned, {"configuration": {}, "extra": {}})
        # 1. Field checks that need no database (syntax, types), reported even when
        #    another field is wrong.
        try:
            uuid = cleaned.get("uuid") or self.instance.uuid
            services.validate_block_fields(self._service_fields(), label=f"{cleaned.get('type')}/{uuid}")
        except ValidationError as exc:
            add_service_errors(self, exc)
        # 2. The service itself on a savepoint that is rolled back: the upstream checks
        #    (unknown block, listed twice, a cycle) and anything the service adds later.
        if not self.errors:
            try:
                _dry_run(self._dry_run_call)
            except ValidationError as exc:
                add_service_errors(self, exc)
            except IntegrityError as exc:
                self._integrity_error = exc
        return cleaned

    def _post_clean(self) -> None:
        super()._post_clean()  # type: ignore[misc]  # django-stubs omit BaseModelForm._post_clean
        # A uuid already used in the pipeline fails the dry run's insert; ModelForm's
        # unique check, which runs after clean(), names it. Anything else is shown raw.
        if self._integrity_error is not None and not self.errors:
            self.add_error(None, f"The block could not be saved: {self._integrity_error}")

    def _service_fields(self) -> dict[str, Any]:
        names = [n for n in services.BLOCK_FIELDS if n in self.fields]
        fields = {n: self.cleaned_data[n] for n in names if n in self.cleaned_data}
        if self.instance.pk is None and fields.get("position") is None:
            fields.pop("position", None)  # the service appends the block
        return fields

    def _upstreams_for_service(self) -> list[str] | None:
        # Unchanged upstreams on an existing block are left alone (their rows too).
        if self.instance.pk and "upstream_blocks" not in self.changed_data:
            return None
        return self.cleaned_data.get("upstream_blocks") or []

    def _dry_run_call(self) -> None:
        if self.instance.pk is None:
            self._create()
        else:
            # A fresh copy: the service sets attributes on the block it is given.
            self._update(Block.objects.get(pk=self.instance.pk))

    def _create(self) -> Block:
        fields = self._service_fields()
        return services.block_create(
            pipeline=self.cleaned_data["pipeline"], uuid=self.cleaned_data["uuid"],
            type=fields.pop("type"), upstream_blocks=self._upstreams_for_service() or [], **fields,
        )

    def _update(self, block: Block) -> Block:
        return services.block_update(block, upstream_blocks=self._upstreams_for_service(), **self._service_fields())

    def save_with_service(self, obj: Block, *, change: bool) -> Block:
        if change:
            return self._update(obj)
        copy_saved(obj, self._create())
        return obj


class _BlockChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: Block) -> str:
        return f"{obj.pipeline.uuid} / {obj.uuid}"


class BlockEdgeAdminForm(forms.ModelForm):
    """Add one edge: the downstream block's upstreams are set again by the service with
    the new one inserted, so a cycle or a block of another pipeline is refused."""

    downstream = _BlockChoiceField(queryset=Block.objects.select_related("pipeline").order_by("pipeline__uuid", "position"))
    upstream = _BlockChoiceField(queryset=Block.objects.select_related("pipeline").order_by("pipeline__uuid", "position"))
    position = forms.IntegerField(
        min_value=0, required=False,
        help_text="Place among the downstream block's upstreams (0 is first); empty puts it last.",
    )

    class Meta:
        model = BlockEdge
        fields = ("downstream", "upstream", "position")

    def clean(self) -> dict[str, Any]:
        super().clean()  # ModelForm's returns self.cleaned_data
        cleaned = self.cleaned_data
        if not self.errors:
            try:
                _dry_run(lambda: self._set_upstreams(Block.objects.get(pk=cleaned["downstream"].pk)))
            except ValidationError as exc:
                add_service_errors(self, _rename_key(exc, "upstream_blocks", "upstream"))
        return cleaned

    def _get_validation_exclusions(self) -> set[str]:
        # An empty position means "last"; the service numbers the edges.
        return {*super()._get_validation_exclusions(), "position"}  # type: ignore[misc]  # not in django-stubs

    def _set_upstreams(self, downstream: Block) -> None:
        upstream = self.cleaned_data["upstream"].uuid
        ups = [u for u in block_upstream_uuids(downstream) if u != upstream]
        position = self.cleaned_data.get("position")
        ups.insert(len(ups) if position is None else position, upstream)
        services.block_set_upstreams(downstream, ups)

    def save_with_service(self, obj: BlockEdge) -> BlockEdge:
        downstream = self.cleaned_data["downstream"]
        self._set_upstreams(downstream)
        copy_saved(obj, BlockEdge.objects.get(downstream=downstream, upstream=self.cleaned_data["upstream"]))
        return obj


def _rename_key(exc: ValidationError, old: str, new: str) -> ValidationError:
    if hasattr(exc, "error_dict") and old in exc.error_dict:
        return ValidationError({(new if k == old else k): v for k, v in exc.error_dict.items()})
    return exc

