"""C library functions through ctypes, for what Python's standard library does not
offer: prctl (a child dies with its parent) and fflush (C code's buffered output)."""

from __future__ import annotations

from collections.abc import Callable


def libc_function(name: str) -> Callable[..., int] | None:
    """A C library function, or None where there is none. Looked up once in the long-
    lived process, so a forked child pays only the call."""
    try:
        import ctypes

        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
