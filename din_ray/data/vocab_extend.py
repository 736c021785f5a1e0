"""Prepare a new period of data against the vocabularies of an earlier prepared dataset.

    din-ray prepare log --spec day2/log_spec.yaml --output out/day2 --vocab-from out/day1
    din-ray prepare movielens --input ml-new --output out/ml-2 --vocab-from out/ml-1

The rules (the same for every source, implemented once in `extend_ids`):
- a raw id known before keeps its dense id;
- a raw id new in this period (and kept by this period's min-count) is appended after the
  earlier ones, in this period's order (most frequent first for the log sources);
- a raw id absent now keeps its row: the vocabulary never shrinks, so a checkpoint of the earlier
  data can be continued on the new one (`din-ray train --init-from`);
- hashed and binned tables need no vocabulary: their id space is fixed by the schema, which must
  be the same;
- counts.npz (MBA's n_j) counts the new training period only; with `count_decay` d it is
  round(n_new + d * n_old) instead, a decayed running sum over the periods.

The log sources (log, taobao, synthetic logs) extend their encoders before encoding
(`extend_encoder_index`), so preparing with --vocab-from costs what a fresh preparation costs.
The in-memory sources (movielens, amazon, synthetic) are prepared fresh into a hidden temporary
directory and then rewritten onto the extended ids (`prepare_onto`); there a raw id that the new
period's own rules made OOV (e.g. a MovieLens item absent from the new training split) stays OOV.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from din_ray.data.format import DatasetWriter, PreparedDataset, refuse_existing, to_numpy
from din_ray.schema import NUM_RESERVED_IDS, Schema, SchemaError

log = logging.getLogger(__name__)


def extend_ids(previous: Sequence | pd.Index, current: Sequence | pd.Index
               ) -> tuple[pd.Index, np.ndarray]:
    """Append the raw ids of `current` that `previous` lacks.

    Args:
        previous: raw ids of dense ids NUM_RESERVED_IDS.. of the earlier vocabulary, in order.
        current: raw ids this period keeps, in this period's order (same type as `previous`).
    Returns:
        extended: previous, then the new ids in their `current` order.
        position: int64 (len(current),) index of each current id in `extended` (add
            NUM_RESERVED_IDS for its dense id).
    """
    previous, current = pd.Index(previous), pd.Index(current)
    if not previous.is_unique:
        raise SchemaError("the earlier vocabulary lists a raw id twice")
    known = previous.get_indexer(current)  # (len(current),) -1 where new
    new = current[known < 0]
    extended = previous.append(new) if len(new) else previous
    position = known.astype(np.int64)
    position[known < 0] = len(previous) + np.arange(len(new))
    return extended, position


def previous_raw_ids(dataset: PreparedDataset, table: str) -> list[str] | None:
    """Raw ids (strings) of dense ids 2.. of `table` in `dataset`, in dense-id order; None when
    the table has no vocabulary file (hashed, binned, or ids used as they are)."""
    path = dataset.root / "vocab" / f"{table}.parquet"
    if not path.exists():
        return None
    t = pq.read_table(path)
    ids = t.column("id").to_numpy()
    raw = np.asarray(t.column("raw").to_pylist(), dtype=object)
    order = np.argsort(ids, kind="stable")
    expected = np.arange(NUM_RESERVED_IDS, NUM_RESERVED_IDS + len(ids))
    if not np.array_equal(ids[order], expected):
        raise SchemaError(f"{path}: dense ids are not {NUM_RESERVED_IDS}..{len(ids) + 1} "
                          "without gaps; cannot extend it")
    return list(raw[order])


def schema_differences(previous: Schema, new: Schema) -> list[str]:
    """What differs between two schemas apart from vocabulary sizes (which may grow) and
    embedding widths (a training choice). Empty when `new` can continue `previous`."""
    diffs = []
    for attr in ("label", "user_column"):
        if getattr(previous, attr) != getattr(new, attr):
            diffs.append(f"{attr}: {getattr(previous, attr)!r} before, {getattr(new, attr)!r} now")
    old = {f.name: f for f in previous.features}
    cur = {f.name: f for f in new.features}
    if list(old) != list(cur):
        diffs.append(f"features: {list(old)} before, {list(cur)} now")
    for name in old.keys() & cur.keys():
        a, b = asdict(old[name]), asdict(cur[name])
        for key in ("group", "table", "max_len", "aligned_with"):
            if a[key] != b[key]:
                diffs.append(f"feature {name!r} {key}: {a[key]!r} before, {b[key]!r} now")
    for key in ("source", "hashed", "hash_types", "bins"):
        if previous.extra.get(key) != new.extra.get(key):
            diffs.append(f"schema extra {key!r}: {previous.extra.get(key)!r} before, "
                         f"{new.extra.get(key)!r} now")
    return diffs


def check_continues(previous: PreparedDataset, new: Schema, fixed_tables: Sequence[str] = ()
                    ) -> None:
    """Raise SchemaError naming every difference when `new` cannot extend `previous`.

    Args:
        fixed_tables: tables without a vocabulary (hashed, binned) whose size must not change.
    """
    diffs = schema_differences(previous.schema, new)
    old_tables = previous.schema.tables
    for table in fixed_tables:
        if table in old_tables and old_tables[table][0] != new.tables[table][0]:
            diffs.append(f"table {table!r} (no vocabulary) has {old_tables[table][0]} rows "
                         f"before, {new.tables[table][0]} now")
    if diffs:
        raise SchemaError(f"--vocab-from {previous.root}: its schema differs from this "
                          f"dataset's: " + "; ".join(diffs))


def decayed_counts(new: np.ndarray, old: np.ndarray | None, decay: float | None) -> np.ndarray:
    """n_j of the new period, or round(n_new + decay * n_old) with `decay` (old padded with zeros
    to the new length). -> int64 (len(new),)"""
    if decay is None or old is None:
        return new
    padded = np.zeros(len(new), np.float64)
    padded[:len(old)] = old
    return np.rint(new + decay * padded).astype(np.int64)


def check_decay(count_decay: float | None) -> None:
    if count_decay is not None and not 0 <= count_decay <= 1:
        raise ValueError(f"count_decay must be in [0, 1], got {count_decay}")


def open_previous(vocab_from: str | Path, source: str | None = None) -> PreparedDataset:
    """The earlier dataset, checked to come from `source` (the manifest's source name)."""
    previous = PreparedDataset.open(vocab_from)
    if source is not None and previous.manifest.get("source") != source:
        raise SchemaError(f"--vocab-from {previous.root}: prepared from source "
                          f"{previous.manifest.get('source')!r}, this is {source!r}")
    return previous


def prepare_onto(vocab_from: str | Path, output: str | Path,
                 prepare: Callable[[Path], object], *, source: str, overwrite: bool = False,
                 count_decay: float | None = None) -> Path:
    """Prepare with `prepare(tmp_dir)` (any source's fresh preparation), then write `output`
    with the vocabularies of `vocab_from` extended by the new ids and every id column remapped.

    Nothing is written at `output` unless everything succeeds (the fresh copy lives in a hidden
    sibling and is deleted either way).
    """
    check_decay(count_decay)
    output = Path(output)
    refuse_existing(output, overwrite)
    previous = open_previous(vocab_from, source)
    fresh_dir = output.with_name(f".{output.name}.fresh-{time.time_ns()}")
    try:
        prepare(fresh_dir)
        return remap_dataset(PreparedDataset.open(fresh_dir), previous, output,
                             overwrite=overwrite, count_decay=count_decay)
    finally:
        shutil.rmtree(fresh_dir, ignore_errors=True)


def remap_dataset(fresh: PreparedDataset, previous: PreparedDataset, output: Path, *,
                  overwrite: bool = False, count_decay: float | None = None) -> Path:
    """Write `fresh` at `output` with dense ids on `previous`'s vocabularies, extended."""
    schema = fresh.schema
    check_continues(previous, schema)
    old_tables = previous.schema.tables
    maps: dict[str, np.ndarray] = {}  # table -> (fresh rows,) fresh dense id -> new dense id
    sizes: dict[str, int] = {}
    vocabs: dict[str, list[str]] = {}
    for table, (rows, _) in schema.tables.items():
        old_raw, new_raw = previous_raw_ids(previous, table), previous_raw_ids(fresh, table)
        if (old_raw is None) != (new_raw is None):
            raise SchemaError(f"--vocab-from {previous.root}: table {table!r} has a vocabulary "
                              f"in {'this' if old_raw is None else 'the earlier'} dataset only")
        if old_raw is None:  # ids used as they are: keep the larger id space
            maps[table] = np.arange(rows, dtype=np.int64)
            sizes[table] = max(rows, old_tables[table][0])
            continue
        extended, position = extend_ids(old_raw, new_raw)
        m = np.arange(rows, dtype=np.int64)
        m[NUM_RESERVED_IDS:] = position + NUM_RESERVED_IDS
        maps[table], sizes[table] = m, NUM_RESERVED_IDS + len(extended)
        vocabs[table] = list(extended)
    new_schema = Schema.from_dict({**schema.to_dict(), "features": [
        {**asdict(f), "vocab_size": sizes[f.table]} for f in schema.features]})
    params = {**fresh.manifest.get("params", {}), "vocab_from": str(previous.root),
              "count_decay": count_decay}
    old_counts = previous.counts() if count_decay is not None else {}
    with DatasetWriter(output, new_schema, source=fresh.manifest.get("source", "unknown"),
                       params=params, overwrite=overwrite) as writer:
        for split in ("train", "valid", "test"):
            for path in fresh.files(split):
                pf = pq.ParquetFile(path)
                for g in range(pf.num_row_groups):
                    cols = to_numpy(fresh.schema, pf.read_row_group(g))
                    for f in schema.features:
                        cols[f.name] = maps[f.table][cols[f.name]].astype(np.int32)
                    writer.write(split, cols)
        for table, raw in vocabs.items():
            writer.add_vocab(table, ["<pad>", "<oov>"] + raw)
        for table in writer.counts:
            writer.counts[table] = decayed_counts(writer.counts[table], old_counts.get(table),
                                                  count_decay)
    log.info("%s: vocabularies extended from %s: %s", output, previous.root,
             {t: f"{old_tables[t][0]} -> {sizes[t]}" for t in sizes})
    return output


def extend_encoder_index(previous: PreparedDataset, table: str, current: pd.Index,
                         id_type: str) -> pd.Index:
    """The log sources' vocabulary of `table` on top of `previous`'s: the earlier raw ids
    (converted back to `id_type`, "int" or "str", from their stored strings) then the new ones."""
    old = previous_raw_ids(previous, table)
    if old is None:
        raise SchemaError(f"--vocab-from {previous.root}: table {table!r} has no vocabulary "
                          "there (hashed or binned before?)")
    old_index = pd.Index(np.array(old, dtype=np.int64) if id_type == "int" else old)
    extended, _ = extend_ids(old_index, current)
    return extended
