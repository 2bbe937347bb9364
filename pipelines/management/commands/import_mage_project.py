from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from pipelines.mage_format import MageFormatError, import_project


class Command(BaseCommand):
    help = (
        "Create or update the pipelines of a Mage project folder (pipelines/<uuid>/metadata.yaml "
        "and the block files). All or nothing: a broken file changes nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("directory", help="The Mage project folder (the one holding pipelines/).")

    def handle(self, *args, **opts):
        try:
            pipelines = import_project(opts["directory"])
        except MageFormatError as exc:
            raise CommandError(str(exc)) from None
        for pipeline in pipelines:
            count = pipeline.blocks.count()
            self.stdout.write(f"  {pipeline.uuid:<32} {count} block{'' if count == 1 else 's'}")
        self.stdout.write(f"Imported {len(pipelines)} pipeline{'' if len(pipelines) == 1 else 's'} from {opts['directory']}")
