from __future__ import annotations

import os
import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = (
        "Create the admin user if no superuser exists. The name comes from "
        "MILLRACE_ADMIN_USER (default `admin`), the password from MILLRACE_ADMIN_PASSWORD, "
        "else one is generated and printed once. Reset a lost password with "
        "`manage.py changepassword <name>`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default=os.environ.get("MILLRACE_ADMIN_USER", "admin"))

    def handle(self, *args: Any, **opts: Any) -> None:
        User = get_user_model()
        existing = User.objects.filter(is_superuser=True).order_by("pk").first()
        if existing is not None:
            # Run on every `make run`: say who the admin is, since its password was shown
            # only once, on the first start.
            name = existing.get_username()
            self.stdout.write(
                f"Admin user {name!r} exists; a lost password is reset with "
                f"`manage.py changepassword {name}`."
            )
            return
        username = opts["username"]
        chosen = os.environ.get("MILLRACE_ADMIN_PASSWORD")
        password = chosen or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        if chosen:
            self.stdout.write(f"Created admin user {username!r} with the password from MILLRACE_ADMIN_PASSWORD.")
        else:
            self.stdout.write(
                f"Created admin user {username!r} with password {password}\n"
                "This password is shown only this once (set MILLRACE_ADMIN_PASSWORD before the "
                f"first start to choose it); reset it with `manage.py changepassword {username}`."
            )
