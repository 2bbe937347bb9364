from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from pipelines.mage_format import MageFormatError, project_import


class Command(BaseCommand):
    help = (
        "Create or update the pipelines of a Mage project folder (pipelines/<uuid>/metadata.yaml "
        "and the block files). All or nothing: a broken file changes nothing."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("directory", help="The Mage project folder (the one holding pipelines/).")
        parser.add_argument(
            "--keep-edited", action="store_true",
            help="Leave as it is a pipeline changed in Millrace since its last import (or never imported); "
                 "import the others. `make run` imports examples/ this way.",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            result = project_import(opts["directory"], keep_edited=opts["keep_edited"])
        except MageFormatError as exc:
            raise CommandError(str(exc)) from None
        for pipeline in result.imported:
            count = pipeline.blocks.count()
            self.stdout.write(f"  {pipeline.uuid:<32} {count} block{'' if count == 1 else 's'}")
        for uuid, reason in result.kept:
            self.stdout.write(f"{uuid}: {reason}; left as it is (import without --keep-edited to overwrite)")
        imported = len(result.imported)
        kept = f"; left {len(result.kept)} as {'it is' if len(result.kept) == 1 else 'they are'}" if result.kept else ""
        self.stdout.write(f"Imported {imported} pipeline{'' if imported == 1 else 's'} from {opts['directory']}{kept}")
