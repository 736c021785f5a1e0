"""The three stages of the log pipeline, as the Ray Data UDFs that `prepare_logs` maps over work
items (one item per task; each task streams its files in and out itself and returns a small
pickled summary to the driver):

1. `parse_task` (one work unit): stream the unit's rows, validate them (`logs.parse`), join the
   side tables and append the clean rows to staging files partitioned by hash(user) into P
   buckets (`_BucketWriter`): a shuffle through the filesystem, like a MapReduce shuffle.
   Returns the file's statistics and a histogram of its impression times.
2. `vocab_task` (one bucket): raw-id counts over the training period (impressions and
   behaviours before the validation cutoff), merged by the driver into vocabularies.
3. `build_task` (one bucket): `build_bucket` sorts the bucket's impressions and behaviours by
   (user, time) (`logs.history`), gathers every impression's history, splits rows by impression
   time, shuffles the training rows and writes them straight into the output's temporary
   directory, with the bucket's training id counts.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from din_ray.data.common import gather_history
from din_ray.data.format import SPLITS, DataError, check_ids, count_ids, to_arrow
from din_ray.data.ids import mix64
from din_ray.data.logs.files import (
    BEHAVIORS,
    IMPRESSIONS,
    FileStats,
    Unit,
    filesystem,
    needed_columns,
    read_unit,
)
from din_ray.data.logs.history import History
from din_ray.data.logs.parse import JoinTable, parse_behaviors, parse_impressions
from din_ray.data.logs.spec import LogSpec
from din_ray.data.logs.split import TimeHistogram, split_codes
from din_ray.data.logs.vocab import Encoder, vocab_sources
from din_ray.schema import Schema

# Rows buffered per parse task before they are flushed to the bucket files.
FLUSH_ROWS = 262_144
# Impressions whose (N, max_history) history matrices are built at once in the build stage.
BUILD_CHUNK_ROWS = 65_536
# Output Parquet rows per file (a bucket writes several files when larger).
ROWS_PER_FILE = 500_000


# --- stage 1: parse -------------------------------------------------------------------------------
def bucket_of(users: np.ndarray, buckets: int) -> np.ndarray:
    """(N,) user ids -> (N,) int64 staging bucket in [0, buckets)."""
    return (mix64(users) % np.uint64(buckets)).astype(np.int64)


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
                fs, inner = filesystem(_bucket_dir(self.root, self.log, k))
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


def parse_task(batch: dict, *, spec: LogSpec, joins: list[JoinTable], staging: str,
               buckets: int) -> Iterator[dict]:
    """Ray Data UDF: parse one unit (a row of `batch`), stage its rows, return its stats."""
    for text in batch["unit"]:
        unit = Unit(**json.loads(str(text)))
        stats = FileStats(unit.path, unit.log)
        writer = _BucketWriter(staging, unit.log, unit.index, buckets)
        hist = TimeHistogram()
        part = spec.impressions if unit.log == IMPRESSIONS else spec.behaviors
        columns = needed_columns(spec, unit.log)
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


# --- stage 2: vocabularies ------------------------------------------------------------------------
def _read_bucket(staging: str, log_name: str, bucket: int,
                 columns: list[str] | None = None) -> pa.Table | None:
    fs, inner = filesystem(_bucket_dir(staging, log_name, bucket))
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return None
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(inner))
                   if f.path.endswith(".parquet"))
    if not files:
        return None
    return pa.concat_tables(pq.read_table(p, columns=columns, filesystem=fs) for p in files)


def vocab_task(batch: dict, *, spec: LogSpec, staging: str, valid_start: int) -> Iterator[dict]:
    """Ray Data UDF: raw-id counts of one bucket over the training period (ts < valid_start)."""
    sources = vocab_sources(spec)
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


# --- stage 3: build -------------------------------------------------------------------------------
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
                cols[f.name] = gather_history(beh_values[f.name], src, real)
            if split == "train":
                for t, c in count_ids(schema, cols).items():
                    counts[t] += c
            writer.write(cols)
        writer.close()
        rows[split] = writer.rows
    result["counts"] = {t: (np.flatnonzero(c), c[c > 0]) for t, c in counts.items()}
    result.update(impressions=len(ts), behaviors=len(beh_user), history=int(hist.length.sum()))
    return result


def build_task(batch: dict, *, spec: LogSpec, schema: dict, encoders: dict[str, Encoder],
               staging: str, out_root: str, valid_start: int, test_start: int
               ) -> Iterator[dict]:
    """Ray Data UDF: build one bucket (a row of `batch`)."""
    sch = Schema.from_dict(schema)
    for b in batch["bucket"]:
        res = build_bucket(spec, sch, encoders, staging, out_root, int(b), valid_start,
                           test_start)
        yield {"summary": np.array([pickle.dumps(res)], dtype=object)}
