"""The two role groups of config/permissions.py, present in every installation so that an
administrator only has to add people to them (staff administer; see the README)."""

from django.db import migrations

GROUPS = ("editors", "viewers")


def create_groups(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    for name in GROUPS:
        Group.objects.get_or_create(name=name)


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("pipelines", "0001_initial"),
    ]

    operations = [migrations.RunPython(create_groups, migrations.RunPython.noop)]
