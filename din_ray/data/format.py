"""The prepared-dataset layout that every source writes and training, tuning and serving read.

    DIR/
      dataset.json            manifest, written last: a directory without it is incomplete;
                              lists every data file with its size and SHA-256
      schema.json             din_ray.schema.Schema
      counts.npz              per table: int64 n_j = number of training samples containing id j
      vocab/<table>.parquet   raw id (string) -> dense id (int32), for tables built from raw ids
      train/part-00000.parquet, valid/part-*.parquet, test/part-*.parquet

Parquet columns: the label (int8 0/1), the user column (int64, GAUC grouping only), one int32
column per scalar feature, and one fixed_size_list<int32>[max_len] column per behaviour feature,
oldest behaviour first, PAD (0) after the last real one.

A `DatasetWriter` builds everything in a sibling temporary directory and renames it into place,
so a crash never leaves a half-written dataset where a reader would pick it up.

`PreparedDataset.open` checks what is cheap on every open (each worker opens the data): every
split is there, every listed file exists at its recorded size (a truncated copy fails), no file
is missing or unlisted, every Parquet footer reads, matches the schema and adds up to the
manifest's row counts; `verify=True` (done once per run, by the driver) also compares
SHA-256s, which catches a corrupted file of the right size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from din_ray import io as atomic
from din_ray.schema import PAD_ID, Schema, SchemaError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MANIFEST = "dataset.json"
COUNTS = "counts.npz"


class DataError(ValueError):
    """Bad input data; the message names the file, row and field where known."""


def refuse_existing(output: str | Path, overwrite: bool) -> None:
    """Raise FileExistsError when `output` exists and `overwrite` is off: every preparation
    checks this before reading any input, and the writer again before writing."""
    if Path(output).exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (--overwrite)")


def arrow_schema(schema: Schema) -> pa.Schema:
    """The Arrow schema of a prepared Parquet file for `schema`."""
    fields = [pa.field(schema.label, pa.int8()), pa.field(schema.user_column, pa.int64())]
    for f in schema.features:
        if f.is_sequence:
            fields.append(pa.field(f.name, pa.list_(pa.int32(), f.max_len)))
        else:
            fields.append(pa.field(f.name, pa.int32()))
    return pa.schema(fields)


def to_arrow(schema: Schema, columns: dict[str, np.ndarray]) -> pa.Table:
    """Build a prepared table from numpy columns.

    Args:
        columns: label (N,), user (N,), scalar features (N,), behaviour features (N, L).
    """
    arrays = []
    for field in arrow_schema(schema):
        if field.name not in columns:
            raise SchemaError(f"column {field.name!r} missing from the batch to write")
        col = np.asarray(columns[field.name])
        if pa.types.is_fixed_size_list(field.type):
            length = field.type.list_size
            if col.ndim != 2 or col.shape[1] != length:
                raise SchemaError(
                    f"column {field.name!r}: expected shape (N, {length}), got {col.shape}")
            flat = pa.array(np.ascontiguousarray(col, dtype=np.int32).reshape(-1), pa.int32())
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, length))
        else:
            values = col.astype(field.type.to_pandas_dtype(), copy=False)
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=arrow_schema(schema))


def to_numpy(schema: Schema, table: pa.Table | dict) -> dict[str, np.ndarray]:
    """Prepared Arrow batch -> numpy arrays: label float32 (B,), user int64 (B,), scalar features
    int64 (B,), behaviour features int64 (B, L). Zero-copy where Arrow allows."""
    if isinstance(table, dict):  # Ray Data "numpy" batches arrive as dicts of arrays
        return _numpy_dict(schema, table)
    out: dict[str, np.ndarray] = {}
    n = table.num_rows
    out[schema.label] = table.column(schema.label).to_numpy().astype(np.float32)
    out[schema.user_column] = table.column(schema.user_column).to_numpy().astype(np.int64)
    for f in schema.features:
        col = table.column(f.name).combine_chunks()
        if f.is_sequence:
            values = col.flatten().to_numpy()
            out[f.name] = values.reshape(n, f.max_len).astype(np.int64)
        else:
            out[f.name] = col.to_numpy().astype(np.int64)
    return out


def _numpy_dict(schema: Schema, batch: dict) -> dict[str, np.ndarray]:
    out = {schema.label: np.asarray(batch[schema.label], dtype=np.float32),
           schema.user_column: np.asarray(batch[schema.user_column], dtype=np.int64)}
    for f in schema.features:
        col = batch[f.name]
        if f.is_sequence and col.dtype == object:
            col = np.stack(col)
        out[f.name] = np.asarray(col, dtype=np.int64)
    return out


def count_ids(schema: Schema, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per table, how many samples contain each id at least once (Eq. 4's n_j), PAD excluded.

    Returns: table -> int64 (vocab_size,) counts for this batch of samples.
    """
    out = {}
    for table, (rows, _) in schema.tables.items():
        cols = [np.asarray(columns[f.name]).reshape(len(columns[schema.label]), -1)
                for f in schema.features if f.table == table]
        ids = np.sort(np.concatenate(cols, axis=1), axis=1)  # (N, total slots)
        # An id counts once per sample however often it repeats in that sample.
        first = np.ones_like(ids, dtype=bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        keep = ids[first & (ids != PAD_ID)]
        if keep.size and (keep.min() < 0 or keep.max() >= rows):
            bad = keep[(keep < 0) | (keep >= rows)][0]
            raise SchemaError(f"table {table!r}: id {bad} outside [0, {rows})")
        out[table] = np.bincount(keep, minlength=rows).astype(np.int64)
    return out


def check_ids(schema: Schema, columns: dict[str, np.ndarray], where: str | Path,
              first_row: int = 0) -> None:
    """Fail when an id of a batch about to be written is outside its table's [0, rows).

    Args:
        columns: scalar features (N,), behaviour features (N, L).
        where: the file or split directory the batch goes to, for the message.
        first_row: row number of the batch's first row there.
    Raises:
        DataError: naming `where`, the column, table, row and value of the first bad id.
    """
    for f in schema.features:
        rows = schema.tables[f.table][0]
        col = np.asarray(columns[f.name])
        bad = (col < 0) | (col >= rows)
        if bad.any():
            at = tuple(np.argwhere(bad)[0])
            raise DataError(f"{where}: column {f.name!r} (table {f.table!r}) row "
                            f"{first_row + int(at[0])}: id {int(col[at])} outside [0, {rows})")


def check_file_ids(schema: Schema, path: Path) -> None:
    """Fail when an id in a prepared Parquet file is outside its table's [0, rows).

    Cheap: the row groups' min/max statistics decide; only a row group without statistics, or
    whose statistics show a bad id, is read (that column only) to find the first bad row.

    Raises:
        DataError: naming the file, column, table, row and value.
    """
    pf = pq.ParquetFile(path)
    md = pf.metadata
    leaf = {md.schema.column(i).path.split(".")[0]: i for i in range(md.num_columns)}
    row0 = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for f in schema.features:
            rows = schema.tables[f.table][0]
            stats = rg.column(leaf[f.name]).statistics
            if stats is not None and stats.has_min_max and 0 <= stats.min and stats.max < rows:
                continue
            col = pf.read_row_group(g, columns=[f.name]).column(0).combine_chunks()
            values = col.flatten().to_numpy() if f.is_sequence else col.to_numpy()
            bad = np.flatnonzero((values < 0) | (values >= rows))
            if bad.size:
                row = int(bad[0]) // (f.max_len if f.is_sequence else 1)
                raise DataError(f"{path}: column {f.name!r} (table {f.table!r}) row {row0 + row}:"
                                f" id {int(values[bad[0]])} outside [0, {rows})")
        row0 += rg.num_rows


@dataclass
class PreparedDataset:
    """A prepared dataset directory, validated on open."""

    root: Path
    schema: Schema
    manifest: dict

    @classmethod
    def open(cls, root: str | Path, verify: bool = False) -> PreparedDataset:
        """Open and check the dataset at `root` (see the module docstring); `verify` also
        compares every file's SHA-256 with the manifest's (reads all the data once)."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: prepared data directory not found")
        manifest_path = root / MANIFEST
        if not manifest_path.exists():
            raise DataError(
                f"{root}: no {MANIFEST}; not a prepared din-ray dataset (or incomplete)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{manifest_path}: not valid JSON ({e})") from None
        ds = cls(root, Schema.load(root / "schema.json"), manifest)
        rows = {}
        for split in SPLITS:
            if not (root / split).is_dir():
                raise DataError(f"{root / split}: split {split!r} is missing")
            rows[split] = sum(ds.check_file(path) for path in ds.files(split))
        ds._check_files(verify)
        for split, n in rows.items():
            if "rows" in manifest and n != ds.num_rows(split):
                raise DataError(f"{root / split}: its files hold {n} rows but {MANIFEST} "
                                f"says {ds.num_rows(split)}; files are missing or replaced")
        for split in SPLITS:
            for path in ds.files(split):
                # An id past its table would index another row (-1: the last) or fail in one
                # rank of a sharded run while the others wait: every file of every split.
                check_file_ids(ds.schema, path)
        return ds

    def _check_files(self, verify: bool) -> None:
        """Every file the manifest lists is there at its size (and digest, with `verify`),
        and no Parquet file is there that it does not list. (Datasets written before sizes
        were recorded list none: only the Parquet checks apply.)"""
        listed = self.manifest.get("files")
        if listed is None:
            return
        for name, meta in listed.items():
            path = self.root / name
            if not path.exists():
                raise DataError(f"{path}: listed in {MANIFEST} but missing")
            if path.stat().st_size != meta["bytes"]:
                raise DataError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says "
                                f"{meta['bytes']}; the file is truncated or was replaced")
            if verify and _sha256(path) != meta["sha256"]:
                raise DataError(f"{path}: SHA-256 differs from {MANIFEST}'s; the file is "
                                "corrupted or was changed after preparation")
        for split in SPLITS:
            for path in self.files(split):
                if path.relative_to(self.root).as_posix() not in listed:
                    raise DataError(f"{path}: not listed in {MANIFEST} (a stray file)")

    def files(self, split: str) -> list[Path]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return sorted((self.root / split).glob("*.parquet"))

    def num_rows(self, split: str) -> int:
        return int(self.manifest.get("rows", {}).get(split, 0))

    def check_file(self, path: Path) -> int:
        """Fail fast when a Parquet file is unreadable or does not match the schema; returns
        its row count (from the footer: no data is read)."""
        try:
            footer = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        got = footer.schema_arrow
        want = arrow_schema(self.schema)
        for field in want:
            idx = got.get_field_index(field.name)
            if idx < 0:
                raise SchemaError(
                    f"{path}: column {field.name!r} required by the schema is missing")
            if not got.field(idx).type.equals(field.type):
                raise SchemaError(
                    f"{path}: column {field.name!r} has type {got.field(idx).type}, "
                    f"schema expects {field.type}"
                )
        return footer.metadata.num_rows

    def counts(self) -> dict[str, np.ndarray]:
        with np.load(self.root / COUNTS, allow_pickle=False) as z:
            counts = {k: z[k] for k in z.files}
        for table, (rows, _) in self.schema.tables.items():
            if table not in counts or counts[table].shape != (rows,):
                raise SchemaError(f"{self.root / COUNTS}: counts for table {table!r} missing or "
                                  f"not of length {rows}")
        return counts

    def vocab(self, table: str) -> dict[str, int]:
        path = self.root / "vocab" / f"{table}.parquet"
        if not path.exists():
            return {}
        t = pq.read_table(path)
        return dict(zip(t.column("raw").to_pylist(), t.column("id").to_pylist(), strict=True))

    def read_split(self, split: str) -> dict[str, np.ndarray]:
        """Whole split in memory; for tests and small local runs only."""
        files = self.files(split)
        if not files:
            raise DataError(f"{self.root / split}: no Parquet files")
        return to_numpy(self.schema, pq.read_table(files))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def iter_numpy_batches(
    files: list[Path], schema: Schema, batch_size: int, shuffle: bool = False, seed: int = 0,
    drop_last: bool = False, part: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, np.ndarray]]:
    """Stream batches from Parquet files one row group at a time (bounded memory).

    With `shuffle`, the file order and the rows inside each buffered file are permuted; the
    permutation depends only on `seed`, so a run is reproducible. `part=(i, n)` reads only
    every n-th row group from the i-th on (counted over the files in the order read): the n
    parts together hold every row exactly once (a distributed evaluation, one part per worker).
    """
    index, parts = part
    if not 0 <= index < parts:
        raise ValueError(f"part must be (i, n) with 0 <= i < n, got {part}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files)) if shuffle else np.arange(len(files))
    carry: dict[str, np.ndarray] | None = None
    seen = 0  # row groups passed so far, over all files
    for i in order:
        pf = pq.ParquetFile(files[i])
        groups = rng.permutation(pf.num_row_groups) if shuffle else range(pf.num_row_groups)
        mine = [g for k, g in enumerate(groups, start=seen) if k % parts == index]
        seen += pf.num_row_groups
        for g in mine:
            try:
                group = pf.read_row_group(int(g))
            except (pa.ArrowException, OSError) as e:  # a data page that does not decode
                raise DataError(f"{files[i]}: row group {g} unreadable ({e})") from None
            cols = to_numpy(schema, group)
            if shuffle:
                perm = rng.permutation(len(cols[schema.label]))
                cols = {k: v[perm] for k, v in cols.items()}
            if carry is not None:
                cols = {k: np.concatenate([carry[k], v]) for k, v in cols.items()}
                carry = None
            n = len(cols[schema.label])
            full = n - n % batch_size
            for s in range(0, full, batch_size):
                yield {k: v[s:s + batch_size] for k, v in cols.items()}
            if full < n:
                carry = {k: v[full:] for k, v in cols.items()}
    if carry is not None and not drop_last:
        yield carry


class DatasetWriter:
    """Writes a prepared dataset atomically.

    Usage:
        with DatasetWriter(out, schema, source="movielens", params={...}) as w:
            w.write("train", columns)        # any number of times, any split
            w.add_vocab("item_id", raw_ids)  # raw_ids[i] is the raw id of dense id i
        # on normal exit: counts, schema, manifest written, temp dir renamed to `out`

    Counts for MBA are accumulated from the train split as it is written.
    """

    def __init__(self, output: str | Path, schema: Schema, source: str, params: dict | None = None,
                 overwrite: bool = False, rows_per_file: int = 200_000) -> None:
        self.output = Path(output)
        refuse_existing(self.output, overwrite)
        self.schema = schema
        self.source = source
        self.params = params or {}
        self.rows_per_file = rows_per_file
        self.tmp = self.output.with_name(f".{self.output.name}.tmp-{os.getpid()}-{time.time_ns()}")
        self.rows = dict.fromkeys(SPLITS, 0)
        self._parts = dict.fromkeys(SPLITS, 0)
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._writer_rows = dict.fromkeys(SPLITS, 0)
        self.counts = {t: np.zeros(rows, np.int64) for t, (rows, _) in schema.tables.items()}

    def __enter__(self) -> DatasetWriter:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        for split in SPLITS:
            (self.tmp / split).mkdir()
        return self

    def write(self, split: str, columns: dict[str, np.ndarray]) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        table = to_arrow(self.schema, columns)
        if table.num_rows == 0:
            return
        check_ids(self.schema, columns, self.output / split, self.rows[split])
        if split == "train":
            for t, c in count_ids(self.schema, columns).items():
                self.counts[t] += c
        writer = self._writers.get(split)
        if writer is None or self._writer_rows[split] >= self.rows_per_file:
            if writer is not None:
                writer.close()
            path = self.tmp / split / f"part-{self._parts[split]:05d}.parquet"
            writer = self._writers[split] = pq.ParquetWriter(path, table.schema)
            self._parts[split] += 1
            self._writer_rows[split] = 0
        writer.write_table(table, row_group_size=65_536)
        self._writer_rows[split] += table.num_rows
        self.rows[split] += table.num_rows

    def add_vocab(self, table: str, raw_ids: list) -> None:
        """Record the raw-id vocabulary of `table`: raw_ids[i] is the raw id of dense id i
        (entries for PAD and OOV are ignored)."""
        (self.tmp / "vocab").mkdir(exist_ok=True)
        raw = [str(r) for r in raw_ids]
        ids = np.arange(len(raw), dtype=np.int32)
        keep = ids >= 2
        t = pa.table({"raw": pa.array(np.array(raw, dtype=object)[keep], pa.string()),
                      "id": pa.array(ids[keep], pa.int32())})
        pq.write_table(t, self.tmp / "vocab" / f"{table}.parquet")

    def __exit__(self, exc_type, exc, tb) -> None:
        for w in self._writers.values():
            w.close()
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _finish(self) -> None:
        if self.rows["train"] == 0:
            raise DataError(f"{self.output}: no training rows were produced")
        self.schema.save(self.tmp / "schema.json")
        np.savez(self.tmp / COUNTS, **self.counts)
        files = sorted(p for p in self.tmp.rglob("*") if p.is_file())
        manifest = {"source": self.source, "params": self.params, "rows": self.rows,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": {p.relative_to(self.tmp).as_posix():
                              {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                              for p in files}}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        atomic.publish(self.tmp, self.output)  # an existing copy is swapped out, then deleted
        log.info("wrote %s: %s", self.output, self.rows)
