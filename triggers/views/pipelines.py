"""The pipelines page: every pipeline with its tags, blocks, active triggers and last
run; filter by tag, search by name; create; delete with a confirmation."""

from __future__ import annotations

import re

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import URLPattern, path
from django.views.decorators.http import require_http_methods

from config.common.permissions import user_can_edit
from pipelines import services as pipeline_services
from pipelines.models import Pipeline
from runs import services as run_services
from triggers import selectors

PAGE_SIZE = 50


class PipelineForm(forms.Form):
    name = forms.CharField(max_length=255)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    tags = forms.CharField(required=False, help_text="Comma separated")

    def clean_tags(self) -> list[str]:
        return [t.strip() for t in self.cleaned_data["tags"].split(",") if t.strip()]


def uuid_for(name: str) -> str:
    """Mage's uuid for a pipeline name: lower case, words joined by underscores."""
    return re.sub(r"[^a-z0-9_-]+", "_", name.strip().lower()).strip("_") or "pipeline"


@login_required
@require_http_methods(["GET", "POST"])
def pipelines_list(request: HttpRequest) -> HttpResponse:
    can_edit = user_can_edit(request.user)
    form = PipelineForm(request.POST if request.method == "POST" else None)
    if request.method == "POST":
        if not can_edit:
            raise PermissionDenied("Only editors create pipelines")
        created = _create(form)
        if created is not None:
            messages.success(request, f"Pipeline {created.uuid} created")
            return HttpResponseRedirect(f"/pipelines/{created.uuid}/runs")
    search = request.GET.get("q", "").strip()[:200]
    tag = request.GET.get("tag", "").strip()[:200]
    page = Paginator(selectors.pipelines_overview(search=search, tag=tag), PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "triggers/pipelines.html", {
        "page": page, "search": search, "tag": tag, "tags": selectors.pipeline_tags(),
        "form": form, "can_edit": can_edit, "show_form": request.method == "POST",
    }, status=400 if request.method == "POST" else 200)


def _create(form: PipelineForm) -> Pipeline | None:
    """The pipeline the form describes, or None with the form's errors set."""
    if not form.is_valid():
        return None
    data = form.cleaned_data
    uuid = uuid_for(data["name"])
    if Pipeline.objects.filter(uuid=uuid).exists():
        form.add_error("name", f"A pipeline {uuid} exists already: choose another name")
        return None
    try:
        return pipeline_services.pipeline_create(uuid=uuid, name=data["name"], description=data["description"], tags=data["tags"])
    except ValidationError as exc:
        for field, errors in exc.message_dict.items():
            form.add_error(field if field in form.fields else None, errors)
        return None


@login_required
@require_http_methods(["GET", "POST"])
def pipeline_delete(request: HttpRequest, uuid: str) -> HttpResponse:
    """GET: the confirmation, saying how many runs go with the pipeline. POST: delete."""
    pipeline = get_object_or_404(Pipeline, uuid=uuid)
    if not user_can_edit(request.user):
        raise PermissionDenied("Only editors delete pipelines")
    if request.method == "POST":
        try:
            count = run_services.pipeline_delete(pipeline)
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
            return HttpResponseRedirect(f"/pipelines/{uuid}/delete")
        messages.success(request, f"Pipeline {uuid} deleted, with {count} run{'' if count == 1 else 's'}")
        return HttpResponseRedirect("/pipelines/")
    runs, active = selectors.pipeline_run_counts(pipeline)
    return render(request, "triggers/pipeline_delete.html", {"pipeline": pipeline, "runs": runs, "active": active})


urlpatterns: list[URLPattern] = [
    path("pipelines/", pipelines_list, name="pipelines"),
    path("pipelines/<slug:uuid>/delete", pipeline_delete, name="pipeline-delete"),
]
