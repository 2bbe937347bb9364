"""Load YAML written by someone else (a Mage project's metadata.yaml) without letting the
file cost more than its size suggests.

`load(text, label)` is yaml.safe_load with these differences:

- timestamps stay strings (see `_Loader`);
- a file of more than MAX_BYTES bytes is refused before it is parsed;
- a document of more than MAX_NODES values, or more than MAX_TEXT characters of text
  (keys and scalar values), counting every alias as a full copy of what it repeats, is
  refused while it is being composed: a "billion laughs" file of a few hundred bytes
  would otherwise become millions of values, and one long string repeated by aliases
  gigabytes, once written as JSON;
- lists and mappings nested more than MAX_DEPTH levels are refused as soon as the
  parser opens level MAX_DEPTH + 1, aliases expanded, so Python's recursion limit is
  never reached (pyyaml's composer recurses three frames per level);
- an alias to a node that contains it (a document with no end) is refused;
- every refusal is a YAMLSafetyError whose message starts with `label` and gives the
  line and column, including a NUL byte or other unreadable character.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent, NodeEvent, ScalarEvent
from yaml.reader import ReaderError

# Limits, documented in the README ("Limits"). MAX_DEPTH matches
# config.common.jsonsafe.MAX_DEPTH, so a document the loader accepts is never refused
# for its depth when it is stored as JSON.
MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
# A pipeline file as Mage writes it holds 33 values a block: 2,000 blocks are 66,000
# values (and 650 KiB), a file of MAX_BYTES about 100,000. Counting as values are
# composed also bounds the time a hostile file takes: pyyaml's pure-Python parser
# composes some 30,000 values a second on the slow machine, so about 8 s at most.
MAX_NODES = 250_000
# Without aliases a document's text is at most MAX_BYTES; four times that leaves room
# for anchors that share settings, and keeps a JSON copy of the value to some MiB.
MAX_TEXT = 4 * MAX_BYTES


class YAMLSafetyError(ValueError):
    """A YAML file that `load` refuses: invalid, unreadable or over a limit. The message
    starts with the file's label and gives the line and column where known."""

    def __init__(self, label: str, summary: str, detail: str, line: int | None = None, column: int | None = None):
        self.label = label
        self.line = line
        self.column = column
        where = f" (line {line}, column {column})" if line is not None else ""
        super().__init__(f"{label}: {summary}{where}: {detail}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that leaves timestamps as strings: Mage writes `created_at` and users
    write dates in variables, and a datetime would neither fit a JSON field nor come back
    from an export as the same text. It also counts values, text and depth as it
    composes (see the module's docstring)."""

    def __init__(self, stream: str, label: str):
        super().__init__(stream)
        self.label = label
        # Values and characters composed so far, each alias counted as a copy.
        self._nodes = 0
        self._chars = 0
        self._depth = 0  # lists and mappings open around the next node
        self._deepest = 0  # deepest level reached inside the collection being composed
        self._expanded: dict[str, tuple[int, int, int]] = {}  # anchor -> (values, characters, levels)

    def compose_document(self) -> Any:
        node = super().compose_document()
        self._expanded = {}  # anchors are per document, as in pyyaml
        return node

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            self._count_alias(event)
        elif not isinstance(event, ScalarEvent):
            return self._compose_collection(parent, index, event)
        return super().compose_node(parent, index)

    # types-PyYAML types `anchor` as a dict; pyyaml passes the anchor's name (or None).
    def compose_scalar_node(self, anchor: str | None) -> Any:  # type: ignore[override]
        # Scalars are most of a file: counted here, inline, to keep the loader's cost
        # close to pyyaml's own.
        event = self.peek_event()
        self._nodes += 1
        self._chars += len(event.value)
        if self._nodes > MAX_NODES or self._chars > MAX_TEXT:
            self._check_totals(event, None, 1, len(event.value))
        if anchor is not None:
            self._expanded[anchor] = (1, len(event.value), 0)
        return super().compose_scalar_node(anchor)  # type: ignore[arg-type]  # the same stub

    def _compose_collection(self, parent: Any, index: Any, event: NodeEvent) -> Any:
        depth = self._depth + 1
        if depth > MAX_DEPTH:
            raise self._too_deep(event)
        self._nodes += 1
        self._check_totals(event, None, 1, 0)
        nodes, chars, outer_deepest = self._nodes - 1, self._chars, self._deepest
        self._depth = self._deepest = depth
        node = super().compose_node(parent, index)
        if event.anchor is not None:
            self._expanded[event.anchor] = (self._nodes - nodes, self._chars - chars, self._deepest - depth + 1)
        self._depth = depth - 1
        self._deepest = max(outer_deepest, self._deepest)
        return node

    def _count_alias(self, event: AliasEvent) -> None:
        # An alias always names an anchor; a None would be an undefined alias as well.
        cost = self._expanded.get(event.anchor) if event.anchor is not None else None
        if cost is None:
            if event.anchor in self.anchors:  # anchored, not finished: it contains the alias
                line, column = _position(event.start_mark)
                raise YAMLSafetyError(
                    self.label, "alias inside its own anchor", f"*{event.anchor} repeats a node that contains it, without end", line, column,
                )
            return  # an undefined alias: pyyaml reports it
        nodes, chars, levels = cost
        if self._depth + levels > MAX_DEPTH:
            raise self._too_deep(event, f" once *{event.anchor} is expanded")
        self._nodes += nodes
        self._chars += chars
        self._check_totals(event, event.anchor, nodes, chars)
        self._deepest = max(self._deepest, self._depth + levels)

    def _check_totals(self, event: NodeEvent, alias: str | None, nodes: int, chars: int) -> None:
        if self._nodes > MAX_NODES:
            summary, over, name, repeats = "too many values", f"{MAX_NODES:,} values", "MAX_NODES", nodes
        elif self._chars > MAX_TEXT:
            summary, over, name, repeats = "too much text", f"{MAX_TEXT:,} characters of text", "MAX_TEXT", chars
        else:
            return
        line, column = _position(event.start_mark)
        at = f" (passed at the alias *{alias}, which repeats {repeats:,})" if alias else ""
        raise YAMLSafetyError(
            self.label, summary,
            f"more than {over}, each alias counted as a copy of what it repeats{at}; the limit is safe_yaml.{name}",
            line, column,
        )

    def _too_deep(self, event: NodeEvent, how: str = "") -> YAMLSafetyError:
        line, column = _position(event.start_mark)
        return YAMLSafetyError(
            self.label, "nested too deeply", f"lists and mappings nested more than {MAX_DEPTH} levels{how}; the limit is safe_yaml.MAX_DEPTH", line, column,
        )


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _position(mark: Any) -> tuple[int | None, int | None]:
    return (mark.line + 1, mark.column + 1) if mark is not None else (None, None)


# Line breaks as pyyaml's reader counts them, so that a ReaderError's position (an index
# into the text, with no line) gives the line a MarkedYAMLError would.
_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def _line_and_column(text: str, position: int) -> tuple[int, int]:
    line, start = 1, 0
    for match in _BREAK.finditer(text, 0, position):
        line, start = line + 1, match.end()
    return line, position - start + 1


def _refusal(exc: yaml.YAMLError, text: str, label: str) -> YAMLSafetyError:
    if isinstance(exc, ReaderError):
        line, column = _line_and_column(text, exc.position)
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        name = " (NUL)" if code == 0 else ""
        return YAMLSafetyError(label, "unreadable character", f"U+{code:04X}{name} is not allowed in YAML", line, column)
    if isinstance(exc, yaml.MarkedYAMLError):
        where = _position(exc.problem_mark or exc.context_mark)
        return YAMLSafetyError(label, "invalid YAML", exc.problem or exc.context or str(exc), *where)
    return YAMLSafetyError(label, "invalid YAML", str(exc))


def load(text: str, label: str) -> Any:
    """The value of the single YAML document in `text`; raises YAMLSafetyError (see the
    module). `label` names the file in messages, relative to the project."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise YAMLSafetyError(label, "file too large", f"{size:,} bytes; at most {MAX_BYTES:,} are allowed (safe_yaml.MAX_BYTES)")
    try:
        loader = _Loader(text, label)  # the reader checks every character here
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise _refusal(exc, text, label) from None


def load_file(path: Path, label: str) -> Any:
    """`load` for a file, read no further than one byte past MAX_BYTES (so a huge file,
    or a device named like one, is refused without being read)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YAMLSafetyError(label, "unreadable file", exc.strerror or str(exc)) from None
    if len(data) > MAX_BYTES:
        raise YAMLSafetyError(label, "file too large", f"more than {MAX_BYTES:,} bytes (safe_yaml.MAX_BYTES)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8", "replace")
        line, column = _line_and_column(before, len(before))
        raise YAMLSafetyError(label, "not UTF-8 text", f"{exc.reason} at byte {exc.start}", line, column) from None
    return load(text, label)
