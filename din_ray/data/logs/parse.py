"""Raw log rows -> clean typed rows: field decoding and row validation.

`parse_int`, `parse_float` and `parse_str` decode an Arrow column of any input type (CSV
strings, Parquet integers, floats with NaN for missing, timestamps) into values plus masks of
missing and malformed entries. `parse_impressions` and `parse_behaviors` validate a batch of
one log, join the side tables (`JoinTable`) onto impressions and keep the well-formed rows; a
malformed row is flagged once, at its first bad field, and the first few are kept as examples
naming the file, row or line, field and value. `check_malformed` applies the spec's limit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from din_ray.data.format import DataError
from din_ray.data.ids import bin_index, hash_strings
from din_ray.data.logs.files import IMPRESSIONS, FileStats
from din_ray.data.logs.spec import FeatureSpec, LogSpec

log = logging.getLogger(__name__)


def as_array(col) -> pa.Array:
    """A column as one Arrow array (the chunks of a ChunkedArray combined)."""
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _null_mask(arr: pa.Array, nulls: tuple[str, ...]) -> np.ndarray:
    missing = arr.is_null()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        missing = pc.or_(missing, pc.fill_null(pc.is_in(arr, pa.array(nulls, arr.type)), False))
    return missing.to_numpy(zero_copy_only=False)


def parse_int(arr: pa.Array, nulls: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integers from any column type. -> values int64 (N,), missing (N,) bool, bad (N,) bool
    (present but not an integer; values are 0 there)."""
    arr = as_array(arr)
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
    arr = as_array(arr)
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
    arr = as_array(arr)
    if pa.types.is_floating(arr.type):
        v = arr.to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            if np.all(np.isnan(v) | (v == np.round(v))):
                arr = arr.cast(pa.int64(), safe=False)
    missing = _null_mask(arr, nulls)
    s = pc.utf8_trim_whitespace(arr.cast(pa.string()))
    return pc.if_else(pa.array(missing), pa.nulls(len(s), pa.string()), s), missing


@dataclass
class JoinTable:
    """A side table indexed by key: `index.get_indexer(keys)` gives row positions; `columns`
    holds each joined feature's parsed raw values (Arrow, nulls where missing)."""

    name: str
    on: str
    key_type: str
    index: pd.Index
    columns: dict[str, pa.Array]


class RowChecks:
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
        values = as_array(raw).take(pa.array(idx)).to_pylist()
        for i, value in zip(idx, values, strict=True):
            self.examples.append((int(self.rownum[i]), field_name,
                                  "" if value is None else str(value), reason))


def raw_column(table: pa.Table, column: str) -> pa.Array:
    """Column `column` of a batch as read, as one Arrow array."""
    return as_array(table.column(column))


def feature_values(spec: LogSpec, f: FeatureSpec, arr: pa.Array, checks: RowChecks,
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


def _user_ids(spec: LogSpec, arr: pa.Array, column: str, checks: RowChecks) -> np.ndarray:
    if spec.user_type == "int":
        v, missing, bad = parse_int(arr, spec.null_values)
        checks.flag(bad, column, arr, "user id is not an integer")
    else:
        s, missing = parse_str(arr, spec.null_values)
        v = hash_strings(s.fill_null("").to_numpy(zero_copy_only=False)).view(np.int64)
    checks.flag(missing, column, arr, "missing user id")
    return v


def _timestamps(spec: LogSpec, arr: pa.Array, column: str, checks: RowChecks) -> np.ndarray:
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
    checks = RowChecks(table.num_rows, rownum, spec.malformed.show)
    user = _user_ids(spec, raw_column(table, imp.user), imp.user, checks)
    ts = _timestamps(spec, raw_column(table, imp.timestamp), imp.timestamp, checks)
    lab_raw = raw_column(table, imp.label.column)
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
            columns[f.name] = feature_values(spec, f, raw_column(table, f.column), checks, stats)
    for j in joins:
        raw = raw_column(table, j.on)
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
    checks = RowChecks(table.num_rows, rownum, spec.malformed.show)
    user = _user_ids(spec, raw_column(table, beh.user), beh.user, checks)
    ts = _timestamps(spec, raw_column(table, beh.timestamp), beh.timestamp, checks)
    keep = np.ones(table.num_rows, bool)
    if beh.type_column is not None:
        types, missing = parse_str(raw_column(table, beh.type_column), spec.null_values)
        checks.flag(missing, beh.type_column, raw_column(table, beh.type_column),
                    "missing behaviour type")
        if beh.keep_types is not None:
            keep = pc.fill_null(pc.is_in(types, pa.array(beh.keep_types)), False).to_numpy(
                zero_copy_only=False)
    columns = {"user": pa.array(user), "ts": pa.array(ts)}
    for f in spec.group("behavior"):
        columns[f.name] = feature_values(spec, f, raw_column(table, f.column), checks, stats)
    stats.malformed += int(checks.bad.sum())
    filtered = keep & ~checks.bad
    stats.filtered += int((~keep & ~checks.bad).sum())
    return pa.table(columns).filter(pa.array(filtered)), checks.examples


def check_malformed(spec: LogSpec, files: list[FileStats]) -> None:
    """Log each file's malformed rows; over the spec's limit (`malformed.max_count`,
    `max_fraction`), raise a DataError listing every file's count and first examples."""
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
