"""The variable store: a block run's outputs, written to files under MILLRACE_DATA_DIR.

DataFrames go to Parquet (dtypes and index kept by pyarrow's pandas metadata), values
that survive a JSON round trip unchanged go to JSON, anything else is pickled. Each value
is described by a small dict (`meta`) that the caller keeps (BlockRun.outputs) and passes
back to read it: the store itself keeps no index.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, BinaryIO, Literal

KIND_DATAFRAME = "dataframe"
KIND_JSON = "json"
KIND_PICKLE = "pickle"
# An output kept only in the memory of the process that made it (a run in one process
# with cache_block_output_in_memory, for a value the store cannot write).
KIND_MEMORY = "memory"
ROW_GROUP_ROWS = 65536
# A short scalar also travels in its meta, and a downstream block reads it from there
# instead of opening its file (which is written all the same, for the API and export).
INLINE_MAX = 256
_INLINE_TYPES = (int, float, str, bool, type(None))


class VariableError(Exception):
    pass


_root_override: Path | None = None


def use_root(path: str | Path | None) -> None:
    """Make this process's store use `path` instead of MILLRACE_DATA_DIR (block children)."""
    global _root_override
    _root_override = Path(path) if path else None


def root() -> Path:
    if _root_override is not None:
        return _root_override
    # Imported here: a block's child process always has its root set, and the fork
    # server that makes those children stays small without Django (every megabyte it
    # holds makes each fork and each child's exit slower).
    from django.conf import settings

    return Path(settings.MILLRACE_DATA_DIR)


def _path(key: str) -> str:
    """The file of `key`, refused if the key leads out of the data directory. Plain
    string paths: this runs in every block's child, where pathlib's objects cost more
    than the check itself."""
    base = os.path.abspath(root())
    path = os.path.normpath(os.path.join(base, key))
    if path != base and not path.startswith(base + os.sep):
        raise VariableError(f"Storage key {key!r} leaves the data directory")
    return path


def _is_dataframe(value: Any) -> bool:
    # Checked by module name so that a block which never touches pandas does not pay
    # for importing it here.
    return type(value).__name__ == "DataFrame" and type(value).__module__.startswith("pandas")


def _atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Write through a temporary file beside `path`, then rename: a reader never sees
    half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _write_bytes(data: bytes) -> Callable[[str], None]:
    def write(path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    return write


def _json_exact(value: Any) -> str | None:
    """The JSON text of `value` if loading it gives back an equal value of the same
    shape (tuples, int dict keys, NaN and sets would not), else None. Plain scalars,
    the common case, are written out directly (json.dumps makes a block's child copy
    dozens of pages of the json module)."""
    kind = type(value)
    if kind is int:
        try:
            return int.__repr__(value)
        except ValueError:  # more digits than Python converts to text: pickled
            return None
    if kind is str:
        return encode_basestring_ascii(value)
    if value is None or kind is bool:
        return "null" if value is None else ("true" if value else "false")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None
    try:
        same = json.loads(text) == value and _same_shape(json.loads(text), value)
    except Exception:  # noqa: BLE001 - a value whose __eq__ raises is simply not JSON-able
        return None
    return text if same else None


def _same_shape(loaded: Any, value: Any) -> bool:
    if type(loaded) is not type(value):
        # JSON turns an int-valued float like 1.0 into 1.0 again, but a bool stays bool;
        # any other type change (tuple -> list, subclass -> base) must not pass.
        return False
    if isinstance(value, dict):
        return all(_same_shape(loaded[k], v) for k, v in value.items())
    if isinstance(value, list):
        return all(_same_shape(a, b) for a, b in zip(loaded, value, strict=True))
    return True


def write_value(prefix: str, name: str, value: Any) -> dict:
    """Store one value under `prefix/name.*` and return its meta."""
    if _is_dataframe(value):
        meta = _write_dataframe(prefix, name, value)
        if meta is not None:
            return meta
    text = _json_exact(value)
    if text is not None:
        key = f"{prefix}/{name}.json"
        _atomic_write(_path(key), _write_bytes(text.encode()))
        meta = {"name": name, "kind": KIND_JSON, "key": key, "type": type(value).__name__}
        if isinstance(value, list | dict):
            meta["shape"] = [len(value)]
        elif type(value) in _INLINE_TYPES and len(text) <= INLINE_MAX:
            meta["value"] = value
        return meta
    key = f"{prefix}/{name}.pkl"
    try:
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - report any pickling failure the same way
        raise VariableError(f"Output {name} of type {type(value).__name__} cannot be stored: {exc}") from exc
    _atomic_write(_path(key), _write_bytes(payload))
    return {"name": name, "kind": KIND_PICKLE, "key": key, "type": f"{type(value).__module__}.{type(value).__name__}"}


def _write_dataframe(prefix: str, name: str, df: Any) -> dict | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = f"{prefix}/{name}.parquet"
    try:
        table = pa.Table.from_pandas(df, preserve_index=None)
    except (pa.ArrowException, TypeError, ValueError):
        return None  # mixed-type object columns and the like: pickle keeps them as they are
    # Row groups of 64k rows let a sample read stop after the first group.
    _atomic_write(_path(key), lambda p: pq.write_table(table, p, row_group_size=ROW_GROUP_ROWS))
    return {
        "name": name,
        "kind": KIND_DATAFRAME,
        "key": key,
        "type": "pandas.DataFrame",
        "shape": [int(df.shape[0]), int(df.shape[1])],
        "columns": [str(c) for c in df.columns],
        "dtypes": {str(c): str(t) for c, t in df.dtypes.items()},
    }


# Outputs kept in this process's memory, by key: in a run in one process with
# cache_block_output_in_memory, the blocks below take them from here, as they are.
_memory: dict[str, Any] = {}


def write_outputs(prefix: str, values: list, *, in_memory: bool = False) -> list[dict]:
    """Store the outputs and return their metas. With `in_memory`, every output is
    also kept in this process's memory for the blocks that run here later; one the
    store cannot write (a Spark DataFrame, a connection) is kept there only."""
    if not in_memory:
        return [write_value(prefix, f"output_{i}", value) for i, value in enumerate(values)]
    metas = []
    for i, value in enumerate(values):
        name = f"output_{i}"
        try:
            meta = write_value(prefix, name, value)
        except VariableError:
            kind = type(value)
            meta = {"name": name, "kind": KIND_MEMORY, "key": f"{prefix}/{name}", "type": f"{kind.__module__}.{kind.__name__}"}
        _memory[meta["key"]] = value
        metas.append(meta)
    return metas


def read_value(meta: dict) -> Any:
    kind = meta["kind"]
    if kind == KIND_JSON and "value" in meta:
        return meta["value"]
    if meta["key"] in _memory:
        return _memory[meta["key"]]
    if kind == KIND_MEMORY:
        raise VariableError(
            f"Output {meta.get('name')} ({meta.get('type')}) was kept only in the memory of the process "
            "that ran its pipeline in one process (cache_block_output_in_memory), and that process has ended"
        )
    path = _path(meta["key"])
    try:
        if kind == KIND_DATAFRAME:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pandas()
        if kind == KIND_JSON:
            with open(path, "rb") as f:
                return json.loads(f.read())
        if kind == KIND_PICKLE:
            with open(path, "rb") as f:
                return pickle.loads(f.read())
    except FileNotFoundError as exc:
        raise VariableError(f"Stored output {meta.get('name')} is missing ({meta['key']}); it may have been cleaned") from exc
    raise VariableError(f"Unknown output kind {kind!r}")


def read_sample(meta: dict, sample_count: int) -> Any:
    """The first `sample_count` rows (DataFrame) or items (list), reading only as much
    of a Parquet file as those rows need."""
    if meta["kind"] == KIND_DATAFRAME:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # pre_buffer=False: pyarrow would otherwise read every row group up front.
        pf = pq.ParquetFile(_path(meta["key"]), pre_buffer=False)
        batches = []
        remaining = sample_count
        for batch in pf.iter_batches(batch_size=max(1, min(sample_count, 65536))):
            batches.append(batch.slice(0, remaining))
            remaining -= min(remaining, batch.num_rows)
            if remaining <= 0:
                break
        table = pa.Table.from_batches(batches, schema=pf.schema_arrow) if batches else pf.schema_arrow.empty_table()
        return table.to_pandas()
    value = read_value(meta)
    if isinstance(value, list):
        return value[:sample_count]
    return value


def delete_prefix(prefix: str) -> None:
    shutil.rmtree(_path(prefix), ignore_errors=True)


def open_file(key: str, mode: Literal["rb", "wb"] = "rb") -> BinaryIO:
    """A file of the store by its key (a block run's whole log, say), for the callers
    that write or stream one themselves; its folder is created for writing."""
    path = _path(key)
    if "w" in mode:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, mode)  # noqa: SIM115 - the caller closes it


def disk_usage(prefix: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(_path(prefix)):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


__all__ = [
    "VariableError", "write_value", "write_outputs", "read_value", "read_sample",
    "delete_prefix", "disk_usage", "open_file", "root",
]
