"""Checks made when a block is saved."""

from __future__ import annotations


class BlockCodeError(ValueError):
    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        super().__init__(message)


def check_python_syntax(content: str, filename: str = "<block>") -> None:
    """Refuse code that does not compile, naming the line and what is wrong there."""
    try:
        compile(content, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        detail = exc.msg
        if exc.text:
            detail += f": {exc.text.strip()}"
        raise BlockCodeError(f"Syntax error in {filename} on line {exc.lineno}: {detail}", exc.lineno) from None
    except ValueError as exc:  # null bytes in the source
        raise BlockCodeError(f"{filename} cannot be compiled: {exc}") from None
