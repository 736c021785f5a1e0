"""Raw ids -> dense ids, in one place for data preparation and serving.

A table prepared with `hash_buckets` stores `hash(raw) % buckets + NUM_RESERVED_IDS`, a binned
numeric feature the index of its bin, any other table the id its vocabulary
(`<root>/vocab/<table>.parquet`, columns raw and id) gave the raw id; serving must compute the
very same mapping on a request's raw values, so both use it from here: the functions
(`hashed_ids`, `bin_index`) and one encoder per table (`load_encoders`: `Vocabulary`,
`HashedIds`, `BinnedIds`, and `FilteredIds` for a model trained with the frequency filter).

Encoders take one raw value at a time and raise `RawIdError` for a value they cannot map; the
caller names the field (serving turns it into a 422 naming `candidates[3].item_id`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from din_ray.data.format import DataError
from din_ray.schema import NUM_RESERVED_IDS, OOV_ID, Schema


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread, deterministic uint64 hash of int64 ids."""
    with np.errstate(over="ignore"):
        z = x.astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_strings(values: np.ndarray) -> np.ndarray:
    """Deterministic uint64 hash of strings (pandas' fixed-key SipHash)."""
    return pd.util.hash_array(np.asarray(values, dtype=object), categorize=False)


def hashed_ids(values: np.ndarray, buckets: int, id_type: str) -> np.ndarray:
    """(N,) raw ids (int64 when `id_type` is "int", else strings) -> (N,) int64 dense ids in
    [NUM_RESERVED_IDS, NUM_RESERVED_IDS + buckets)."""
    h = mix64(values) if id_type == "int" else hash_strings(values)
    return (h % np.uint64(buckets)).astype(np.int64) + NUM_RESERVED_IDS


def bin_index(values: np.ndarray, edges) -> np.ndarray:
    """(N,) numbers -> (N,) int64 bin index: i where edges[i-1] <= x < edges[i] (0 below the
    first edge, len(edges) from the last one on). The dense id is index + NUM_RESERVED_IDS."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values,
                           side="right").astype(np.int64)


# --- one encoder per table ----------------------------------------------------------------------
class RawIdError(ValueError):
    """A raw id an encoder cannot map (wrong JSON type, not a number, ...): the message says
    why; the caller knows which field it came from."""


class Vocabulary:
    """Raw id -> dense id for one embedding table.

    Raw ids are strings or integers, compared as strings (296 and "296" are the same movie);
    ids missing from the vocabulary map to OOV_ID.

    Args:
        table: table name; num_rows: its rows (reserved ids included).
        mapping: raw id string -> dense id, or None when the table's ids are already dense
            (then integers in [NUM_RESERVED_IDS, num_rows) pass through, others map to OOV_ID).
    """

    def __init__(self, table: str, num_rows: int, mapping: dict[str, int] | None) -> None:
        self.table, self.num_rows, self.mapping = table, num_rows, mapping

    @classmethod
    def load(cls, path: Path, table: str, num_rows: int) -> Vocabulary:
        t = pq.read_table(path, columns=["raw", "id"])
        ids = np.asarray(t.column("id").to_numpy(), dtype=np.int64)
        if ids.size and (ids.min() < NUM_RESERVED_IDS or ids.max() >= num_rows):
            raise DataError(f"{path}: dense ids must lie in [{NUM_RESERVED_IDS}, "
                            f"{num_rows}), got [{ids.min()}, {ids.max()}]")
        return cls(table, num_rows, dict(zip(t.column("raw").to_pylist(), ids.tolist())))

    def encode(self, value: object) -> int:
        check_raw_id(value)
        if self.mapping is not None:
            return self.mapping.get(str(value), OOV_ID)
        if not isinstance(value, int):
            raise RawIdError(f"table {self.table!r} has no vocabulary: send its dense integer "
                             f"id, got {short_json(value)}")
        return value if NUM_RESERVED_IDS <= value < self.num_rows else OOV_ID

    def describe(self) -> dict:
        return {"num_rows": self.num_rows,
                "raw_ids": len(self.mapping) if self.mapping is not None else None}


class HashedIds(Vocabulary):
    """Raw id -> `hashed_ids` of it, the function preparation used for a table prepared with
    `hash_buckets` (int ids hashed as int64, others as strings)."""

    def __init__(self, table: str, num_rows: int, buckets: int, id_type: str) -> None:
        super().__init__(table, num_rows, None)
        self.buckets, self.id_type = buckets, id_type

    def encode(self, value: object) -> int:
        check_raw_id(value)
        if self.id_type == "int":
            try:
                raw = np.array([int(value)], dtype=np.int64)
            except (ValueError, OverflowError):
                raise RawIdError(f"table {self.table!r} hashes integer ids, got "
                                 f"{short_json(value)}") from None
        else:
            raw = np.array([str(value)], dtype=object)
        return int(hashed_ids(raw, self.buckets, self.id_type)[0])

    def describe(self) -> dict:
        return {"num_rows": self.num_rows, "raw_ids": None, "hash_buckets": self.buckets}


class BinnedIds(Vocabulary):
    """A raw number -> the id of its bin: bin i (edges[i-1] <= x < edges[i]) is id
    i + NUM_RESERVED_IDS, as preparation bucketized the feature (`bin_index`)."""

    def __init__(self, table: str, num_rows: int, edges: Sequence[float]) -> None:
        super().__init__(table, num_rows, None)
        self.edges = np.asarray(edges, dtype=np.float64)

    def encode(self, value: object) -> int:
        try:
            x = float(value) if not isinstance(value, bool) else float("nan")
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond 1e308
            x = float("nan")
        if not np.isfinite(x):
            raise RawIdError(f"table {self.table!r} bins numbers, got {short_json(value)}")
        return int(bin_index(np.array([x]), self.edges)[0]) + NUM_RESERVED_IDS

    def describe(self) -> dict:
        return {"num_rows": self.num_rows, "raw_ids": None, "bins": self.edges.tolist()}


class FilteredIds(Vocabulary):
    """Another encoder's ids through the frequency filter the model was trained with
    (`reg="filter"`: ids outside the kept ones became OOV in training and evaluation).

    Args:
        remap: (num_rows,) int64, dense id -> the id the model saw.
    """

    def __init__(self, inner: Vocabulary, remap: np.ndarray) -> None:
        super().__init__(inner.table, inner.num_rows, inner.mapping)
        self.inner, self.remap = inner, remap

    def encode(self, value: object) -> int:
        return int(self.remap[self.inner.encode(value)])

    def describe(self) -> dict:
        kept = int((self.remap >= NUM_RESERVED_IDS).sum())
        return {**self.inner.describe(), "filter_kept_ids": kept}


def load_encoders(root: Path, schema: Schema,
                  remaps: Mapping[str, np.ndarray] | None = None) -> dict[str, Vocabulary]:
    """One raw-id encoder per schema table of a prepared dataset or checkpoint at `root`:
    ROOT/vocab/<table>.parquet where present, else the hashing or binning recorded in the
    schema (`extra.hashed` with `extra.hash_types`, `extra.bins`), else dense ids; then
    `remaps` (table -> (num_rows,) int64 id-filter remapping) on top.

    Raises:
        DataError: a vocabulary out of the table's range, a hashed table of unknown id type,
            or a remapping that does not fit the schema's tables.
    """
    hashed = schema.extra.get("hashed", {})
    hash_types = schema.extra.get("hash_types", {})
    bins = schema.extra.get("bins", {})
    out: dict[str, Vocabulary] = {}
    for table, (rows, _) in schema.tables.items():
        file = root / "vocab" / f"{table}.parquet"
        if file.exists():
            out[table] = Vocabulary.load(file, table, rows)
        elif table in hashed:
            if table not in hash_types:
                raise DataError(f"{root}: table {table!r} is hashed but its schema does not say "
                                "whether as integers or strings (data prepared by an older "
                                "din-ray); prepare the data again")
            out[table] = HashedIds(table, rows, int(hashed[table]), hash_types[table])
        elif table in bins:
            out[table] = BinnedIds(table, rows, bins[table])
        else:
            out[table] = Vocabulary(table, rows, None)
    for table, remap in (remaps or {}).items():
        remap = np.asarray(remap, dtype=np.int64)
        if table not in out or len(remap) != out[table].num_rows:
            raise DataError(f"{root}: the id-filter remapping of {table!r} does not match the "
                            "schema's tables")
        out[table] = FilteredIds(out[table], remap)
    return out


def check_raw_id(value: object) -> None:
    """Raw ids are JSON strings (valid Unicode: no lone surrogates) or integers."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RawIdError(f"expected a string or integer id, got {json_type(value)} "
                         f"{short_json(value)}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RawIdError(f"not valid Unicode (a lone surrogate escape): "
                             f"{short_json(value)}") from None


def short_json(value: object, limit: int = 40) -> str:
    """`value` as JSON (repr for non-JSON types), cut to `limit` characters, for messages."""
    text = json.dumps(value) if isinstance(value, (str, int, float, list, dict)) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def json_type(value: object) -> str:
    """The JSON type name of a decoded value ("object", "array", ...), for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
