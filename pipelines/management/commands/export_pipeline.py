from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from pipelines.mage_format import MageFormatError, export_pipeline
from pipelines.models import Pipeline


class Command(BaseCommand):
    help = (
        "Write a pipeline in Mage's project format: <dir>/pipelines/<uuid>/metadata.yaml and "
        "the block files under their type folders (plus a project metadata.yaml if missing)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("uuid")
        parser.add_argument("directory", help="The Mage project folder to write into (created if missing).")

    def handle(self, *args: Any, **opts: Any) -> None:
        pipeline = Pipeline.objects.filter(uuid=opts["uuid"]).first()
        if pipeline is None:
            raise CommandError(f"No pipeline {opts['uuid']!r}")
        try:
            written = export_pipeline(pipeline, opts["directory"])
        except (MageFormatError, OSError) as exc:
            raise CommandError(f"Cannot export {pipeline.uuid}: {exc}") from None
        for path in written:
            self.stdout.write(f"  {path}")
        self.stdout.write(f"Exported {pipeline.uuid} to {opts['directory']} ({len(written)} files)")
