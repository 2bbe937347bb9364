"""Who may do what, for pages and the API alike.

Three roles over Django's own users and groups (no app model involved, so every app can
use this module):

- staff and superusers administer (and so may also change and run);
- members of the group `editors` change definitions and start runs;
- members of the group `viewers`, and any other signed-in user, read only.

This module is named in DRF's settings, so it must not import `rest_framework.views`
(directly or through `config.common.api`): DRF reads its settings while that module loads.

An inactive user is nobody: Django refuses their login and DRF their token, and these
functions say no as well in case such a user object reaches them another way.
"""

from __future__ import annotations

from typing import Any

from rest_framework.authentication import TokenAuthentication
from rest_framework.permissions import SAFE_METHODS, BasePermission

EDITORS_GROUP = "editors"
VIEWERS_GROUP = "viewers"

# Group names are cached on the user object: a request asks several times (the
# permission class, then the serializer deciding whether to show a token).
_GROUPS_CACHE = "_millrace_group_names"


def _group_names(user: Any) -> frozenset[str]:
    cached = getattr(user, _GROUPS_CACHE, None)
    if cached is None:
        cached = frozenset(user.groups.values_list("name", flat=True))
        setattr(user, _GROUPS_CACHE, cached)
    return cached


def user_can_view(user: Any) -> bool:
    """Any active, signed-in user may read."""
    return bool(user is not None and user.is_authenticated and user.is_active)


def user_is_admin(user: Any) -> bool:
    return user_can_view(user) and bool(user.is_staff or user.is_superuser)


def user_can_edit(user: Any) -> bool:
    """Staff, superusers and members of `editors` may change things and start runs."""
    if not user_can_view(user):
        return False
    return user_is_admin(user) or EDITORS_GROUP in _group_names(user)


class CanView(BasePermission):
    """Every method needs a signed-in user (session or token)."""

    message = "Authentication credentials were not provided or are not valid."

    def has_permission(self, request: Any, view: Any) -> bool:
        return user_can_view(request.user)


class CanEdit(BasePermission):
    """Reading needs a signed-in user; anything else needs an editor or staff.

    It is the API's default, so a new view is closed to viewers' writes unless it says
    otherwise."""

    message = "This needs an editor's rights (group 'editors') or staff."

    def has_permission(self, request: Any, view: Any) -> bool:
        if request.method in SAFE_METHODS:
            return user_can_view(request.user)
        return user_can_edit(request.user)


class BearerTokenAuthentication(TokenAuthentication):
    """The same API tokens as DRF's `Authorization: Token <key>`, sent as
    `Authorization: Bearer <key>`, which most HTTP tools offer."""

    keyword = "Bearer"
