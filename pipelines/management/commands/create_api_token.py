from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = (
        "Print the API token of a user, creating it if the user has none. Send it as "
        "`Authorization: Token <key>` (or `Bearer <key>`). With --rotate the old token "
        "stops working and a new one is printed."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--rotate", action="store_true", help="Replace the user's token with a new one.")

    def handle(self, *args, **opts):
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
        # Only the key on stdout, so that `TOKEN=$(manage.py create_api_token bob)` works.
        self.stdout.write(token.key)
