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
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from din_ray.data import vocab_extend
from din_ray.data.common import gather_history, vocab_entries
from din_ray.data.format import (
    SPLITS,
    DataError,
    DatasetWriter,
    PreparedDataset,
    check_ids,
    count_ids,
    refuse_existing,
    to_arrow,
)
from din_ray.data.ids import mix64
from din_ray.data.logs.files import (
    BEHAVIORS,
    IMPRESSIONS,
    FileStats,
    Unit,
    filesystem,
    needed_columns,
    plan_units,
    read_unit,
)
from din_ray.data.logs.history import History
from din_ray.data.logs.joins import load_join
from din_ray.data.logs.parse import JoinTable, check_malformed, parse_behaviors, parse_impressions
from din_ray.data.logs.spec import LogSpec, load_spec
from din_ray.data.logs.split import TimeHistogram, cutoffs, split_codes
from din_ray.data.logs.vocab import Encoder, build_encoders, log_schema, merge_counts, vocab_sources
from din_ray.schema import Schema

log = logging.getLogger(__name__)

# Rows buffered per parse task before they are flushed to the bucket files.
FLUSH_ROWS = 262_144
# Impressions whose (N, max_history) history matrices are built at once in the build stage.
BUILD_CHUNK_ROWS = 65_536
# Output Parquet rows per file (a bucket writes several files when larger).
ROWS_PER_FILE = 500_000


# --- hashing ------------------------------------------------------------------------------------
def bucket_of(users: np.ndarray, buckets: int) -> np.ndarray:
    return (mix64(users) % np.uint64(buckets)).astype(np.int64)


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


def _parse_task(batch: dict, *, spec: LogSpec, joins: list[JoinTable], staging: str,
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


# --- stage 2: vocabularies ----------------------------------------------------------------------
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


def _vocab_task(batch: dict, *, spec: LogSpec, staging: str, valid_start: int) -> Iterator[dict]:
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


# --- stage 3: build -----------------------------------------------------------------------------


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


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Use the running Ray, else join `address` (or start a local one) and shut it down after."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address or None, num_cpus=num_cpus if not address else None)
    try:
        yield
    finally:
        ray.shutdown()


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
    refuse_existing(output, overwrite)
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
        session = (ray_session(address, num_cpus) if executor == "ray"
                   else contextlib.nullcontext())
        with session:
            return _prepare(spec, output, overwrite, staging, joins, join_stats, units, buckets,
                            seconds, executor, previous, count_decay)
    finally:
        fs, inner = filesystem(staging)
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
    check_malformed(spec, files)
    if staged[IMPRESSIONS] == 0:
        raise DataError(f"no valid impression rows in {list(spec.impressions.source.paths)}")
    valid_start, test_start = cutoffs(spec, hist)
    seconds["parse"] = time.perf_counter() - t0
    log.info("parsed: %d impressions, %d behaviours staged; valid from ts %d, test from ts %d",
             staged[IMPRESSIONS], staged[BEHAVIORS], valid_start, test_start)

    t0 = time.perf_counter()
    sources = vocab_sources(spec)
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
                    partial[table] = [merge_counts(partial[table])]
        merged = {t: merge_counts(p) for t, p in partial.items() if p}
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
                writer.add_vocab(t, vocab_entries(e.index))
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
