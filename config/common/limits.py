"""Bounds on the numbers users set (timeouts, SLAs, retries, concurrency), and the pure
validators every entry point uses through the services: admin forms, the Mage import,
the API and the management commands. Documented in the README ("Limits").

Why these bounds:

- MAX_SECONDS (30 days, 2,592,000 s) for every duration: a block's `timeout`, a
  trigger's `settings.timeout` and `settings.sla`, and a retry's `delay` and
  `max_delay`. Every column that holds one is an integer column that fits 2^31 - 1
  (PositiveIntegerField on PostgreSQL and SQLite), and a deadline of now + MAX_SECONDS
  is a valid date on every database; 30 days is also longer than any run or SLA we have
  heard of, so a larger number is a typo (milliseconds, or an exponent), not a wish.
- MAX_RETRIES (100): Mage's retries are a handful; more is a loop that never ends.
  With `exponential_backoff` the longest wait (`delay * 2**(retries - 1)`, capped by
  `max_delay`) must also stay within MAX_SECONDS, so that the time of the next attempt
  is always a date the database holds.
- MAX_CONCURRENCY (10,000) for `block_run_limit` and `pipeline_run_limit`: far more
  than the workers of any machine, small enough that a typo is refused.

Each validator raises Django's ValidationError keyed by the field it is given, with a
message naming the exact setting (`retry_config.retries`), and returns the value.
"""

from __future__ import annotations

import math
from typing import Any

from django.core.exceptions import ValidationError

MAX_SECONDS = 30 * 24 * 60 * 60
MAX_RETRIES = 100
MAX_CONCURRENCY = 10_000

# Mage's RetryConfig keys; nothing else has a meaning.
RETRY_CONFIG_KEYS = ("retries", "delay", "exponential_backoff", "max_delay")
CONCURRENCY_LIMIT_KEYS = ("block_run_limit", "pipeline_run_limit")


def _invalid(field: str, message: str) -> ValidationError:
    return ValidationError({field: [message]})


def is_int(value: Any) -> bool:
    """An int that is not a bool (True is an int in Python, never a count in JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))


def validate_seconds(field: str, value: Any, *, name: str | None = None, minimum: int = 0) -> int:
    """A whole number of seconds from `minimum` to MAX_SECONDS. `name` is what the
    message calls it (`settings.timeout`), `field` the key of the error."""
    name = name or field
    if not is_int(value) or not minimum <= value <= MAX_SECONDS:
        bounds = f"a whole number up to {MAX_SECONDS:,}, 30 days"
        wanted = f"a positive number of seconds ({bounds})" if minimum == 1 else f"a number of seconds from {minimum} ({bounds})"
        raise _invalid(field, f"{name} must be {wanted}, not {value!r}")
    return value


def _number_of_seconds(field: str, name: str, value: Any) -> float:
    if not _is_number(value) or not 0 <= value <= MAX_SECONDS:
        raise _invalid(field, f"{name} must be a number of seconds from 0 to {MAX_SECONDS:,} (30 days), not {value!r}")
    return value


def validate_retry_config(field: str, value: Any) -> dict | None:
    """Mage's `retry_config`: `retries` (0 to MAX_RETRIES), `delay` and `max_delay`
    (seconds, 0 to MAX_SECONDS), `exponential_backoff` (true or false); each may be
    null (the default). None is "no retry config" (a block then uses its pipeline's)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(field, f"{field} must be a JSON object, not {type(value).__name__}")
    unknown = [key for key in value if key not in RETRY_CONFIG_KEYS]
    if unknown:
        raise _invalid(field, f"{field} has unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(RETRY_CONFIG_KEYS)}")
    retries = value.get("retries")
    if retries is not None and (not is_int(retries) or not 0 <= retries <= MAX_RETRIES):
        raise _invalid(field, f"{field}.retries must be a whole number from 0 to {MAX_RETRIES}, not {retries!r}")
    for key in ("delay", "max_delay"):
        if value.get(key) is not None:
            _number_of_seconds(field, f"{field}.{key}", value[key])
    backoff = value.get("exponential_backoff")
    if backoff is not None and not isinstance(backoff, bool):
        raise _invalid(field, f"{field}.exponential_backoff must be true or false, not {backoff!r}")
    _check_longest_wait(field, value)
    return value


def _check_longest_wait(field: str, value: dict) -> None:
    """With exponential backoff the wait doubles each attempt; the last one must still
    fit MAX_SECONDS (the runtime reads a missing delay as 5 seconds)."""
    retries = value.get("retries") or 0
    if not value.get("exponential_backoff") or retries < 1 or value.get("max_delay") is not None:
        return
    delay = value.get("delay") if value.get("delay") is not None else 5
    if delay * 2 ** (retries - 1) > MAX_SECONDS:
        raise _invalid(
            field,
            f"{field}: with exponential_backoff, {retries} retries from a delay of {delay} s would wait "
            f"more than {MAX_SECONDS:,} s (30 days) before the last one; set {field}.max_delay or fewer retries",
        )


def validate_concurrency_config(field: str, value: Any) -> dict:
    """`block_run_limit` and `pipeline_run_limit`: null, or a whole number from 1 to
    MAX_CONCURRENCY. Mage's other keys are kept as they are."""
    if not isinstance(value, dict):
        raise _invalid(field, f"{field} must be a JSON object, not {type(value).__name__}")
    for key in CONCURRENCY_LIMIT_KEYS:
        item = value.get(key)
        if item is not None and (not is_int(item) or not 1 <= item <= MAX_CONCURRENCY):
            raise _invalid(field, f"{field}.{key} must be a positive integer up to {MAX_CONCURRENCY:,}, not {item!r}")
    return value
