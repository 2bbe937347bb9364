"""The variable store (pipelines/variables.py) on real files under the test's data dir."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import variables

pytestmark = pytest.mark.sqlite

BIG_ROWS = 1_000_000


class Point:
    """A custom object: module level so that pickle can find its class again."""

    def __init__(self, x: int, y: int):
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def _typed_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "count": np.array([1, -2, 3], dtype="int64"),
            "ratio": np.array([0.5, np.nan, 2.25], dtype="float64"),
            "flag": np.array([True, False, True], dtype="bool"),
            "at": pd.DatetimeIndex(
                np.array(["2024-01-01T00:00", "2024-03-31T12:30", "2024-12-31T23:59:59.123456789"], dtype="datetime64[ns]")
            ).tz_localize("UTC"),
            "grade": pd.Categorical(["b", "a", "b"], categories=["b", "a", "c"], ordered=True),
            "name": pd.array(["x", None, "z"], dtype="string"),
        },
        index=pd.Index([10, 20, 30], name="row_id"),
    )


def _bytes_read() -> int:
    # Bytes this process (every thread, Arrow's I/O threads included) read from files.
    return psutil.Process().io_counters().read_chars


def test_a_dataframe_round_trips_through_parquet_with_dtypes_and_index(data_dir: Path):
    df = _typed_frame()
    assert str(df["at"].dtype) == "datetime64[ns, UTC]"

    meta = variables.write_value("run1/block", "output_0", df)

    assert meta["kind"] == variables.KIND_DATAFRAME
    assert meta["key"].endswith(".parquet")
    assert (data_dir / meta["key"]).is_file()
    assert pq.ParquetFile(data_dir / meta["key"]).metadata.num_rows == 3
    assert meta["shape"] == [3, 6]
    assert meta["columns"] == ["count", "ratio", "flag", "at", "grade", "name"]
    assert meta["dtypes"]["at"] == "datetime64[ns, UTC]"
    back = variables.read_value(meta)
    pd.testing.assert_frame_equal(back, df)
    assert back.index.name == "row_id"
    assert back["grade"].cat.ordered and list(back["grade"].cat.categories) == ["b", "a", "c"]


def test_a_dataframe_with_a_default_index_comes_back_with_one(data_dir: Path):
    df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})

    back = variables.read_value(variables.write_value("p", "v", df))

    pd.testing.assert_frame_equal(back, df)


@pytest.mark.parametrize(
    "value",
    [
        {"rows": 3, "names": ["a", "b"], "nested": {"ok": True, "ratio": 0.5, "none": None}},
        [1, 2.5, "three", None, True],
        "just text",
        42,
        1.0,
    ],
    ids=["dict", "list", "str", "int", "float"],
)
def test_json_able_values_are_stored_as_json_and_round_trip(data_dir: Path, value):
    meta = variables.write_value("p", "v", value)

    assert meta["kind"] == variables.KIND_JSON
    assert meta["key"].endswith(".json")
    assert json.loads((data_dir / meta["key"]).read_text()) == value
    back = variables.read_value(meta)
    assert back == value
    assert type(back) is type(value)


@pytest.mark.parametrize(
    "value",
    [(1, "two", 3.0), {1: "one", 2: "two"}, {"a", "b", "c"}, Point(3, 4), [1, (2, 3)], float("nan")],
    ids=["tuple", "int-keyed-dict", "set", "custom-object", "list-holding-a-tuple", "nan"],
)
def test_values_json_would_change_are_pickled_and_come_back_equal(data_dir: Path, value):
    meta = variables.write_value("p", "v", value)

    assert meta["kind"] == variables.KIND_PICKLE
    assert meta["key"].endswith(".pkl")
    assert (data_dir / meta["key"]).read_bytes()[:1] == b"\x80"  # a pickle's first byte
    back = variables.read_value(meta)
    assert type(back) is type(value)
    if isinstance(value, float):
        assert math.isnan(back)
    else:
        assert back == value


def test_a_dataframe_with_mixed_type_object_columns_falls_back_to_pickle(data_dir: Path):
    df = pd.DataFrame({"mixed": pd.Series([1, "a", 2.5, None], dtype=object), "n": [1, 2, 3, 4]})

    meta = variables.write_value("p", "v", df)

    assert meta["kind"] == variables.KIND_PICKLE
    back = variables.read_value(meta)
    pd.testing.assert_frame_equal(back, df)
    assert [type(v) for v in back["mixed"][:3]] == [int, str, float]


def test_an_unpicklable_value_is_refused_with_a_clear_error(data_dir: Path):
    with pytest.raises(variables.VariableError, match="output_0 of type generator cannot be stored"):
        variables.write_value("p", "output_0", (i for i in range(3)))


def test_write_outputs_names_each_output_by_position(data_dir: Path):
    metas = variables.write_outputs("run/blk", [1, {"a": 1}, (1, 2)])

    assert [m["name"] for m in metas] == ["output_0", "output_1", "output_2"]
    assert [variables.read_value(m) for m in metas] == [1, {"a": 1}, (1, 2)]


@pytest.fixture(scope="module")
def big_table() -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({"id": np.arange(BIG_ROWS, dtype="int64"), "x": rng.random(BIG_ROWS)})


def test_read_sample_of_a_million_row_parquet_file_reads_only_part_of_it(data_dir: Path, big_table):
    key = "run/blk/output_0.parquet"
    (data_dir / key).parent.mkdir(parents=True)
    pq.write_table(big_table, data_dir / key, row_group_size=10_000)
    size = (data_dir / key).stat().st_size
    assert pq.ParquetFile(data_dir / key).metadata.num_row_groups == 100
    meta = {"name": "output_0", "kind": variables.KIND_DATAFRAME, "key": key}

    before = _bytes_read()
    sample = variables.read_sample(meta, 5)
    sample_read = _bytes_read() - before

    assert list(sample["id"]) == [0, 1, 2, 3, 4]
    assert list(sample.columns) == ["id", "x"]
    # One row group of a hundred holds the sample: reading a tenth of the file is
    # already generous.
    assert sample_read < size / 10, f"read {sample_read} of {size} bytes for 5 rows"


def test_read_sample_of_a_large_stored_dataframe_reads_only_part_of_it(data_dir: Path, big_table):
    # The file as the store itself writes it (a block returned a million-row frame).
    meta = variables.write_value("run/blk", "output_0", big_table.to_pandas())
    size = (data_dir / meta["key"]).stat().st_size

    before = _bytes_read()
    sample = variables.read_sample(meta, 5)
    sample_read = _bytes_read() - before

    assert len(sample) == 5
    assert sample_read < size / 10, f"read {sample_read} of {size} bytes for 5 rows"


def test_read_sample_of_a_small_frame_and_of_a_list(data_dir: Path):
    df = _typed_frame()
    frame_meta = variables.write_value("p", "df", df)
    list_meta = variables.write_value("p", "items", list(range(100)))

    pd.testing.assert_frame_equal(variables.read_sample(frame_meta, 2), df.iloc[:2])
    pd.testing.assert_frame_equal(variables.read_sample(frame_meta, 50), df)
    assert variables.read_sample(list_meta, 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("prefix", ["../outside", "a/../../outside", "/etc"])
def test_a_key_that_escapes_the_data_dir_is_refused(data_dir: Path, prefix):
    with pytest.raises(variables.VariableError, match="leaves the data directory"):
        variables.write_value(prefix, "v", 1)

    assert not (data_dir.parent / "outside").exists()


def test_reading_a_key_outside_the_data_dir_is_refused(data_dir: Path):
    secret = data_dir.parent / "secret.json"
    secret.write_text('{"password": "hunter2"}')

    for key in ("../secret.json", str(secret)):
        with pytest.raises(variables.VariableError, match="leaves the data directory"):
            variables.read_value({"name": "v", "kind": variables.KIND_JSON, "key": key})
    with pytest.raises(variables.VariableError):
        variables.delete_prefix("..")
    assert secret.exists()


def test_a_missing_file_reads_as_a_clear_error(data_dir: Path):
    meta = variables.write_value("run/blk", "output_0", [1, 2])
    variables.delete_prefix("run")

    with pytest.raises(variables.VariableError, match="output_0 is missing"):
        variables.read_value(meta)


def test_disk_usage_and_delete_prefix_cover_one_prefix_only(data_dir: Path):
    keep = variables.write_value("run1/a", "output_0", "x" * 1000)
    gone = variables.write_value("run2/a", "output_0", "y" * 1000)

    assert variables.disk_usage("run2") == (data_dir / gone["key"]).stat().st_size
    variables.delete_prefix("run2")

    assert not (data_dir / "run2").exists()
    assert variables.read_value(keep) == "x" * 1000


def test_a_short_scalar_travels_in_its_meta_and_is_read_from_there(data_dir: Path):
    values = [7, 2.5, "short text", True, None]
    metas = [variables.write_value("run/blk", f"output_{i}", value) for i, value in enumerate(values)]
    for meta, value in zip(metas, values, strict=True):
        assert meta["value"] == value
        assert json.loads((data_dir / meta["key"]).read_text()) == value  # the file is written all the same
    variables.delete_prefix("run")

    assert [variables.read_value(meta) for meta in metas] == values  # from the metas: the files are gone
    for big in ("x" * (variables.INLINE_MAX + 1), [1, 2], {"a": 1}):
        assert "value" not in variables.write_value("run/blk", "output_9", big)
