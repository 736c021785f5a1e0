"""Small prepared splits held whole in memory, and each worker's deterministic share of them.

A distributed run reads every split below `TrainConfig.execution.cache_below_mb` once, in the
driver, with `read_columns`, and hands the arrays to its workers through Ray's object store
(zero-copy reads there); a Tune search does so once for all its trials. Each worker then takes
its rows by index:

  * training (`train_rows`): one permutation of the whole split per epoch, the same on every
    worker; worker r takes every world-th row of it from position r, cut to n // world rows, so
    each row is seen at most once per epoch, every worker runs the same number of steps (DDP and
    the embedding all-to-alls need that), and at most world - 1 rows are left out. Step s of all
    workers together covers positions [s·B·world, (s+1)·B·world) of the permutation: the global
    batches of one worker at batch B·world.
  * evaluation (`eval_rows`): contiguous blocks, sizes differing by at most one; no row dropped.

No Ray here: the module is numpy only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq

from din_ray.data.format import DataError, PreparedDataset, to_numpy
from din_ray.schema import Schema


def split_mb(dataset: PreparedDataset, split: str) -> float:
    """The split's Parquet files in MB: what `TrainConfig.execution.cache_below_mb` is compared
    with, by `--local` and Ray runs alike, to hold a split in memory or stream it."""
    return sum(f.stat().st_size for f in dataset.files(split)) / 2**20


def read_columns(dataset: PreparedDataset, split: str) -> dict[str, np.ndarray]:
    """A whole split as numpy columns in their stored types (int8 label, int64 user, int32
    ids; behaviour columns (N, L)), half the size of the int64 training batches."""
    files = dataset.files(split)
    if not files:
        raise DataError(f"{dataset.root / split}: no Parquet files")
    table = pq.read_table(files)
    out = {dataset.schema.label: table.column(dataset.schema.label).to_numpy(),
           dataset.schema.user_column: table.column(dataset.schema.user_column).to_numpy()}
    for f in dataset.schema.features:
        col = table.column(f.name).combine_chunks()
        values = col.flatten().to_numpy() if f.is_sequence else col.to_numpy()
        out[f.name] = values.reshape(len(table), f.max_len) if f.is_sequence else values
    return out


def epoch_seed(run_seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s training order in a run seeded `run_seed`: the same for
    `--local` and every Ray worker, so both take one order of the split."""
    return run_seed * 10_007 + epoch


def epoch_permutation(num_rows: int, seed: int) -> np.ndarray:
    """The order of the training rows in one epoch; `seed` is the run's per-epoch seed, the
    same on every worker (each worker's share is a slice of this one order). -> (num_rows,)"""
    return np.random.default_rng(seed).permutation(num_rows)


def train_rows(num_rows: int, rank: int, world_size: int, seed: int,
               shuffle: bool = True) -> np.ndarray:
    """The training rows of worker `rank` for the epoch seeded by `seed`, in order; without
    `shuffle` the split's own row order (TrainConfig.optim.shuffle off: the global batches of a
    local run). -> (num_rows // world_size,) int64"""
    order = epoch_permutation(num_rows, seed) if shuffle else np.arange(num_rows)
    return order[rank::world_size][:num_rows // world_size]


def eval_rows(num_rows: int, rank: int, world_size: int) -> np.ndarray:
    """The evaluation rows of worker `rank`: its contiguous block. -> (about n / world,)"""
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return np.arange(start, start + base + (1 if rank < extra else 0))


def iter_batches(schema: Schema, columns: dict[str, np.ndarray], rows: np.ndarray,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `rows` of `columns` (from `read_columns`) in the training loop's types (see
    `din_ray.data.format.to_numpy`); the last one may be short."""
    for start in range(0, len(rows), batch_size):
        index = rows[start:start + batch_size]
        yield to_numpy(schema, {k: v[index] for k, v in columns.items()})
