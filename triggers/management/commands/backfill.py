"""`manage.py backfill <pipeline uuid> --start ... --end ... --interval @daily`."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.common import jsonsafe
from pipelines.models import Pipeline
from triggers import services

# The service's field names and the options that set them, for error messages.
_OPTIONS = {"start": "--start", "end": "--end", "interval": "--interval", "timezone": "--timezone",
            "variables": "--variables", "name": "--name", "pipeline": "pipeline"}


class Command(BaseCommand):
    help = (
        "Create one run of a pipeline per logical date from --start to --end (inclusive) every "
        "--interval, with execution_date set to each date. Dates without an offset are read in "
        "--timezone."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("pipeline", help="The pipeline's uuid.")
        parser.add_argument("--start", required=True, help="First logical date: 2024-01-01 or 2024-01-01T06:00[+02:00].")
        parser.add_argument("--end", required=True, help="Last logical date (inclusive), same formats.")
        parser.add_argument("--interval", required=True, help="@hourly, @daily, @weekly, @monthly or a 5-field cron expression.")
        parser.add_argument("--variables", default="", help="Runtime variables as a JSON object.")
        parser.add_argument("--timezone", default="UTC", help="IANA time zone of the interval and of dates without an offset.")
        parser.add_argument("--name", default="", help="A name for the backfill.")

    def handle(self, *args: Any, **opts: Any) -> None:
        pipeline = Pipeline.objects.filter(uuid=opts["pipeline"]).first()
        if pipeline is None:
            raise CommandError(f"pipeline: no pipeline with uuid {opts['pipeline']!r}")
        try:
            backfill = services.backfill_create(
                pipeline=pipeline, start=_moment("--start", opts["start"]), end=_moment("--end", opts["end"]),
                interval=opts["interval"], timezone=opts["timezone"], variables=_variables(opts["variables"]),
                name=opts["name"],
            )
        except ValidationError as exc:
            raise CommandError(_message(exc)) from None
        self.stdout.write(
            f"Backfill {backfill.pk}: created {backfill.total_runs} run{'s' if backfill.total_runs != 1 else ''} "
            f"of {pipeline.uuid} from {backfill.start_datetime.isoformat()} to {backfill.end_datetime.isoformat()} "
            f"every {backfill.interval} ({backfill.timezone})."
        )


def _moment(option: str, text: str) -> datetime:
    """An ISO date or date-time; without an offset the service reads it in --timezone."""
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            return datetime.combine(date.fromisoformat(text.strip()), datetime.min.time())
        except ValueError:
            raise CommandError(f"{option}: {text!r} is not a date (2024-01-31) or date-time (2024-01-31T06:00)") from None


def _variables(text: str) -> dict:
    """`--variables`, parsed by the rules every entry point uses (jsonsafe)."""
    if not text.strip():
        return {}
    try:
        value = jsonsafe.loads(text, root="--variables")
    except jsonsafe.JSONValueError as exc:
        raise CommandError(str(exc)) from None
    if not isinstance(value, dict):
        raise CommandError(f"--variables: must be a JSON object, not {type(value).__name__}")
    return value


def _message(exc: ValidationError) -> str:
    if not hasattr(exc, "error_dict"):
        return "; ".join(exc.messages)
    return "; ".join(f"{_OPTIONS.get(field, field)}: {' '.join(msgs)}" for field, msgs in exc.message_dict.items())
