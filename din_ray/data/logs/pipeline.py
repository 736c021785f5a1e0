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

This module is the driver (`prepare_logs`); the parts live beside it in `din_ray.data.logs`:

    spec      the YAML spec: logs, side tables, features, split, limits
    files     input files, work units, streaming a unit with row/line numbers
    parse     field decoding and row validation (errors name file, row, field, value)
    joins     side tables, read and indexed by key once by the driver
    split     time cutoffs (TimeHistogram) and per-row split codes
    vocab     vocabularies, encoders and the prepared schema
    history   which behaviours come strictly before each impression, in one bucket
    stages    the parse, vocab and build tasks (Ray Data UDFs)
    executor  running a stage's tasks on Ray Data or in-process
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs

from din_ray import ray_session
from din_ray.data import vocab_extend
from din_ray.data.common import vocab_entries
from din_ray.data.format import DataError, DatasetWriter, PreparedDataset, refuse_existing
from din_ray.data.logs.executor import run_stage
from din_ray.data.logs.files import BEHAVIORS, IMPRESSIONS, FileStats, Unit, filesystem, plan_units
from din_ray.data.logs.joins import load_join
from din_ray.data.logs.parse import JoinTable, check_malformed
from din_ray.data.logs.spec import LogSpec, load_spec
from din_ray.data.logs.split import TimeHistogram, cutoffs
from din_ray.data.logs.stages import build_task, parse_task, vocab_task
from din_ray.data.logs.vocab import Encoder, build_encoders, log_schema, merge_counts, vocab_sources

log = logging.getLogger(__name__)


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
        session = (ray_session.session(address, num_cpus, dashboard=False) if executor == "ray"
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
    vocab_extend.check_decay(count_decay)
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
    for index, stats, h, written in run_stage("parse", items, parse_task, kwargs, executor):
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
        for _, out in run_stage("vocab", bucket_items, vocab_task, kwargs,
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
        for res in run_stage("build", bucket_items, build_task, kwargs, executor):
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
