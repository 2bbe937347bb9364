"""The logs page of a pipeline: filters, cursor pagination, bad input, access, HTMX."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from html import unescape

import pytest

from pipelines.models import Pipeline
from runs import orchestrator
from runs.models import LogEntry, PipelineRun, PipelineRunStatus
from runs.services import run_execute_sync
from tests.helpers import block_code, make_pipeline

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
ROW = re.compile(r'<tr class="log-line[^"]*">(.*?)</tr>', re.S)
MESSAGE = re.compile(r"<pre>(.*?)</pre>", re.S)


def url(pipeline: Pipeline, query: str = "") -> str:
    return f"/pipelines/{pipeline.uuid}/logs{query}"


def messages(response) -> list[str]:
    """The messages of the log lines shown, top to bottom."""
    html = response.content.decode()
    return [unescape(MESSAGE.search(row).group(1)) for row in ROW.findall(html)]


def older_link(response) -> str | None:
    found = re.search(r'<a href="([^"]*)" rel="next"', response.content.decode())
    return unescape(found.group(1)) if found else None


@pytest.fixture
def pipeline() -> Pipeline:
    return make_pipeline("orders", [("load", "data_loader", block_code("data_loader", "return 1"))])


def run_of(pipeline: Pipeline) -> PipelineRun:
    return PipelineRun.objects.create(pipeline=pipeline, status=PipelineRunStatus.COMPLETED)


def log(run: PipelineRun, message: str, ts: datetime = T0, **fields) -> LogEntry:
    return LogEntry(pipeline_run=run, timestamp=ts, message=message, **fields)


@pytest.fixture
def signed_in(client, viewer_user):
    client.force_login(viewer_user)
    return client


def test_an_anonymous_user_is_sent_to_login(client, pipeline):
    response = client.get(url(pipeline, "?level=ERROR"))
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=/pipelines/orders/logs")


def test_an_unknown_pipeline_is_404(signed_in):
    assert signed_in.get("/pipelines/nope/logs").status_code == 404


def test_a_post_is_refused(signed_in, pipeline):
    assert signed_in.post(url(pipeline)).status_code == 405


def test_a_viewer_sees_the_lines_newest_first_with_their_columns(signed_in, pipeline):
    run = run_of(pipeline)
    LogEntry.objects.bulk_create([
        log(run, "old", T0, block_uuid="load", block_type="data_loader", attempt=2),
        log(run, "new <b>bold</b>", T0 + timedelta(seconds=5), level="ERROR"),
    ])
    response = signed_in.get(url(pipeline))
    assert response.status_code == 200
    assert messages(response) == ["new <b>bold</b>", "old"]
    html = response.content.decode()
    assert "&lt;b&gt;bold&lt;/b&gt;" in html  # escaped, never markup
    assert f'href="/pipelines/orders/runs/{run.pk}"' in html
    assert "2026-12-01 12:00:05" in html
    assert "data_loader" in html and '<td class="log-attempt">2</td>' in html
    assert 'aria-current="page">Logs' in html
    assert "runs/logs.css" in html


def test_a_long_message_is_folded(signed_in, pipeline):
    run = run_of(pipeline)
    LogEntry.objects.bulk_create([log(run, "Traceback\n" + "line\n" * 20), log(run, "short")])
    html = signed_in.get(url(pipeline)).content.decode()
    assert html.count("<details>") == 1
    assert "<summary>Traceback</summary>" in html


def test_other_pipelines_lines_never_show(signed_in, pipeline):
    other = make_pipeline("other", [])
    LogEntry.objects.bulk_create([log(run_of(pipeline), "mine"), log(run_of(other), "theirs")])
    assert messages(signed_in.get(url(pipeline))) == ["mine"]
    # Not even when asked for the other pipeline's run by id.
    theirs = PipelineRun.objects.get(pipeline=other)
    assert messages(signed_in.get(url(pipeline, f"?pipeline_run_id={theirs.pk}"))) == []


@pytest.fixture
def varied(pipeline):
    first, second = run_of(pipeline), run_of(pipeline)
    LogEntry.objects.bulk_create([
        log(first, "debug line", T0, level="DEBUG", block_uuid="load", block_type="data_loader"),
        log(first, "info line", T0 + timedelta(minutes=1), level="INFO", block_uuid="clean", block_type="transformer"),
        log(second, "Warning: Disk", T0 + timedelta(minutes=2), level="WARNING", block_uuid="load", block_type="data_loader"),
        log(second, "error line", T0 + timedelta(minutes=3), level="ERROR", block_uuid="save", block_type="data_exporter"),
        log(second, "run finished", T0 + timedelta(minutes=4), level="CRITICAL"),
    ])
    return first, second


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["run finished", "error line", "Warning: Disk", "info line", "debug line"]),
        ("?level=WARNING", ["run finished", "error line", "Warning: Disk"]),
        ("?level=DEBUG", ["run finished", "error line", "Warning: Disk", "info line", "debug line"]),
        ("?block_type=data_loader", ["Warning: Disk", "debug line"]),
        ("?block_uuid=load", ["Warning: Disk", "debug line"]),
        ("?q=DISK", ["Warning: Disk"]),
        ("?q=line", ["error line", "info line", "debug line"]),
        ("?since=2026-12-01T12:01&until=2026-12-01T12:03", ["error line", "Warning: Disk", "info line"]),
        ("?since=2026-12-01T12:03:30", ["run finished"]),
        ("?level=INFO&block_uuid=load", ["Warning: Disk"]),
    ],
)
def test_each_filter_narrows_the_lines(signed_in, pipeline, varied, query, expected):
    assert messages(signed_in.get(url(pipeline, query))) == expected


def test_the_run_filter_keeps_one_run(signed_in, pipeline, varied):
    first, _ = varied
    response = signed_in.get(url(pipeline, f"?pipeline_run_id={first.pk}"))
    assert messages(response) == ["info line", "debug line"]
    # The form keeps its values.
    assert f'name="pipeline_run_id" value="{first.pk}"' in response.content.decode()


def test_the_form_keeps_every_value(signed_in, pipeline, varied):
    html = signed_in.get(url(pipeline, "?level=ERROR&block_type=transformer&q=a+b&since=2026-12-01T12:01")).content.decode()
    assert re.search(r'<option value="ERROR" selected>', html)
    assert re.search(r'<option value="transformer" selected>', html)
    assert 'name="q" value="a b"' in html
    assert 'type="datetime-local"' in html and 'value="2026-12-01T12:01"' in html


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("?pipeline_run_id=abc", "Run id"),
        ("?pipeline_run_id=99999999999999999999999", "Run id"),
        ("?since=yesterday", "From (UTC)"),
        ("?until=2026-13-45T99:99", "To (UTC)"),
        ("?level=LOUD", "Level at least"),
        ("?block_type=%00", "Block type"),
        ("?q=a%00b", "Message contains"),
    ],
)
def test_a_bad_filter_is_named_and_ignored(signed_in, pipeline, varied, query, named):
    response = signed_in.get(url(pipeline, query))
    assert response.status_code == 200
    html = unescape(response.content.decode())
    assert f'<li class="error">{named}:' in html
    assert len(messages(response)) == 5  # the bad filter narrows nothing


@pytest.mark.parametrize(
    "before",
    ["garbage", "2026-12-01T12:00:00.000000Z_x", "2026-12-01T12:00:00.000000Z_0", "_5",
     "2026-12-01T12:00:00.000000Z_99999999999999999999", "9999-99-99T00:00:00.000000Z_3", "%00"],
)
def test_a_garbage_cursor_shows_the_newest_lines_with_a_message(signed_in, pipeline, varied, before):
    response = signed_in.get(url(pipeline), {"before": before})
    assert response.status_code == 200
    assert "this page link is not valid" in response.content.decode()
    assert messages(response)[0] == "run finished"


def walk(client, first_url: str) -> tuple[list[str], list[int]]:
    """Follow the Older links from `first_url`: every message seen, and the page sizes."""
    seen: list[str] = []
    sizes: list[int] = []
    next_url: str | None = first_url
    while next_url:
        response = client.get(next_url)
        assert response.status_code == 200
        page = messages(response)
        seen += page
        sizes.append(len(page))
        link = older_link(response)
        next_url = first_url.split("?")[0] + link if link else None
        assert len(sizes) < 20, "the pager does not end"
    return seen, sizes


def test_the_cursor_walks_every_line_once_in_order_even_with_equal_timestamps(signed_in, pipeline):
    run = run_of(pipeline)
    # 250 lines, in groups of 7 sharing one timestamp (a chunk of output shares one),
    # inserted out of time order so that ids and times disagree.
    entries = [log(run, f"m{i:03d}", T0 + timedelta(seconds=(i // 7))) for i in range(250)]
    LogEntry.objects.bulk_create(list(reversed(entries[:120])) + entries[120:])
    ordered = sorted(LogEntry.objects.filter(pipeline_run=run), key=lambda e: (e.timestamp, e.pk), reverse=True)
    seen, sizes = walk(signed_in, url(pipeline))
    assert sizes == [100, 100, 50]
    assert seen == [e.message for e in ordered]
    assert len(set(seen)) == 250


def test_the_links_keep_the_filters_and_newest_goes_back(signed_in, pipeline):
    run = run_of(pipeline)
    LogEntry.objects.bulk_create(
        [log(run, f"keep {i}", T0 + timedelta(seconds=i), level="ERROR") for i in range(150)]
        + [log(run, f"drop {i}", T0 + timedelta(seconds=i), level="INFO") for i in range(150)]
    )
    first = signed_in.get(url(pipeline, "?level=ERROR&q=keep"))
    link = older_link(first)
    assert link is not None and "level=ERROR" in link and "q=keep" in link and "before=" in link
    assert "Newest" not in first.content.decode()
    second = signed_in.get(url(pipeline, link))
    assert messages(second) == [f"keep {i}" for i in range(49, -1, -1)]
    assert older_link(second) is None
    newest = re.search(r'<a href="([^"]*)" hx-get="[^"]*" hx-target="#logs-table" hx-push-url="true">Newest', second.content.decode())
    assert newest is not None
    back = unescape(newest.group(1))
    assert "before=" not in back and "level=ERROR" in back
    assert messages(signed_in.get(url(pipeline, back)))[0] == "keep 149"


def test_lines_written_meanwhile_do_not_shift_the_next_page(signed_in, pipeline):
    run = run_of(pipeline)
    LogEntry.objects.bulk_create([log(run, f"m{i}", T0 + timedelta(seconds=i)) for i in range(150)])
    link = older_link(signed_in.get(url(pipeline)))
    LogEntry.objects.bulk_create([log(run, f"late{i}", T0 + timedelta(hours=1)) for i in range(30)])
    assert messages(signed_in.get(url(pipeline, link)))[0] == "m49"


@pytest.mark.parametrize("lines", [5, 300])
def test_the_number_of_queries_does_not_grow_with_the_lines(signed_in, pipeline, django_assert_max_num_queries, lines):
    runs = [run_of(pipeline) for _ in range(3)]
    LogEntry.objects.bulk_create(
        [log(runs[i % 3], f"m{i}", T0 + timedelta(seconds=i), block_uuid="load", block_type="data_loader") for i in range(lines)]
    )
    # The session and the user, the pipeline, the page of lines.
    with django_assert_max_num_queries(4):
        response = signed_in.get(url(pipeline, "?level=INFO"))
    assert len(messages(response)) == min(lines, 100)


def test_an_htmx_request_gets_only_the_table(signed_in, pipeline, varied):
    response = signed_in.get(url(pipeline, "?level=ERROR"), headers={"HX-Request": "true", "HX-Target": "logs-table"})
    html = response.content.decode()
    assert "<html" not in html and "<form" not in html
    assert '<table class="logs">' in html
    assert messages(response) == ["run finished", "error line"]
    assert "HX-Request" in response["Vary"]
    # A history restore needs the whole page.
    restore = signed_in.get(url(pipeline), headers={"HX-Request": "true", "HX-History-Restore-Request": "true"})
    assert "<html" in restore.content.decode()


def test_the_full_page_swaps_the_table_with_htmx(signed_in, pipeline):
    html = signed_in.get(url(pipeline)).content.decode()
    assert 'hx-get="/pipelines/orders/logs" hx-target="#logs-table"' in html
    assert '<div id="logs-table">' in html
    assert 'method="get"' in html


def test_a_real_run_s_lines_show(signed_in):
    pipeline = make_pipeline(
        "real",
        [
            ("load", "data_loader", block_code("data_loader", "print('hello from load')\nreturn 1")),
            ("boom", "transformer", block_code("transformer", "raise ValueError('no <good>')"), ["load"]),
        ],
    )
    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))
    assert run.status == PipelineRunStatus.FAILED
    response = signed_in.get(url(pipeline, "?block_uuid=load"))
    assert "hello from load" in messages(response)
    errors = messages(signed_in.get(url(pipeline, "?level=ERROR")))
    assert errors and any("no <good>" in m for m in errors)
    assert messages(signed_in.get(url(pipeline, "?block_type=transformer&q=hello"))) == []
    html = signed_in.get(url(pipeline)).content.decode()
    assert f'href="/pipelines/real/runs/{run.pk}"' in html
