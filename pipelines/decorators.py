"""The block decorators. They only mark a function with its role; the executor finds the
marked functions in the block's globals after running its code.

The executor also registers this module as `mage_ai.data_preparation.decorators`, so the
import guard of a Mage block file resolves to these same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ROLE_ATTR = "__millrace_role__"

MAIN_ROLES = ("data_loader", "transformer", "data_exporter", "custom", "sensor")
EXTRA_ROLES = ("test", "condition", "on_success", "on_failure", "callback")


def _marker(role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        setattr(function, ROLE_ATTR, role)
        return function

    decorate.__name__ = role
    return decorate


data_loader = _marker("data_loader")
transformer = _marker("transformer")
data_exporter = _marker("data_exporter")
custom = _marker("custom")
sensor = _marker("sensor")
test = _marker("test")
condition = _marker("condition")
on_success = _marker("on_success")
on_failure = _marker("on_failure")


def callback(arg: Any = None) -> Any:
    """`@callback` and `@callback('success')` / `@callback('failure')` as in Mage."""
    if callable(arg):
        setattr(arg, ROLE_ATTR, "callback")
        return arg
    role = {"success": "on_success", "failure": "on_failure"}.get(arg or "", "callback")
    return _marker(role)


# Mage accepts these spellings too.
data_exporters = data_exporter
transformers = transformer

DECORATORS: dict[str, Callable[..., Any]] = {
    "data_loader": data_loader,
    "transformer": transformer,
    "data_exporter": data_exporter,
    "custom": custom,
    "sensor": sensor,
    "test": test,
    "condition": condition,
    "on_success": on_success,
    "on_failure": on_failure,
    "callback": callback,
}
