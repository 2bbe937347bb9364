"""One check for every JSON value that enters Millrace: request bodies, runtime
variables, event payloads, trigger settings, pipeline and block configuration, values
read from a Mage project's YAML, `--runtime-vars`.

A value passes when both databases can store it and every later reader (the API, the
pages, a block's kwargs) gets it back unchanged. Refused, naming where in the value:

- a NUL character in a string or a key (PostgreSQL's jsonb cannot hold one);
- a lone surrogate (`"\\ud800"`), which is not text and cannot be encoded as UTF-8;
- NaN, Infinity and numbers too large for a float (`1e999`): not JSON;
- integers beyond 64 bits (JSON readers in other languages lose them), and floats
  beyond that range too (PostgreSQL gives `1e20` back as a 21-digit integer);
- nesting deeper than MAX_DEPTH levels, or more than MAX_BYTES of encoded JSON;
- anything that is not a JSON value (a tuple, a set, a date, a non-string key).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from django.core.exceptions import ValidationError

# Limits, documented in the README ("Limits").
MAX_DEPTH = 64
MAX_BYTES = 1024 * 1024
MAX_INT = 2**64 - 1


class JSONValueError(ValueError):
    """A value that cannot be stored; `path` says where in it (`variables.rows[3]`)."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path or 'the value'}: {problem}")


def _where(path: tuple[Any, ...]) -> str:
    if len(path) > 12:  # a path thousands deep says where it starts and ends
        return f"{_where(path[:4])}...{_where(path[-3:])}"
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"contains a lone surrogate ({text[exc.start]!a}), which is not text"
    return None


class _NotFinite:
    """What `loads` makes of `NaN`, `Infinity` or `1e999`, so that `check` refuses it
    with its path instead of the parser stopping with no idea where it was."""

    __slots__ = ("problem",)

    def __init__(self, text: str, problem: str = "which is not a JSON number"):
        shown = text if len(text) <= 40 else text[:37] + "..."
        self.problem = f"is {shown}, {problem}"


_FLOAT_NAMES = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _scalar_problem(value: Any) -> str | None:
    """What is wrong with a scalar, or None; raises TypeError for a non-JSON type."""
    if isinstance(value, str):  # Django's JSONString is a str subclass
        return _text_problem(value)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -MAX_INT <= value <= MAX_INT else "is an integer larger than 64 bits"
    if type(value) is float:
        if not math.isfinite(value):
            return f"is {_FLOAT_NAMES[str(value)]}, which is not a JSON number"
        # PostgreSQL's jsonb keeps numbers as decimals and gives 1e20 back as the
        # integer 100000000000000000000, which is then refused above: refused now.
        return None if -MAX_INT <= value <= MAX_INT else f"is {value!r}, a number beyond the 64-bit range"
    if type(value) is _NotFinite:
        return value.problem
    raise TypeError(type(value).__name__)


def problem_in(value: Any, *, max_depth: int = MAX_DEPTH, root: str = "") -> JSONValueError | None:
    """The first thing that keeps `value` from being stored, or None. Walks the value
    without recursion, so a value nested thousands deep is reported, not crashed on."""
    stack: list[tuple[Any, tuple[Any, ...], int]] = [(value, (root,) if root else (), 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= max_depth:
                return JSONValueError(_where(path), f"is nested more than {max_depth} levels deep")
            for key, sub in item.items():
                if not isinstance(key, str):
                    return JSONValueError(_where(path), f"has a key {key!r} that is not text")
                bad = _text_problem(key)
                if bad:
                    return JSONValueError(_where(path), f"has a key that {bad}")
                stack.append((sub, (*path, key), depth + 1))
        elif isinstance(item, list):
            if depth >= max_depth:
                return JSONValueError(_where(path), f"is nested more than {max_depth} levels deep")
            stack.extend((sub, (*path, i), depth + 1) for i, sub in enumerate(item))
        else:
            try:
                bad = _scalar_problem(item)
            except TypeError as exc:
                return JSONValueError(_where(path), f"is a {exc}, which is not a JSON value")
            if bad:
                return JSONValueError(_where(path), bad)
    return None


def check(value: Any, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES, root: str = "") -> None:
    """Raise JSONValueError when `value` cannot be stored as it is (see the module)."""
    found = problem_in(value, max_depth=max_depth, root=root)
    if found is not None:
        raise found
    if max_bytes and isinstance(value, dict | list | str):
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        if size > max_bytes:
            raise JSONValueError(root, f"is {size:,} bytes of JSON; at most {max_bytes:,} are allowed")


def validate_text(field: str, value: str) -> str:
    """Text for a text column (a name, a description, a block's code): refused, keyed
    by `field`, when it holds a NUL character or a lone surrogate, which neither
    database can store. Returns the value."""
    problem = _text_problem(value)
    if problem:
        raise ValidationError({field: [f"{field} {problem}"]})
    return value


def validate(field: str, value: Any, **limits: Any) -> Any:
    """`check`, raising Django's ValidationError keyed by `field` (what the services
    raise); returns the value."""
    try:
        check(value, root=field, **limits)
    except JSONValueError as exc:
        raise ValidationError({field: [str(exc)]}) from None
    return value


def _finite_float(text: str) -> float | _NotFinite:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text, "a number too large to store")


def loads(data: str | bytes, *, root: str = "", max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Any:
    """Parse JSON text as strictly as `check` judges values: raises JSONValueError with a
    readable message for text that is not JSON, is too big or too deep, or holds a value
    `check` refuses. `root` names the text in messages (`body`, `--runtime-vars`)."""
    if max_bytes and len(data) > max_bytes:
        raise JSONValueError(root, f"is {len(data):,} bytes; at most {max_bytes:,} are allowed")
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONValueError(root, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # NaN, Infinity and 1e999 are read as markers that `check` below refuses with their
    # path (`variables.ratio: is NaN`): the parser itself cannot say where it was.
    parse: Callable[[str], Any] = json.JSONDecoder(parse_constant=_NotFinite, parse_float=_finite_float).decode
    try:
        value = parse(data)
    except RecursionError:
        raise JSONValueError(root, f"is nested more than {max_depth} levels deep") from None
    except json.JSONDecodeError as exc:
        raise JSONValueError(root, f"is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        reason = "a number has too many digits" if "digits" in str(exc) else str(exc)
        raise JSONValueError(root, f"is not valid JSON: {reason}") from None
    check(value, root=root, max_depth=max_depth, max_bytes=0)
    return value
