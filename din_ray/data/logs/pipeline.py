"""Impression + behaviour logs -> prepared DIN data, as a Ray Data pipeline.

    din-ray prepare log --spec examples/log_spec.yaml --output out/logs

The spec (`din_ray.data.logs.spec`) names the logs, the side tables and the features. Three Ray Data
stages run over work units, each `ray.data.from_items(units).map_batches(fn)` whose tasks stream
files in and out themselves, so no stage holds more than one unit or one bucket per process:

1. parse: every impression/behaviour file (Parquet: runs of row groups of ~`unit_rows` rows) is
   streamed, each row validated (malformed rows are skipped and reported with file, line, field
   and value), side tables joined by key (they are dimension tables, read once by the driver),
   and the clean rows written to staging files partitioned by hash(user) into P buckets:
   a shuffle through the filesystem, like a MapReduce shuffle.
2. vocab: per bucket, raw-id counts over the training period (impressions before the validation
   cutoff and behaviours before it); the driver merges them into vocabularies (`min_count`).
3. build: per bucket, impressions and behaviours of the same users are sorted by (user, time);
   each impression's history is the user's behaviours STRICTLY before its timestamp (an equal
   timestamp is not "before"), the most recent `max_history` kept, oldest first. Rows are split
   by impression time, the training rows shuffled, and written straight into the output's
   temporary directory together with per-bucket id counts.

P = ceil(estimated rows / rows_per_bucket), so the memory of a task is bounded by the bucket size,
whatever the input size. The driver only ever holds per-file statistics, a time histogram, the
vocabularies and the side tables. Staging and output directories must be visible to every node
(a shared filesystem on a multi-node cluster, as for training); inputs may be local or any
pyarrow filesystem URI (s3://...).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from din_ray import ray_session
from din_ray.data import vocab_extend
from din_ray.data.format import (
    SPLITS,
    DataError,
    DatasetWriter,
    PreparedDataset,
    check_ids,
    count_ids,
    to_arrow,
)
from din_ray.data.ids import bin_index, hash_strings, hashed_ids, mix64
from din_ray.data.logs.spec import FeatureSpec, LogSpec, Source, load_spec
from din_ray.schema import NUM_RESERVED_IDS, OOV_ID, Feature, Schema

log = logging.getLogger(__name__)

# Rows buffered per parse task before they are flushed to the bucket files.
FLUSH_ROWS = 262_144
# Rows read per batch from an input file.
READ_BATCH_ROWS = 131_072
# Impressions whose (N, max_history) history matrices are built at once in the build stage.
BUILD_CHUNK_ROWS = 65_536
# Output Parquet rows per file (a bucket writes several files when larger).
ROWS_PER_FILE = 500_000
# The impression-time histogram is coarsened (power-of-2 bins) to at most this many bins.
TIME_BINS = 1 << 18
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
IMPRESSIONS, BEHAVIORS = "impressions", "behaviors"


# --- files --------------------------------------------------------------------------------------
def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path inside it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def list_files(source: Source, where: str) -> list[str]:
    """Input files of a source: files as given, directories searched recursively for files with
    the format's suffixes (hidden and _-prefixed names skipped), local globs expanded."""
    suffixes = CSV_SUFFIXES if source.format == "csv" else PARQUET_SUFFIXES
    out: list[str] = []
    for p in source.paths:
        if "://" not in p and any(c in p for c in "*?["):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{where}: no file matches {p!r}")
            out.extend(m for m in matches if os.path.isfile(m))
            continue
        fs, inner = _fs(p)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{where}: {p} not found")
        if info.type == pafs.FileType.File:
            out.append(p)
            continue
        found = []
        for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
            name = f.base_name
            if (f.type == pafs.FileType.File and not name.startswith((".", "_"))
                    and name.lower().endswith(suffixes)):
                found.append(f.path)
        if not found:
            raise FileNotFoundError(f"{where}: no {source.format} files ({', '.join(suffixes)}) "
                                    f"under {p}")
        prefix = p.split("://", 1)[0] + "://" if "://" in p else ""
        out.extend(prefix + f for f in sorted(found))
    return out


def _csv_header(path: str, delimiter: str) -> list[str]:
    fs, inner = _fs(path)
    with fs.open_input_stream(inner, compression="detect") as f:
        head = f.read(1 << 16).decode("utf-8-sig", errors="replace")
    line = head.splitlines()[0] if head.strip() else ""
    if not line.strip():
        raise DataError(f"{path}: empty file (no header line)")
    return [c.strip().strip('"').strip() for c in line.split(delimiter)]


def _estimate_csv_rows(path: str) -> int:
    fs, inner = _fs(path)
    size = fs.get_file_info(inner).size or 0
    with fs.open_input_stream(inner) as f:
        sample = f.read(1 << 20)
    lines = max(sample.count(b"\n"), 1)
    compressed = path.lower().endswith(".gz")
    return int(size / max(len(sample), 1) * lines * (5 if compressed else 1))


# --- work units ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """A part of one input file parsed by one task.

    Parquet units are runs of row groups [rg_start, rg_end) whose first row is `first_row`
    (0-based) in the file; a CSV file is one unit (it is streamed, not split)."""

    index: int
    log: str
    path: str
    format: str
    rg_start: int = 0
    rg_end: int = 0
    first_row: int = 0
    est_rows: int = 0


def plan_units(spec: LogSpec) -> list[Unit]:
    units: list[Unit] = []
    for name, part in ((IMPRESSIONS, spec.impressions), (BEHAVIORS, spec.behaviors)):
        for path in list_files(part.source, name):
            if part.source.format == "csv":
                units.append(Unit(len(units), name, path, "csv",
                                  est_rows=_estimate_csv_rows(path)))
                continue
            fs, inner = _fs(path)
            with fs.open_input_file(inner) as f:
                meta = pq.ParquetFile(f).metadata
            start, first, rows = 0, 0, 0
            for g in range(meta.num_row_groups):
                rows += meta.row_group(g).num_rows
                if rows >= spec.unit_rows or g == meta.num_row_groups - 1:
                    units.append(Unit(len(units), name, path, "parquet", start, g + 1, first,
                                      rows))
                    start, first, rows = g + 1, first + rows, 0
    return units


# --- column parsing -----------------------------------------------------------------------------
def _as_array(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _null_mask(arr: pa.Array, nulls: tuple[str, ...]) -> np.ndarray:
    missing = arr.is_null()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        missing = pc.or_(missing, pc.fill_null(pc.is_in(arr, pa.array(nulls, arr.type)), False))
    return missing.to_numpy(zero_copy_only=False)


def parse_int(arr: pa.Array, nulls: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integers from any column type. -> values int64 (N,), missing (N,) bool, bad (N,) bool
    (present but not an integer; values are 0 there)."""
    arr = _as_array(arr)
    missing = _null_mask(arr, nulls)
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return arr.cast(pa.int64()).fill_null(0).to_numpy(), missing, np.zeros_like(missing)
    if pa.types.is_timestamp(t):  # -> seconds since the epoch
        v = arr.cast(pa.timestamp("s"), safe=False).cast(pa.int64()).fill_null(0).to_numpy()
        return v, missing, np.zeros_like(missing)
    if pa.types.is_floating(t):
        v = arr.fill_null(0).to_numpy()
        missing = missing | np.isnan(v)  # pandas writes missing integers as NaN
        with np.errstate(invalid="ignore"):
            bad = ~missing & ~(np.isfinite(v) & (v == np.round(v)) & (np.abs(v) < 2 ** 62))
        return np.where(bad | missing, 0, v).astype(np.int64), missing, bad
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        s = pc.utf8_trim_whitespace(arr)
        ok = pc.fill_null(pc.match_substring_regex(s, r"^[+-]?[0-9]{1,18}$"), False)
        ok_np = ok.to_numpy(zero_copy_only=False)
        bad = ~missing & ~ok_np
        values = pc.cast(pc.if_else(ok, s, pa.scalar("0", s.type)), pa.int64())
        return values.to_numpy(zero_copy_only=False), missing, bad
    raise DataError(f"unsupported column type {t} for an integer field")


def parse_float(arr: pa.Array, nulls: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """Finite floats -> values float64 (N,), missing (N,), bad (N,)."""
    arr = _as_array(arr)
    missing = _null_mask(arr, nulls)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        v = arr.cast(pa.float64()).fill_null(0).to_numpy()
        missing = missing | np.isnan(v)
    else:
        raw = arr.cast(pa.string()).to_numpy(zero_copy_only=False)
        v = pd.to_numeric(pd.Series(raw, dtype=object), errors="coerce").to_numpy(np.float64)
    bad = ~missing & ~np.isfinite(v)
    return np.where(bad | missing, 0.0, v), missing, bad


def parse_str(arr: pa.Array, nulls: tuple[str, ...]) -> tuple[pa.Array, np.ndarray]:
    """Strings (integers and floats written in decimal) -> values (nulls where missing),
    missing (N,)."""
    arr = _as_array(arr)
    if pa.types.is_floating(arr.type):
        v = arr.to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            if np.all(np.isnan(v) | (v == np.round(v))):
                arr = arr.cast(pa.int64(), safe=False)
    missing = _null_mask(arr, nulls)
    s = pc.utf8_trim_whitespace(arr.cast(pa.string()))
    return pc.if_else(pa.array(missing), pa.nulls(len(s), pa.string()), s), missing


# --- hashing ------------------------------------------------------------------------------------
def bucket_of(users: np.ndarray, buckets: int) -> np.ndarray:
    return (mix64(users) % np.uint64(buckets)).astype(np.int64)


# --- time histogram (split cutoffs) -------------------------------------------------------------
@dataclass
class TimeHistogram:
    """Counts of timestamps in bins of width 2**shift (exact while shift == 0), coarsened so it
    never holds more than TIME_BINS bins: quantile cutoffs with bounded memory."""

    shift: int = 0
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def of(cls, ts: np.ndarray) -> TimeHistogram:
        keys, counts = np.unique(ts, return_counts=True)
        return cls(0, keys, counts.astype(np.int64)).coarsened(TIME_BINS)

    def coarsened(self, limit: int, shift: int | None = None) -> TimeHistogram:
        h = self
        target = self.shift if shift is None else max(shift, self.shift)
        while True:
            if target > h.shift:
                keys, inv = np.unique(h.keys >> (target - h.shift), return_inverse=True)
                h = TimeHistogram(target, keys, np.bincount(inv, weights=h.counts,
                                                            minlength=len(keys)).astype(np.int64))
            if len(h.keys) <= limit:
                return h
            target += 1

    def merge(self, other: TimeHistogram) -> TimeHistogram:
        shift = max(self.shift, other.shift)
        a, b = self.coarsened(TIME_BINS, shift), other.coarsened(TIME_BINS, shift)
        keys, inv = np.unique(np.concatenate([a.keys, b.keys]), return_inverse=True)
        counts = np.bincount(inv, weights=np.concatenate([a.counts, b.counts]),
                             minlength=len(keys)).astype(np.int64)
        return TimeHistogram(shift, keys, counts).coarsened(TIME_BINS)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def cut(self, fraction_before: float) -> int:
        """The earliest bin start t with at least `fraction_before` of the timestamps < t."""
        if self.total == 0:
            return 0
        before = np.cumsum(self.counts) - self.counts  # (K,) timestamps before each bin
        hit = np.flatnonzero(before >= fraction_before * self.total - 1e-9)
        key = self.keys[hit[0]] if hit.size else self.keys[-1] + 1
        return int(key) << self.shift


# --- side tables (joins) ------------------------------------------------------------------------
@dataclass
class JoinTable:
    """A side table indexed by key: `index.get_indexer(keys)` gives row positions; `columns`
    holds each joined feature's parsed raw values (Arrow, nulls where missing)."""

    name: str
    on: str
    key_type: str
    index: pd.Index
    columns: dict[str, pa.Array]


# --- per-file statistics ------------------------------------------------------------------------
@dataclass
class FileStats:
    """What happened to one input file's rows. `examples` are (line/row, field, value, reason)
    of the first malformed rows."""

    path: str
    log: str
    rows: int = 0
    malformed: int = 0
    filtered: int = 0
    examples: list[tuple[int, str, str, str]] = field(default_factory=list)
    missing: dict[str, int] = field(default_factory=dict)
    join_misses: dict[str, int] = field(default_factory=dict)
    line_numbers: bool = False  # True: CSV line numbers (header = line 1); False: 1-based rows

    def add(self, other: FileStats, show: int) -> None:
        self.rows += other.rows
        self.malformed += other.malformed
        self.filtered += other.filtered
        self.examples = sorted(self.examples + other.examples)[:show]
        for mine, theirs in ((self.missing, other.missing),
                             (self.join_misses, other.join_misses)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def describe_examples(self) -> list[str]:
        where = "line" if self.line_numbers else "row"
        return [f"{self.path} {where} {n}: field {f!r}: {v!r} ({why})"
                for n, f, v, why in self.examples]


class _Checks:
    """Accumulates malformed-row masks of one batch with their first examples."""

    def __init__(self, n: int, rownum: np.ndarray, show: int) -> None:
        self.bad = np.zeros(n, bool)
        self.rownum = rownum
        self.show = show
        self.examples: list[tuple[int, str, str, str]] = []

    def flag(self, mask: np.ndarray, field_name: str, raw: pa.Array, reason: str) -> None:
        """Mark rows `mask` malformed; `raw` is the column as read (shown in examples)."""
        mask = mask & ~self.bad  # report each row once, at its first bad field
        if not mask.any():
            return
        self.bad |= mask
        idx = np.flatnonzero(mask)[: self.show]
        values = _as_array(raw).take(pa.array(idx)).to_pylist()
        for i, value in zip(idx, values, strict=True):
            self.examples.append((int(self.rownum[i]), field_name,
                                  "" if value is None else str(value), reason))


def _raw(table: pa.Table, column: str) -> pa.Array:
    return _as_array(table.column(column))


def _feature_values(spec: LogSpec, f: FeatureSpec, arr: pa.Array, checks: _Checks,
                    stats: FileStats) -> pa.Array:
    """Raw values of a feature column -> int64 or string Arrow array, null where missing."""
    owner = spec.feature(f.aligned_with) if f.group == "behavior" else f
    if owner.bins is not None:
        v, missing, bad = parse_float(arr, spec.null_values)
        checks.flag(bad, f.column, arr, "not a number")
        ids = bin_index(v, owner.bins)
        out = pa.array(ids, pa.int64(), mask=missing | bad)
    elif owner.type == "int":
        v, missing, bad = parse_int(arr, spec.null_values)
        checks.flag(bad, f.column, arr, "not an integer")
        out = pa.array(v, pa.int64(), mask=missing | bad)
    else:
        out, missing = parse_str(arr, spec.null_values)
    if missing.any():
        stats.missing[f.name] = stats.missing.get(f.name, 0) + int(missing.sum())
    return out


def _user_ids(spec: LogSpec, arr: pa.Array, column: str, checks: _Checks) -> np.ndarray:
    if spec.user_type == "int":
        v, missing, bad = parse_int(arr, spec.null_values)
        checks.flag(bad, column, arr, "user id is not an integer")
    else:
        s, missing = parse_str(arr, spec.null_values)
        v = hash_strings(s.fill_null("").to_numpy(zero_copy_only=False)).view(np.int64)
    checks.flag(missing, column, arr, "missing user id")
    return v


def _timestamps(spec: LogSpec, arr: pa.Array, column: str, checks: _Checks) -> np.ndarray:
    v, missing, bad = parse_int(arr, spec.null_values)
    checks.flag(missing, column, arr, "missing timestamp")
    checks.flag(bad, column, arr, "timestamp is not an integer")
    return v


def parse_impressions(spec: LogSpec, joins: list[JoinTable], table: pa.Table,
                      rownum: np.ndarray, stats: FileStats) -> tuple[pa.Table, list]:
    """Validate and normalise a batch of impression rows; joins side tables.

    Returns the clean rows (user int64, ts int64, label int8, one column per impression-side
    feature) and the examples of malformed rows."""
    imp = spec.impressions
    checks = _Checks(table.num_rows, rownum, spec.malformed.show)
    user = _user_ids(spec, _raw(table, imp.user), imp.user, checks)
    ts = _timestamps(spec, _raw(table, imp.timestamp), imp.timestamp, checks)
    lab_raw = _raw(table, imp.label.column)
    lab = parse_str(lab_raw, ())[0]
    pos = pc.fill_null(pc.is_in(lab, pa.array(imp.label.positive)), False).to_numpy(
        zero_copy_only=False)
    neg = pc.fill_null(pc.is_in(lab, pa.array(imp.label.negative)), False).to_numpy(
        zero_copy_only=False)
    checks.flag(~(pos | neg), imp.label.column, lab_raw,
                f"label is not one of {list(imp.label.positive + imp.label.negative)}")
    columns = {"user": pa.array(user), "ts": pa.array(ts),
               "label": pa.array(pos.astype(np.int8))}
    for f in spec.features:
        if f.group != "behavior" and f.source == IMPRESSIONS:
            columns[f.name] = _feature_values(spec, f, _raw(table, f.column), checks, stats)
    for j in joins:
        raw = _raw(table, j.on)
        if j.key_type == "int":
            keys, missing, bad = parse_int(raw, spec.null_values)
            keys = np.where(missing | bad, np.iinfo(np.int64).min, keys)
        else:
            keys = parse_str(raw, spec.null_values)[0].to_numpy(zero_copy_only=False)
        rows = j.index.get_indexer(keys)  # (N,) -1 where absent
        miss = rows < 0
        if miss.any():
            stats.join_misses[j.name] = stats.join_misses.get(j.name, 0) + int(
                (miss & ~checks.bad).sum())
        take = pa.array(rows, pa.int64(), mask=miss)
        for name, values in j.columns.items():
            columns[name] = values.take(take)
    good = ~checks.bad
    out = pa.table(columns).filter(pa.array(good)) if checks.bad.any() else pa.table(columns)
    stats.malformed += int(checks.bad.sum())
    return out, checks.examples


def parse_behaviors(spec: LogSpec, table: pa.Table, rownum: np.ndarray,
                    stats: FileStats) -> tuple[pa.Table, list]:
    """Validate and normalise a batch of behaviour rows: user, ts, one column per behaviour
    feature. Rows of types not in `keep_types` are counted as filtered."""
    beh = spec.behaviors
    checks = _Checks(table.num_rows, rownum, spec.malformed.show)
    user = _user_ids(spec, _raw(table, beh.user), beh.user, checks)
    ts = _timestamps(spec, _raw(table, beh.timestamp), beh.timestamp, checks)
    keep = np.ones(table.num_rows, bool)
    if beh.type_column is not None:
        types, missing = parse_str(_raw(table, beh.type_column), spec.null_values)
        checks.flag(missing, beh.type_column, _raw(table, beh.type_column),
                    "missing behaviour type")
        if beh.keep_types is not None:
            keep = pc.fill_null(pc.is_in(types, pa.array(beh.keep_types)), False).to_numpy(
                zero_copy_only=False)
    columns = {"user": pa.array(user), "ts": pa.array(ts)}
    for f in spec.group("behavior"):
        columns[f.name] = _feature_values(spec, f, _raw(table, f.column), checks, stats)
    stats.malformed += int(checks.bad.sum())
    filtered = keep & ~checks.bad
    stats.filtered += int((~keep & ~checks.bad).sum())
    return pa.table(columns).filter(pa.array(filtered)), checks.examples


# --- reading units ------------------------------------------------------------------------------
def _needed_columns(spec: LogSpec, log_name: str) -> list[str]:
    if log_name == IMPRESSIONS:
        imp = spec.impressions
        cols = [imp.user, imp.timestamp, imp.label.column]
        cols += [f.column for f in spec.features
                 if f.group != "behavior" and f.source == IMPRESSIONS]
        cols += [j.on for j in spec.joins]
    else:
        beh = spec.behaviors
        cols = [beh.user, beh.timestamp] + ([beh.type_column] if beh.type_column else [])
        cols += [f.column for f in spec.group("behavior")]
    return list(dict.fromkeys(cols))


def _good_lines(first_good: int, n: int, invalid: np.ndarray, first_line: int) -> np.ndarray:
    """CSV line numbers of the well-formed rows first_good .. first_good + n - 1 (0-based among
    well-formed rows), given the sorted line numbers of the rows skipped as invalid."""
    base = first_line + first_good + np.arange(n)
    lines = base
    for _ in range(64):  # a fixed point; each round accounts for more skipped lines
        nxt = base + np.searchsorted(invalid, lines, side="right")
        if np.array_equal(nxt, lines):
            break
        lines = nxt
    return lines


def read_unit(unit: Unit, columns: list[str], source: Source, stats: FileStats,
              show: int) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Stream a unit as (batch with `columns`, 1-based row or line number of each row)."""
    if unit.format == "parquet":
        fs, inner = _fs(unit.path)
        with fs.open_input_file(inner) as f:
            pf = pq.ParquetFile(f)
            names = {n.strip(): n for n in pf.schema_arrow.names}
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(f"{unit.path}: column(s) {missing} not found; the file has "
                                f"{sorted(names)}")
            offset = unit.first_row
            for batch in pf.iter_batches(READ_BATCH_ROWS, range(unit.rg_start, unit.rg_end),
                                         columns=[names[c] for c in columns]):
                t = pa.Table.from_batches([batch]).rename_columns(columns)
                yield t, offset + 1 + np.arange(t.num_rows)
                offset += t.num_rows
        return
    stats.line_numbers = True
    header = _csv_header(unit.path, source.delimiter)
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{unit.path} line 1: column(s) {missing} not found; header is {header}")
    invalid: list[int] = []

    def on_invalid(row) -> str:
        # Skipped before any batch: counted here, both as a row and as malformed.
        stats.rows += 1
        stats.malformed += 1
        if row.number is not None:
            invalid.append(row.number)
        if len(stats.examples) < show:
            stats.examples.append((row.number or -1, "<row>", row.text[:200],
                                   f"expected {row.expected_columns} fields, got "
                                   f"{row.actual_columns}"))
        return "skip"

    # Unique internal names: a header may repeat a name or carry stray spaces.
    internal = [f"c{i}" for i in range(len(header))]
    wanted = {c: internal[header.index(c)] for c in columns}
    fs, inner = _fs(unit.path)
    with fs.open_input_stream(inner, compression="detect") as f:
        reader = pcsv.open_csv(
            f,
            read_options=pcsv.ReadOptions(column_names=internal, skip_rows=1,
                                          block_size=8 << 20, use_threads=False),
            parse_options=pcsv.ParseOptions(delimiter=source.delimiter,
                                            invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(
                include_columns=list(wanted.values()),
                column_types={v: pa.string() for v in wanted.values()},
                strings_can_be_null=False),
        )
        good = 0
        for batch in reader:
            t = pa.Table.from_batches([batch]).select(list(wanted.values()))
            t = t.rename_columns(list(wanted))
            lines = _good_lines(good, t.num_rows, np.sort(np.array(invalid, np.int64)), 2)
            good += t.num_rows
            yield t, lines


# --- stage 1: parse ------------------------------------------------------------------------------
class _BucketWriter:
    """Buffers clean rows of one unit and appends them to one staging file per bucket."""

    def __init__(self, root: str, log_name: str, unit: int, buckets: int) -> None:
        self.root, self.log, self.unit, self.buckets = root, log_name, unit, buckets
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.buffer.append(table)
            self.buffered += table.num_rows
            if self.buffered >= FLUSH_ROWS:
                self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        t = pa.concat_tables(self.buffer)
        self.buffer, self.buffered = [], 0
        b = bucket_of(t.column("user").to_numpy(), self.buckets)
        order = np.argsort(b, kind="stable")
        t = t.take(pa.array(order))
        bounds = np.searchsorted(b[order], np.arange(self.buckets + 1))
        for k in range(self.buckets):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            if hi == lo:
                continue
            w = self.writers.get(k)
            if w is None:
                fs, inner = _fs(_bucket_dir(self.root, self.log, k))
                fs.create_dir(inner, recursive=True)
                path = f"{inner}/u{self.unit:06d}.parquet"
                w = self.writers[k] = pq.ParquetWriter(path, t.schema, filesystem=fs)
            w.write_table(t.slice(lo, hi - lo))
        self.rows += t.num_rows

    def close(self) -> None:
        self.flush()
        for w in self.writers.values():
            w.close()


def _bucket_dir(root: str, log_name: str, bucket: int) -> str:
    return f"{root}/{log_name}/b{bucket:05d}"


def _parse_task(batch: dict, *, spec: LogSpec, joins: list[JoinTable], staging: str,
                buckets: int) -> Iterator[dict]:
    """Ray Data UDF: parse one unit (a row of `batch`), stage its rows, return its stats."""
    for text in batch["unit"]:
        unit = Unit(**json.loads(str(text)))
        stats = FileStats(unit.path, unit.log)
        writer = _BucketWriter(staging, unit.log, unit.index, buckets)
        hist = TimeHistogram()
        part = spec.impressions if unit.log == IMPRESSIONS else spec.behaviors
        columns = _needed_columns(spec, unit.log)
        for table, rownum in read_unit(unit, columns, part.source, stats, spec.malformed.show):
            stats.rows += table.num_rows
            try:
                if unit.log == IMPRESSIONS:
                    clean, examples = parse_impressions(spec, joins, table, rownum, stats)
                else:
                    clean, examples = parse_behaviors(spec, table, rownum, stats)
            except DataError as e:
                raise DataError(f"{unit.path}: {e}") from None
            if unit.log == IMPRESSIONS and clean.num_rows:
                hist = hist.merge(TimeHistogram.of(clean.column("ts").to_numpy()))
            if examples and len(stats.examples) < spec.malformed.show:
                stats.examples = sorted(stats.examples + examples)[: spec.malformed.show]
            writer.add(clean)
        writer.close()
        yield {"summary": np.array([pickle.dumps((unit.index, stats, hist, writer.rows))],
                                   dtype=object)}


# --- side tables --------------------------------------------------------------------------------
def load_join(spec: LogSpec, name: str) -> tuple[JoinTable, list[FileStats]]:
    """Read a side table whole (the driver does this once), validate it like the logs and index
    it by key. Duplicate keys are an error: the join would be ambiguous."""
    j = next(x for x in spec.joins if x.name == name)
    feats = [f for f in spec.features if f.source == name]
    columns = list(dict.fromkeys([j.key] + [f.column for f in feats]))
    parts, all_stats = [], []
    show = spec.malformed.show
    for path in list_files(j.source, f"joins.{name}"):
        stats = FileStats(path, f"joins.{name}")
        rg_end = 0
        if j.source.format == "parquet":
            fs, inner = _fs(path)
            with fs.open_input_file(inner) as f:
                rg_end = pq.ParquetFile(f).metadata.num_row_groups
        unit = Unit(0, name, path, j.source.format, 0, rg_end)
        for table, rownum in read_unit(unit, columns, j.source, stats, show):
            stats.rows += table.num_rows
            checks = _Checks(table.num_rows, rownum, show)
            raw = _raw(table, j.key)
            if j.key_type == "int":
                keys, missing, bad = parse_int(raw, spec.null_values)
                checks.flag(bad, j.key, raw, "key is not an integer")
                key_arr = pa.array(keys)
            else:
                key_arr, missing = parse_str(raw, spec.null_values)
            checks.flag(missing, j.key, raw, "missing key")
            cols = {"__key": key_arr}
            for f in feats:
                cols[f.name] = _feature_values(spec, f, _raw(table, f.column), checks, stats)
            stats.malformed += int(checks.bad.sum())
            stats.examples = sorted(stats.examples + checks.examples)[:show]
            parts.append(pa.table(cols).filter(pa.array(~checks.bad)))
        all_stats.append(stats)
    t = pa.concat_tables(parts) if parts else None
    if t is None or t.num_rows == 0:
        raise DataError(f"joins.{name}: no valid rows in {list(j.source.paths)}")
    keys = t.column("__key").to_numpy()
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        dup = uniq[np.argmax(counts > 1)]
        raise DataError(f"joins.{name}: key {j.key!r} value {dup!r} appears "
                        f"{int(counts.max())} times in {list(j.source.paths)}; a joined table "
                        f"needs unique keys")
    table = JoinTable(name, j.on, j.key_type, pd.Index(keys),
                      {f.name: _as_array(t.column(f.name)) for f in feats})
    return table, all_stats


# --- stage 2: vocabularies ----------------------------------------------------------------------
def _read_bucket(staging: str, log_name: str, bucket: int,
                 columns: list[str] | None = None) -> pa.Table | None:
    fs, inner = _fs(_bucket_dir(staging, log_name, bucket))
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return None
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(inner))
                   if f.path.endswith(".parquet"))
    if not files:
        return None
    return pa.concat_tables(pq.read_table(p, columns=columns, filesystem=fs) for p in files)


def _vocab_sources(spec: LogSpec) -> dict[str, list[tuple[str, str]]]:
    """Vocabulary tables -> the (log, staged column) pairs whose values they count."""
    out: dict[str, list[tuple[str, str]]] = {}
    for f in spec.features:
        owner = spec.feature(f.table)
        if owner.hash_buckets is not None or owner.bins is not None:
            continue
        out.setdefault(f.table, []).append((BEHAVIORS if f.group == "behavior" else IMPRESSIONS,
                                            f.name))
    return out


def _vocab_task(batch: dict, *, spec: LogSpec, staging: str, valid_start: int) -> Iterator[dict]:
    """Ray Data UDF: raw-id counts of one bucket over the training period (ts < valid_start)."""
    sources = _vocab_sources(spec)
    for b in batch["bucket"]:
        b = int(b)
        logs = {}
        for log_name in (IMPRESSIONS, BEHAVIORS):
            cols = sorted({c for pairs in sources.values() for lg, c in pairs if lg == log_name})
            t = _read_bucket(staging, log_name, b, ["ts"] + cols) if cols else None
            logs[log_name] = None if t is None else t.filter(pc.less(t.column("ts"),
                                                                     valid_start))
        out = {}
        for table, pairs in sources.items():
            arrays = [logs[lg].column(c) for lg, c in pairs if logs[lg] is not None]
            chunks = [ch for a in arrays for ch in a.chunks]
            if not chunks:
                continue
            vc = pc.value_counts(pc.drop_null(pa.chunked_array(chunks, chunks[0].type)))
            out[table] = (vc.field("values"), vc.field("counts").to_numpy().astype(np.int64))
        yield {"summary": np.array([pickle.dumps((b, out))], dtype=object)}


@dataclass
class Encoder:
    """Raw ids of one table -> dense ids: a vocabulary (raw value at position i of `index` has
    id i + NUM_RESERVED_IDS, unknown -> OOV), hashing into `buckets` buckets, or `bins` bin
    indices (0 .. bins - 1, the id space fixed by the edges). Missing -> OOV.
    """

    table: str
    type: str
    index: pd.Index | None = None
    buckets: int = 0
    bins: int = 0

    @property
    def vocab_size(self) -> int:
        if self.index is not None:
            return NUM_RESERVED_IDS + len(self.index)
        return NUM_RESERVED_IDS + (self.bins or self.buckets)

    def encode(self, arr) -> np.ndarray:
        """-> int32 (N,) dense ids."""
        arr = _as_array(arr)
        missing = arr.is_null().to_numpy(zero_copy_only=False)
        if self.type == "int":
            v = arr.fill_null(0).to_numpy()
        else:
            v = arr.fill_null("").to_numpy(zero_copy_only=False)
        if self.index is not None:
            pos = self.index.get_indexer(v)
            ids = np.where(pos >= 0, pos + NUM_RESERVED_IDS, OOV_ID)
        elif self.bins:
            ids = v.astype(np.int64) + NUM_RESERVED_IDS
        else:
            ids = hashed_ids(v, self.buckets, self.type)
        ids[missing] = OOV_ID
        return ids.astype(np.int32)


def _merge_counts(parts: list[pd.Series]) -> pd.Series:
    s = pd.concat(parts)
    return s.groupby(level=0, sort=False).sum()


def build_encoders(spec: LogSpec, counts: dict[str, pd.Series]) -> dict[str, Encoder]:
    """One encoder per table: vocabularies keep raw ids counted >= min_count in the training
    period, most frequent first (ties by raw value), so ids are stable across runs."""
    out = {}
    for name, owner in spec.table_owners.items():
        if owner.bins is not None:  # bin i of len(bins) + 1 bins -> id i + 2
            out[name] = Encoder(name, "int", bins=len(owner.bins) + 1)
        elif owner.hash_buckets is not None:
            out[name] = Encoder(name, owner.type, buckets=owner.hash_buckets)
        else:
            c = counts.get(name, pd.Series(dtype=np.int64))
            c = c[c >= owner.min_count].sort_index(kind="stable")
            c = c.sort_values(ascending=False, kind="stable")
            out[name] = Encoder(name, owner.type, pd.Index(c.index))
    return out


# --- stage 3: build -----------------------------------------------------------------------------
def split_codes(ts: np.ndarray, valid_start: int, test_start: int) -> np.ndarray:
    """0 train (ts < valid_start), 1 valid, 2 test (ts >= test_start). -> int8 (N,)"""
    return np.where(ts < valid_start, 0, np.where(ts < test_start, 1, 2)).astype(np.int8)


def sort_keys(imp_user: np.ndarray, imp_ts: np.ndarray, beh_user: np.ndarray,
              beh_ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One int64 key per row ordered like (user, ts): (user - min) * ts_span + (ts - min) when
    that fits in 62 bits, else (user rank, ts rank) over the bucket's distinct values.
    -> impression keys (N,), behaviour keys (M,), key of each impression user's first instant
    (N,)."""
    users = np.concatenate([imp_user, beh_user])
    stamps = np.concatenate([imp_ts, beh_ts])
    u0, t0 = users.min(), stamps.min()
    u_span = int(users.max()) - int(u0) + 1
    t_span = int(stamps.max()) - int(t0) + 1
    if u_span * t_span < 2 ** 62:
        u = users - u0
        t = stamps - t0
    else:
        _, u = np.unique(users, return_inverse=True)
        _, t = np.unique(stamps, return_inverse=True)
        t_span = int(t.max()) + 1
    u, t = u.astype(np.int64), t.astype(np.int64)
    key = u * np.int64(t_span) + t  # (N + M,)
    n = len(imp_user)
    return key[:n], key[n:], u[:n] * np.int64(t_span)


@dataclass
class History:
    """Behaviours of a bucket sorted by (user, time), and for every impression the slice of
    them strictly before it: behaviours [end - length, end), length <= max_history."""

    end: np.ndarray  # (N,) int64 position after the impression's last earlier behaviour
    length: np.ndarray  # (N,) int64 history length
    order: np.ndarray  # (M,) int64 behaviour rows in (user, time, staging) order
    imp_order: np.ndarray  # (N,) int64 impression rows in (user, time) order

    @classmethod
    def build(cls, imp_user: np.ndarray, imp_ts: np.ndarray, beh_user: np.ndarray,
              beh_ts: np.ndarray, max_history: int) -> History:
        imp_key, beh_key, user_first = sort_keys(imp_user, imp_ts, beh_user, beh_ts)
        order = np.argsort(beh_key, kind="stable")
        beh_key = beh_key[order]
        imp_order = np.argsort(imp_key, kind="stable")
        # Sorted needles keep the binary searches cache-friendly; results go back by scatter.
        # side="left": a behaviour with the impression's own timestamp is NOT before it.
        end = np.empty(len(imp_key), np.int64)
        end[imp_order] = np.searchsorted(beh_key, imp_key[imp_order], side="left")
        user_start = np.empty(len(imp_key), np.int64)
        user_start[imp_order] = np.searchsorted(beh_key, user_first[imp_order], side="left")
        return cls(end, np.minimum(end - user_start, max_history), order, imp_order)

    def slots(self, idx: np.ndarray, max_history: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the histories of impressions `idx` (B,) come from: source positions in the
        sorted behaviours (B, L) and the mask of real slots (B, L), oldest first."""
        k = self.length[idx]  # (B,)
        slot = np.arange(max_history)  # (L,)
        real = slot < k[:, None]  # (B, L)
        src = np.where(real, self.end[idx][:, None] - k[:, None] + slot, 0)  # (B, L)
        return src, real

    @staticmethod
    def gather(values: np.ndarray, src: np.ndarray, real: np.ndarray) -> np.ndarray:
        """Sorted behaviour `values` (M,) at `src` (B, L) -> int32 (B, L), PAD where not real."""
        if values.size == 0:
            return np.zeros(src.shape, np.int32)
        return np.where(real, values[src], 0).astype(np.int32)


class _SplitWriter:
    """Writes one bucket's rows of one split as part-<bucket>-<n>.parquet files."""

    def __init__(self, root: str, split: str, bucket: int, schema: Schema) -> None:
        self.dir = f"{root}/{split}"
        self.bucket, self.schema = bucket, schema
        self.writer: pq.ParquetWriter | None = None
        self.files, self.in_file, self.rows = 0, 0, 0

    def write(self, columns: dict[str, np.ndarray]) -> None:
        table = to_arrow(self.schema, columns)
        if table.num_rows == 0:
            return
        check_ids(self.schema, columns, f"{self.dir} (bucket {self.bucket})", self.rows)
        if self.writer is None or self.in_file >= ROWS_PER_FILE:
            self.close()
            path = f"{self.dir}/part-{self.bucket:05d}-{self.files:03d}.parquet"
            self.writer = pq.ParquetWriter(path, table.schema)
            self.files += 1
            self.in_file = 0
        self.writer.write_table(table, row_group_size=65_536)
        self.in_file += table.num_rows
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def build_bucket(spec: LogSpec, schema: Schema, encoders: dict[str, Encoder], staging: str,
                 out_root: str, bucket: int, valid_start: int, test_start: int) -> dict:
    """Prepared rows of one bucket, written under out_root/<split>/. Returns rows per split and
    the bucket's training id counts (sparse: table -> (ids, counts))."""
    rows = dict.fromkeys(SPLITS, 0)
    result = {"bucket": bucket, "rows": rows, "counts": {}, "impressions": 0, "behaviors": 0,
              "history": 0}
    imp = _read_bucket(staging, IMPRESSIONS, bucket)
    if imp is None or imp.num_rows == 0:
        return result
    beh = _read_bucket(staging, BEHAVIORS, bucket)
    L = spec.max_history
    user = imp.column("user").to_numpy()
    ts = imp.column("ts").to_numpy()
    label = imp.column("label").to_numpy()
    scalars = {f.name: encoders[f.table].encode(imp.column(f.name))
               for f in spec.features if f.group != "behavior"}
    behaviours = spec.group("behavior")
    if beh is None:
        beh_user = beh_ts = np.zeros(0, np.int64)
        beh_values = {f.name: np.zeros(0, np.int32) for f in behaviours}
    else:
        beh_user, beh_ts = beh.column("user").to_numpy(), beh.column("ts").to_numpy()
    hist = History.build(user, ts, beh_user, beh_ts, L)
    if beh is not None:
        beh_values = {f.name: encoders[f.table].encode(beh.column(f.name))[hist.order]
                      for f in behaviours}
    del imp, beh
    code = split_codes(ts, valid_start, test_start)
    by_time = hist.imp_order  # valid/test rows in (user, time) order
    rng = np.random.default_rng([spec.seed, bucket])
    counts = {t: np.zeros(n, np.int64) for t, (n, _) in schema.tables.items()}
    for s, split in enumerate(SPLITS):
        idx = by_time[code[by_time] == s]
        if split == "train":  # shuffled, so that every train file is a random sample
            idx = rng.permutation(idx)
        writer = _SplitWriter(out_root, split, bucket, schema)
        for lo in range(0, len(idx), BUILD_CHUNK_ROWS):
            part = idx[lo:lo + BUILD_CHUNK_ROWS]
            cols = {schema.label: label[part], schema.user_column: user[part]}
            cols.update({name: v[part] for name, v in scalars.items()})
            src, real = hist.slots(part, L)
            for f in behaviours:
                cols[f.name] = hist.gather(beh_values[f.name], src, real)
            if split == "train":
                for t, c in count_ids(schema, cols).items():
                    counts[t] += c
            writer.write(cols)
        writer.close()
        rows[split] = writer.rows
    result["counts"] = {t: (np.flatnonzero(c), c[c > 0]) for t, c in counts.items()}
    result.update(impressions=len(ts), behaviors=len(beh_user), history=int(hist.length.sum()))
    return result


def _build_task(batch: dict, *, spec: LogSpec, schema: dict, encoders: dict[str, Encoder],
                staging: str, out_root: str, valid_start: int, test_start: int
                ) -> Iterator[dict]:
    """Ray Data UDF: build one bucket (a row of `batch`)."""
    sch = Schema.from_dict(schema)
    for b in batch["bucket"]:
        res = build_bucket(spec, sch, encoders, staging, out_root, int(b), valid_start,
                           test_start)
        yield {"summary": np.array([pickle.dumps(res)], dtype=object)}


# --- driver -------------------------------------------------------------------------------------
@dataclass
class LogReport:
    """What `prepare_logs` did; also stored in the manifest's params."""

    output: str
    rows: dict[str, int]
    input_rows: dict[str, int]
    malformed: int
    files: list[dict]
    valid_start: int
    test_start: int
    buckets: int
    units: int
    vocab_sizes: dict[str, int]
    seconds: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def _run_stage(name: str, items: list[dict], fn, kwargs: dict, executor: str = "ray"
               ) -> Iterator:
    """`from_items(items).map_batches(fn)`, one task per item; yields the unpickled summaries.
    executor="local" runs the same tasks one after the other in this process (no Ray)."""
    if executor == "local":
        for item in items:
            for out in fn({k: [v] for k, v in item.items()}, **kwargs):
                for blob in out["summary"]:
                    yield pickle.loads(blob)
        return
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    out = ds.map_batches(fn, batch_size=1, batch_format="numpy", fn_kwargs=kwargs, num_cpus=1)
    log.info("%s: %d tasks", name, len(items))
    try:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            for blob in batch["summary"]:
                yield pickle.loads(blob)
    except Exception as e:
        user = _input_error(e)
        if user is None:
            raise
        raise user from e


def _input_error(error: BaseException) -> Exception | None:
    """The DataError / FileNotFoundError a task raised, unwrapped from Ray's task errors, so
    callers (and the CLI) see one clear message naming the file."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if type(e) in (DataError, FileNotFoundError):
            return type(e)(*e.args)
        stack.extend([e.__context__, e.__cause__, cause])
    return None


def _check_malformed(spec: LogSpec, files: list[FileStats]) -> None:
    total = sum(f.rows for f in files)
    bad = sum(f.malformed for f in files)
    for f in files:
        if f.malformed:
            log.warning("%s: %d of %d rows malformed and skipped; first: %s", f.path,
                        f.malformed, f.rows, "; ".join(f.describe_examples()[:3]))
    limit = spec.malformed
    over_count = limit.max_count is not None and bad > limit.max_count
    over_frac = limit.max_fraction is not None and bad > limit.max_fraction * max(total, 1)
    if bad and (over_count or over_frac):
        lines = [f"{bad} of {total} input rows are malformed, over the limit "
                 f"(max_fraction={limit.max_fraction}, max_count={limit.max_count}):"]
        for f in files:
            if f.malformed:
                lines.append(f"  {f.path}: {f.malformed} of {f.rows} rows malformed")
                lines.extend(f"    {e}" for e in f.describe_examples())
        raise DataError("\n".join(lines))


def _cutoffs(spec: LogSpec, hist: TimeHistogram) -> tuple[int, int]:
    sp = spec.split
    if not sp.by_fraction:
        return int(sp.valid_start), int(sp.test_start)
    test_start = hist.cut(1.0 - sp.test) if sp.test > 0 else int(np.iinfo(np.int64).max)
    valid_start = hist.cut(1.0 - sp.test - sp.valid) if sp.valid > 0 else test_start
    return valid_start, test_start


def log_schema(spec: LogSpec, encoders: dict[str, Encoder]) -> Schema:
    """Prepared schema: behaviour features share their aligned ad feature's table."""
    feats = []
    for f in spec.features:
        size = encoders[f.table].vocab_size
        if f.group == "behavior":
            feats.append(Feature(f.name, "behavior", f.table, size, spec.embedding_dim,
                                 spec.max_history, f.aligned_with))
        else:
            feats.append(Feature(f.name, f.group, f.name, size, spec.embedding_dim))
    # How raw ids of tables without a vocabulary file become dense ids: serving repeats it.
    hashed = {t: e.buckets for t, e in encoders.items() if e.buckets}
    hash_types = {t: e.type for t, e in encoders.items() if e.buckets}
    bins = {f.name: list(f.bins) for f in spec.features if f.bins is not None}
    return Schema(tuple(feats), name=spec.name,
                  extra={"source": "logs", "hashed": hashed, "hash_types": hash_types,
                         "bins": bins})


def prepare_logs(spec: LogSpec | str | Path, output_dir: str | Path, *, overwrite: bool = False,
                 staging_dir: str | None = None, address: str | None = None,
                 num_cpus: int | None = None, executor: str = "ray",
                 vocab_from: str | Path | None = None,
                 count_decay: float | None = None) -> LogReport:
    """Prepare an impression log + behaviour log described by `spec` (see the module docstring).

    Args:
        spec: a LogSpec or the path of its YAML file.
        output_dir: prepared dataset to create (written in a temporary sibling, then renamed).
        overwrite: replace an existing `output_dir`.
        staging_dir: where the bucketed intermediate files go (deleted at the end); default a
            hidden sibling of `output_dir`. Must be visible to every node.
        address: Ray cluster to join when Ray is not initialised; None starts a local Ray.
        num_cpus: CPUs of that local Ray (None: all).
        executor: "ray" (the Ray Data pipeline) or "local": the same tasks run one after the
            other in this process, without Ray (small data, debugging, machines where Ray
            cannot start).
        vocab_from: an earlier prepared dataset of the same spec whose vocabularies this one
            extends (`din_ray.data.vocab_extend`); checked before any work starts.
        count_decay: with `vocab_from`, counts are round(new + count_decay * earlier).

    Returns:
        A LogReport (rows per split, per-file malformed/filtered/missing/join-miss counts,
        cutoffs, vocabulary sizes, stage timings).

    Raises:
        DataError: malformed rows over the spec's limit (the message lists per-file counts and
            the first offending rows: file, line, field, value), missing columns, no data.
        FileNotFoundError / FileExistsError: inputs missing, output present without overwrite.
    """
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    if not isinstance(spec, LogSpec):
        spec = load_spec(spec)
    output = Path(output_dir)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (--overwrite)")
    previous = _check_previous(spec, vocab_from, count_decay)
    staging = staging_dir or str(output.with_name(
        f".{output.name}.staging-{os.getpid()}-{time.time_ns()}"))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    joins, join_stats = [], []
    for j in spec.joins:
        table, stats = load_join(spec, j.name)
        joins.append(table)
        join_stats.extend(stats)
    units = plan_units(spec)
    est = sum(u.est_rows for u in units)
    buckets = max(1, math.ceil(est / spec.rows_per_bucket))
    seconds["plan"] = time.perf_counter() - t0
    log.info("%d input units (~%d rows) -> %d buckets; staging in %s", len(units), est, buckets,
             staging)
    try:
        session = (ray_session.session(address, num_cpus, dashboard=False) if executor == "ray"
                   else contextlib.nullcontext())
        with session:
            return _prepare(spec, output, overwrite, staging, joins, join_stats, units, buckets,
                            seconds, executor, previous, count_decay)
    finally:
        fs, inner = _fs(staging)
        if fs.get_file_info(inner).type != pafs.FileType.NotFound:
            fs.delete_dir(inner)


def _check_previous(spec: LogSpec, vocab_from: str | Path | None,
                    count_decay: float | None) -> PreparedDataset | None:
    """The `vocab_from` dataset, refused before any work when its schema is not this spec's
    (vocabulary sizes aside)."""
    if vocab_from is None:
        if count_decay is not None:
            raise ValueError("count_decay needs vocab_from (the earlier counts)")
        return None
    vocab_extend._check_decay(count_decay)
    previous = vocab_extend.open_previous(vocab_from, "logs")
    # Vocabulary tables get one placeholder id: only the structure is compared here.
    encoders = {t: (Encoder(t, e.type, pd.Index(["?"])) if e.index is not None else e)
                for t, e in build_encoders(spec, {}).items()}
    fixed = [t for t, e in encoders.items() if e.index is None]
    vocab_extend.check_continues(previous, log_schema(spec, encoders), fixed)
    return previous


def _prepare(spec: LogSpec, output: Path, overwrite: bool, staging: str, joins: list[JoinTable],
             join_stats: list[FileStats], units: list[Unit], buckets: int,
             seconds: dict[str, float], executor: str,
             previous: PreparedDataset | None = None,
             count_decay: float | None = None) -> LogReport:
    t0 = time.perf_counter()
    per_file: dict[str, FileStats] = {}
    hist = TimeHistogram()
    staged = {IMPRESSIONS: 0, BEHAVIORS: 0}
    items = [{"unit": json.dumps(asdict(u))} for u in units]
    kwargs = {"spec": spec, "joins": joins, "staging": staging, "buckets": buckets}
    for index, stats, h, written in _run_stage("parse", items, _parse_task, kwargs, executor):
        mine = per_file.setdefault(stats.path, FileStats(stats.path, stats.log,
                                                          line_numbers=stats.line_numbers))
        mine.add(stats, spec.malformed.show)
        hist = hist.merge(h)
        staged[units[index].log] += written
    files = join_stats + [per_file[p] for p in dict.fromkeys(u.path for u in units)]
    _check_malformed(spec, files)
    if staged[IMPRESSIONS] == 0:
        raise DataError(f"no valid impression rows in {list(spec.impressions.source.paths)}")
    valid_start, test_start = _cutoffs(spec, hist)
    seconds["parse"] = time.perf_counter() - t0
    log.info("parsed: %d impressions, %d behaviours staged; valid from ts %d, test from ts %d",
             staged[IMPRESSIONS], staged[BEHAVIORS], valid_start, test_start)

    t0 = time.perf_counter()
    sources = _vocab_sources(spec)
    partial: dict[str, list[pd.Series]] = {t: [] for t in sources}
    merged: dict[str, pd.Series] = {}
    bucket_items = [{"bucket": b} for b in range(buckets)]
    if sources:
        kwargs = {"spec": spec, "staging": staging, "valid_start": valid_start}
        for _, out in _run_stage("vocab", bucket_items, _vocab_task, kwargs,
                                     executor):
            for table, (values, counts) in out.items():
                partial[table].append(pd.Series(counts, index=values.to_pandas()))
                if len(partial[table]) >= 16:  # bound the driver's memory
                    partial[table] = [_merge_counts(partial[table])]
        merged = {t: _merge_counts(p) for t, p in partial.items() if p}
    encoders = build_encoders(spec, merged)
    if previous is not None:
        for t, e in encoders.items():
            if e.index is not None:
                e.index = vocab_extend.extend_encoder_index(previous, t, e.index, e.type)
    schema = log_schema(spec, encoders)
    seconds["vocab"] = time.perf_counter() - t0
    log.info("vocabularies: %s", {t: e.vocab_size for t, e in encoders.items()})

    t0 = time.perf_counter()
    params = {"spec": spec.name, "max_history": spec.max_history, "executor": executor,
              "valid_start": valid_start, "test_start": test_start, "buckets": buckets}
    if previous is not None:
        params.update(vocab_from=str(previous.root), count_decay=count_decay)
        old_counts = previous.counts() if count_decay is not None else {}
    summary = {"impressions": 0, "behaviors": 0, "history": 0}
    with DatasetWriter(output, schema, source="logs", params=params,
                       overwrite=overwrite) as writer:
        kwargs = {"spec": spec, "schema": schema.to_dict(), "encoders": encoders,
                  "staging": staging, "out_root": str(writer.tmp), "valid_start": valid_start,
                  "test_start": test_start}
        for res in _run_stage("build", bucket_items, _build_task, kwargs, executor):
            for split, n in res["rows"].items():
                writer.rows[split] += n
            for t, (ids, c) in res["counts"].items():
                writer.counts[t][ids] += c
            for k in summary:
                summary[k] += res[k]
        for t, e in encoders.items():
            if e.index is not None:
                writer.add_vocab(t, ["<pad>", "<oov>"] + [str(v) for v in e.index])
        if previous is not None:
            for t in writer.counts:
                writer.counts[t] = vocab_extend.decayed_counts(writer.counts[t],
                                                               old_counts.get(t), count_decay)
        seconds["build"] = time.perf_counter() - t0
        report = LogReport(
            output=str(output), rows=dict(writer.rows),
            input_rows={"impressions": sum(f.rows for f in per_file.values()
                                           if f.log == IMPRESSIONS),
                        "behaviors": sum(f.rows for f in per_file.values()
                                         if f.log == BEHAVIORS)},
            malformed=sum(f.malformed for f in files),
            files=[{k: v for k, v in asdict(f).items() if k != "examples"}
                   | {"examples": f.describe_examples()} for f in files],
            valid_start=valid_start, test_start=test_start, buckets=buckets, units=len(units),
            vocab_sizes={t: e.vocab_size for t, e in encoders.items()}, seconds=seconds)
        writer.params.update(report=report.to_dict(), mean_history=summary["history"] / max(
            summary["impressions"], 1))
    log.info("wrote %s: %s rows in %.1fs", output, report.rows, sum(seconds.values()))
    return report
