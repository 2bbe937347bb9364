from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create the admin user if no superuser exists. The password comes from "
        "MILLRACE_ADMIN_PASSWORD, else one is generated and printed once."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default=os.environ.get("MILLRACE_ADMIN_USER", "admin"))

    def handle(self, *args, **opts):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        password = os.environ.get("MILLRACE_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=opts["username"], email="", password=password)
        if os.environ.get("MILLRACE_ADMIN_PASSWORD"):
            self.stdout.write(f"Created admin user {opts['username']!r} with the password from MILLRACE_ADMIN_PASSWORD")
        else:
            self.stdout.write(
                f"Created admin user {opts['username']!r} with password {password}\n"
                "(shown this once; set MILLRACE_ADMIN_PASSWORD to choose it)"
            )
