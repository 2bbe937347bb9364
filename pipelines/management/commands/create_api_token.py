from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = (
        "Print the API token of a user, creating it if the user has none. Send it as "
        "`Authorization: Token <key>` (or `Bearer <key>`). With --rotate the old token "
        "stops working and a new one is printed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--rotate", action="store_true", help="Replace the user's token with a new one.")

    def handle(self, *args: Any, **opts: Any) -> None:
        User = get_user_model()
        username = opts["username"]
        user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
        if user is None:
            raise CommandError(f"No user {username!r}")
        if not user.is_active:
            # DRF refuses the token of an inactive user: printing one would mislead.
            raise CommandError(f"User {username!r} is inactive; activate it first")
        with transaction.atomic():
            if opts["rotate"]:
                Token.objects.filter(user=user).delete()
            token, _ = Token.objects.get_or_create(user=user)
        # Only the key on stdout, so that `TOKEN=$(manage.py create_api_token bob)` works;
        # how to use it goes to stderr, which a terminal still shows (plain: it is no error,
        # and stderr is styled as one by default).
        self.stdout.write(token.key)
        self.stderr.write(usage(token.key), style_func=lambda text: text)


def usage(key: str) -> str:
    return (
        f"Send it on /api/ calls as `Authorization: Token {key}` "
        f"(or `Authorization: Bearer {key}`).\n"
        "An API trigger (POST /api/pipeline_schedules/<id>/pipeline_runs/<token>) takes the "
        "trigger's own token in its URL instead: an editor sees it as `token` in "
        "GET /api/pipeline_schedules/<id>, and on the trigger's page in the admin."
    )
