"""The prepared-dataset format: ids range-checked in every split when written and when opened,
and a dataset damaged after preparation fails when opened, naming the file."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import random_columns, tiny_schema, write_tiny_dataset

from din_ray.data.format import (
    DataError,
    DatasetWriter,
    PreparedDataset,
    iter_numpy_batches,
    to_arrow,
)
from din_ray.schema import SchemaError


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
    rerecord(path)


def rerecord(path: Path) -> None:
    """Record a rewritten file's size and digest in its dataset's manifest, as if preparation
    had written it: only the id check can then object to it."""
    root = path.parents[1]
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["files"][path.relative_to(root).as_posix()] = {
        "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (root / "dataset.json").write_text(json.dumps(manifest))


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


@pytest.fixture
def copy(good, tmp_path) -> Path:
    shutil.copytree(good, tmp_path / "data")
    return tmp_path / "data"


def _first(data: Path, split: str = "train") -> Path:
    return sorted((data / split).glob("*.parquet"))[0]


def test_the_manifest_lists_every_file_with_size_and_digest(good):
    files = json.loads((good / "dataset.json").read_text())["files"]
    on_disk = {p.relative_to(good).as_posix() for p in good.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"dataset.json"}
    assert all(len(m["sha256"]) == 64 and m["bytes"] > 0 for m in files.values())
    PreparedDataset.open(good, verify=True)


def test_truncated_file_fails_naming_it(good, copy):
    f = _first(copy, "valid")
    f.write_bytes(f.read_bytes()[:-10])  # the footer is gone
    with pytest.raises(DataError, match="not a readable Parquet file") as e:
        PreparedDataset.open(copy)
    assert str(f) in str(e.value)
    shutil.copyfile(_first(good, "valid"), f)
    g = _first(copy, "test")  # a readable file with a row group cut off: only its size shows
    table = pq.read_table(g)
    pq.write_table(table.slice(0, len(table) - 1), g)
    with pytest.raises(DataError, match="truncated") as e:
        PreparedDataset.open(copy)
    assert str(g) in str(e.value)


def test_corrupted_file_of_the_right_size_fails_verification_naming_it(copy):
    f = _first(copy)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="SHA-256") as e:
        PreparedDataset.open(copy, verify=True)
    assert str(f) in str(e.value)


def test_missing_split_or_file_and_stray_file_fail(copy, tmp_path):
    f = _first(copy, "test")
    shutil.copyfile(f, copy / "train" / "part-99999.parquet")
    with pytest.raises(DataError, match="stray") as e:
        PreparedDataset.open(copy)
    assert "part-99999.parquet" in str(e.value)
    (copy / "train" / "part-99999.parquet").unlink()
    f.unlink()
    with pytest.raises(DataError, match="missing") as e:
        PreparedDataset.open(copy)
    assert str(f) in str(e.value)
    shutil.rmtree(copy / "test")
    manifest = json.loads((copy / "dataset.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("test/")}
    (copy / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="split 'test' is missing"):
        PreparedDataset.open(copy)


def test_schema_that_does_not_match_the_files_fails_naming_a_file(copy):
    raw = json.loads((copy / "schema.json").read_text())
    for f in raw["features"]:
        if f.get("max_len"):
            f["max_len"] += 1
    (copy / "schema.json").write_text(json.dumps(raw))
    manifest = json.loads((copy / "dataset.json").read_text())
    manifest["files"]["schema.json"]["bytes"] = (copy / "schema.json").stat().st_size
    (copy / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaError, match="hist_item_id") as e:
        PreparedDataset.open(copy)
    assert ".parquet" in str(e.value)


def test_a_dataset_without_recorded_sizes_still_names_an_unreadable_file(copy):
    manifest = json.loads((copy / "dataset.json").read_text())
    del manifest["files"]  # as written before sizes were recorded
    (copy / "dataset.json").write_text(json.dumps(manifest))
    f = _first(copy, "valid")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DataError, match="not a readable Parquet file") as e:
        PreparedDataset.open(copy)
    assert str(f) in str(e.value)
    g = _first(copy)  # a row count that no longer adds up (a file replaced by a shorter one)
    f.unlink()
    pq.write_table(pq.read_table(g).slice(0, 3), f)
    with pytest.raises(DataError, match="rows but dataset.json says"):
        PreparedDataset.open(copy)


def test_the_parts_of_a_split_hold_every_row_exactly_once(tmp_path):
    # What each Ray worker evaluates of a streamed valid/test split: every n-th row group,
    # counted over the files in order, 2 files of 5 and 10 row groups of up to 7 rows.
    schema = tiny_schema()
    cols = random_columns(schema, 100, seed=0)
    cols["user"] = np.arange(100)  # a row's identity
    files = []
    for i, (lo, hi) in enumerate([(0, 30), (30, 100)]):
        files.append(tmp_path / f"part-{i}.parquet")
        pq.write_table(to_arrow(schema, {k: v[lo:hi] for k, v in cols.items()}), files[-1],
                       row_group_size=7)

    def rows(part):
        batches = list(iter_numpy_batches(files, schema, 16, part=part))
        return np.concatenate([b["user"] for b in batches]) if batches else np.zeros(0, int)

    for n in (1, 2, 3, 16):  # 16 parts of 15 row groups: the last one is empty
        parts = [rows((i, n)) for i in range(n)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(100)), n
        for p in parts:  # whole row groups, in file order
            assert (np.diff(p) > 0).all()
        whole = next(iter_numpy_batches(files, schema, 100))
        np.testing.assert_array_equal(whole["hist_item_id"][parts[0]],
                                      cols["hist_item_id"][parts[0]])
    with pytest.raises(ValueError, match=r"part must be \(i, n\) with 0 <= i < n, got \(2, 2\)"):
        next(iter_numpy_batches(files, schema, 16, part=(2, 2)))
