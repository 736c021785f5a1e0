"""A prepared dataset that is damaged after preparation fails when opened, naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from builders import write_tiny_dataset

from din_ray.data.format import DataError, PreparedDataset
from din_ray.schema import SchemaError


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("fmt") / "data", rows=200)


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
