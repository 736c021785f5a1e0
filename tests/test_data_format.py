"""The prepared-dataset format: ids range-checked in every split when written and when opened."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import random_columns, tiny_schema, write_tiny_dataset

from din_ray.data.format import DataError, DatasetWriter, PreparedDataset


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("fmt") / "data", rows=80)


def set_id(path, column: str, row: int, value: int, statistics: bool = True) -> None:
    """Rewrite one Parquet file with `column`'s id at `row` (its first slot for a history)."""
    t = pq.read_table(path)
    i = t.schema.get_field_index(column)
    col = t.column(column).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        flat = col.flatten().to_numpy().copy()
        flat[row * col.type.list_size] = value
        new = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), col.type.list_size)
    else:
        values = col.to_numpy().copy()
        values[row] = value
        new = pa.array(values, col.type)
    pq.write_table(t.set_column(i, t.schema.field(i), new), path, write_statistics=statistics)


@pytest.mark.parametrize("split,column,value,statistics", [
    ("valid", "item_id", 30, True),  # one past the 30-row item table
    ("test", "hist_item_id", -1, True),  # -1 would read the last row of a large table
    ("valid", "cate_id", 99, False),  # no Parquet statistics: found by reading the column
])
def test_open_names_file_column_row_and_value_of_an_out_of_range_id(good, tmp_path, split,
                                                                    column, value, statistics):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    part = sorted((bad / split).glob("*.parquet"))[-1]
    set_id(part, column, 3, value, statistics)
    table = "item_id" if "item" in column else "cate_id"
    with pytest.raises(DataError, match=re.escape(
            f"{part}: column {column!r} (table {table!r}) row 3: id {value} outside [0, ")):
        PreparedDataset.open(bad)
    PreparedDataset.open(good)  # the untouched copy opens


def test_writer_rejects_an_out_of_range_id_in_valid_and_writes_nothing(tmp_path):
    schema = tiny_schema()
    out = tmp_path / "out"
    cols = random_columns(schema, 20, seed=0)
    cols["hist_cate_id"][7, 0] = 6  # the cate table has 6 rows
    with pytest.raises(DataError, match=re.escape(
            f"{out / 'valid'}: column 'hist_cate_id' (table 'cate_id') row 27: id 6 outside "
            "[0, 6)")):
        with DatasetWriter(out, schema, source="tiny") as w:
            w.write("train", random_columns(schema, 40, seed=1))
            w.write("valid", random_columns(schema, 20, seed=2))
            w.write("valid", cols)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_open_reads_only_statistics_when_they_are_present(good, monkeypatch):
    calls = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    ds = PreparedDataset.open(good)
    assert calls == [] and ds.num_rows("train") == 80
    assert np.isfinite(ds.read_split("valid")["label"]).all()
