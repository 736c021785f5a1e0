"""Distributed training on Ray Train (V2): Ray Data shards, DDP dense layers, row-wise sharded
embedding tables, sharded checkpoints in Ray's storage, restarts from the latest checkpoint.

`run_ray(cfg)` is the driver: it validates the configuration and the data up front (before any
worker starts), reads the prepared Parquet splits with Ray Data, runs `train.train_loop` in
`cfg.execution.workers` Ray Train workers through `RayEnv`, and writes the same
OUTPUT/{metrics.json,
checkpoint} as `train.run_local`.

    din-ray train --data runs/ml --model din --workers 2 --output runs/din-2w

Per worker (`RayEnv`):
  * data: a split below `cfg.execution.cache_below_mb` is read once by the driver
    (`put_small_splits`)
    and reaches the workers as numpy arrays in Ray's object store; each worker takes its rows by
    index (`din_ray.data.in_memory`), so no Ray Data job runs for it. A larger train split
    streams through `get_dataset_shard("train").iter_batches(batch_format="pyarrow")`; a larger
    valid/test split is read by each worker straight from its Parquet files, every world-th row
    group (`iter_numpy_batches(part=...)`): a Ray Data dataset per evaluation split cost a split
    coordinator and a streaming execution per split and epoch, ~20 s an epoch for two tiny splits
    on 2 cores, for a pass that needs no shuffle and no balancing. Either way the
    train split is divided into equal row counts (so every worker runs the same number of steps,
    which DDP and the embedding all-to-alls need; with `shuffle=False` step t of all workers
    together trains on the rows one process reading the split in order takes at step t);
    valid/test are split without dropping a row
    and evaluated in lockstep (an exhausted worker feeds empty batches until every worker is
    done), so the metrics over the gathered predictions are exactly the single-process values;
  * dense layers: `ray.train.torch.prepare_model` (DDP);
  * embeddings: `din_ray.embeddings.sharding.ShardedEmbeddingTables` on a process group of
    their own;
  * checkpoints: every worker writes its row blocks, rank 0 the dense state and the manifest
    (last), into one local directory per worker; `ray.train.report(..., checkpoint=...)` uploads
    and merges them into one checkpoint `epoch-NNNN` under `storage_path/run_name`.

Recovery: `FailureConfig(max_failures)` restarts the worker group after a worker dies, and the
loop resumes from `ray.train.get_checkpoint()` (the latest complete epoch), so no epoch is lost or
counted twice. Rerunning the same command after the driver died resumes too: Train V2 finds the
run's checkpoint-manager snapshot under the same `storage_path` and `run_name`.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data import FileShuffleConfig
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from din_ray import checkpoint as ckpt
from din_ray.config import TrainConfig
from din_ray.data import in_memory
from din_ray.data.format import SPLITS, DataError, PreparedDataset, iter_numpy_batches, to_numpy
from din_ray.embeddings.sharding import ShardedEmbeddingTables, embedding_group, plan_tables
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import CTRModel, build_model
from din_ray.ray_session import connect
from din_ray.train.env import WorkerEnv
from din_ray.train.faults import FaultInjector, plans_from_env
from din_ray.train.loop import train_loop
from din_ray.train.outputs import check_output_is_this_run, finalize_output, ray_storage
from din_ray.train.selection import summarize

log = logging.getLogger(__name__)



# --- the worker side ----------------------------------------------------------------------------
class RayEnv(WorkerEnv):
    """A Ray Train worker's batches, tables, collectives and checkpoints."""

    def __init__(self, cfg: TrainConfig, dataset: PreparedDataset,
                 columns: dict[str, dict[str, np.ndarray]] | None = None,
                 faults: list[dict] | None = None) -> None:
        """`columns`: the splits delivered whole (split -> `in_memory.read_columns` arrays);
        the others come from this worker's Ray Data shard (train) or its part of the split's
        row groups (valid, test). `faults`: the tests' planned worker exits
        (din_ray.train.faults; none outside the tests)."""
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.cfg, self.dataset, self.columns = cfg, dataset, columns or {}
        self.schema = dataset.schema
        self.faults = FaultInjector(faults or [], self.rank)
        self.device = ray.train.torch.get_device() if cfg.execution.use_gpu else torch.device("cpu")
        # Host-side control traffic (the lockstep flags, gathered predictions) on gloo, so it
        # never waits for the GPU stream; on CPU workers the default group is gloo already.
        self.control = (dist.new_group(backend="gloo") if dist.get_backend() == "nccl"
                        else None)
        self.epoch = 0  # 0-based epoch of the latest train_batches (for fault injection)

    # data
    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        self.epoch = epoch
        seed = in_memory.epoch_seed(self.cfg.optim.seed, epoch)
        if "train" in self.columns:
            columns = self.columns["train"]
            rows = in_memory.train_rows(len(columns[self.schema.label]), self.rank,
                                        self.world_size, seed=seed,
                                        shuffle=self.cfg.optim.shuffle)
            numpy = in_memory.iter_batches(self.schema, columns, rows, self.cfg.optim.batch_size)
            return self._lockstep(self.faults.around(numpy, epoch), pad=False)
        shard = ray.train.get_dataset_shard("train")
        if self.cfg.optim.shuffle:
            batches = shard.iter_batches(
                batch_size=self.cfg.optim.batch_size, batch_format="pyarrow",
                local_shuffle_buffer_size=8 * self.cfg.optim.batch_size,
                local_shuffle_seed=seed * 1_009 + self.rank)
        else:
            batches = self._share_of_global_batches(shard)
        numpy = (to_numpy(self.schema, b) for b in batches)
        return self._lockstep(self.faults.around(numpy, epoch), pad=False)

    def _share_of_global_batches(self, shard) -> Iterator[pa.Table]:
        """Unshuffled training: every worker reads the whole split in file order (see
        EvalSplitConfig) in global batches of batch_size * workers rows and trains on its
        contiguous share of each (a last short batch cut to a multiple of the worker count), so
        step t trains on the rows one process reading the files in order takes at step t."""
        for batch in shard.iter_batches(batch_size=self.cfg.optim.batch_size * self.world_size,
                                        batch_format="pyarrow"):
            share = batch.num_rows // self.world_size
            if share:
                yield batch.slice(self.rank * share, share)

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        if split in self.columns:
            columns = self.columns[split]
            rows = in_memory.eval_rows(len(columns[self.schema.label]), self.rank,
                                       self.world_size)
            numpy = in_memory.iter_batches(self.schema, columns, rows,
                                           self.cfg.optim.eval_batch_size)
            return self._lockstep(self.faults.around(numpy, self.epoch, "eval"), pad=True)
        numpy = iter_numpy_batches(self.dataset.files(split), self.schema,
                                   self.cfg.optim.eval_batch_size,
                                   part=(self.rank, self.world_size))
        return self._lockstep(self.faults.around(numpy, self.epoch, "eval"), pad=True)

    def _lockstep(self, batches: Iterator[dict[str, np.ndarray]], pad: bool
                  ) -> Iterator[dict[str, np.ndarray]]:
        """Yield batches in step with the other workers (every embedding lookup is collective).

        pad=False (training): stop as soon as any worker runs out. The train split is divided
        into equal row counts, so this drops nothing; it only guards against a hang.
        pad=True (evaluation): go on until every worker is done, feeding empty batches to those
        already done, so every row is predicted."""
        op = dist.ReduceOp.MAX if pad else dist.ReduceOp.MIN
        it = iter(batches)
        while True:
            batch = next(it, None)
            more = torch.tensor([0 if batch is None else 1])
            dist.all_reduce(more, op=op, group=self.control)
            if not int(more):
                return
            yield batch if batch is not None else self._empty_batch()

    def _empty_batch(self) -> dict[str, np.ndarray]:
        cols = {self.schema.label: np.zeros(0, np.float32),
                self.schema.user_column: np.zeros(0, np.int64)}
        for f in self.schema.features:
            cols[f.name] = np.zeros((0, f.max_len) if f.is_sequence else 0, np.int64)
        return cols

    # model placement
    def make_tables(self, model: CTRModel, cfg: TrainConfig) -> EmbeddingTables:
        tables = ShardedEmbeddingTables(model.table_specs(), self.rank, self.world_size,
                                        seed=cfg.optim.seed, init_std=cfg.optim.init_std,
                                        replicate_below=cfg.execution.replicate_below,
                                        group=embedding_group()).to(self.device)
        log.info("rank %d/%d holds %.1f MB of embeddings (%s)", self.rank, self.world_size,
                 tables.memory_bytes() / 1e6, tables.plan)
        return tables

    def wrap_dense(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=self.cfg.execution.use_gpu)

    # collectives
    def gather(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, arrays, group=self.control)
        return {k: np.concatenate([p[k] for p in parts]) for k in arrays}

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to(self.device).clone()
        dist.all_reduce(out)
        return out.to(tensor.device)

    # checkpoints
    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if isinstance(checkpoint.filesystem, pa.fs.LocalFileSystem):
            return Path(checkpoint.path)
        return Path(checkpoint.to_directory())  # remote storage: download

    def report(self, metrics: dict, write_checkpoint: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="din-ray-ckpt-") as tmp:
            write_checkpoint(Path(tmp))
            self.faults.check("checkpoint", metrics["epoch"], 0)
            # Every worker reports its own files under the same name; Ray merges them.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch-{metrics['epoch']:04d}")


def _train_worker(config: dict) -> None:
    """train_loop_per_worker: rebuild the config, fetch the splits delivered whole (zero-copy
    from the object store) and run the shared training loop.

    config: {"train": TrainConfig.to_dict(), "in_memory": split -> ObjectRef of its columns,
    "faults": the tests' planned worker exits (din_ray.train.faults)}"""
    cfg = TrainConfig.from_dict(config["train"])
    torch.set_num_threads(cfg.execution.threads or max(1, int(cfg.execution.cpus_per_worker)))
    columns = {split: ray.get(ref) for split, ref in config["in_memory"].items()}
    env = RayEnv(cfg, PreparedDataset.open(cfg.data), columns, config.get("faults"))
    train_loop(cfg, env)


class TrainSplitConfig(DataConfig):
    """The streamed train split into equal row counts (DDP and the all-to-alls need equal step
    counts; at most workers - 1 rows per epoch are dropped). (Valid and test never reach Ray
    Data: each worker reads its part of their row groups, `RayEnv.eval_batches`.)

    The train split's blocks keep their (seeded, see `_read_split`) order through the split.
    `ordered=True` (cfg.optim.shuffle off) hands every worker the whole train split in file order
    instead; `RayEnv` then takes each worker's share of every global batch. Ray Data's split
    deals blocks to workers by its own rule (it promises no order), so only this makes a
    step's global batch the rows of a known range, as one process reading in order sees them.
    """

    def __init__(self, ordered: bool = False) -> None:
        options = {"train": self.default_ingest_options()}
        options["train"].preserve_order = True
        super().__init__(datasets_to_split=[] if ordered else "all", execution_options=options)


# --- the driver ---------------------------------------------------------------------------------
def check_config(cfg: TrainConfig) -> PreparedDataset:
    """Everything that can be checked before a worker starts; raises ValueError (or DataError /
    SchemaError, both ValueErrors) naming the directory, file, table or field at fault."""
    dataset = PreparedDataset.open(cfg.data, verify=True)  # once, here on the driver
    for split in SPLITS:
        files = dataset.files(split)
        if not files:
            raise DataError(f"{dataset.root / split}: no Parquet files")
        for path in files:
            dataset.check_file(path)
    if dataset.num_rows("train") < cfg.execution.workers:
        raise ValueError(f"{cfg.data}: {dataset.num_rows('train')} training rows cannot feed "
                         f"{cfg.execution.workers} workers")
    model = build_model(cfg.training_schema(dataset.schema), cfg.model)
    plan_tables(model.table_specs(), cfg.execution.workers, cfg.execution.replicate_below)
    return dataset


def storage_path(cfg: TrainConfig) -> str:
    """Ray Train storage for the run (`din_ray.train.outputs.ray_storage`)."""
    return ray_storage(cfg.execution.storage_path, cfg.output)


def _connect(cfg: TrainConfig) -> bool:
    """Join the running Ray (this process's, `cfg.execution.address` or $RAY_ADDRESS), else start a
    local one. Returns whether this call connected (and so should disconnect)."""
    # Logical CPUs beyond the workers' so Ray Data always has some to read with (2 workers at
    # 1 CPU on a 2-core machine would otherwise leave it none and the run would hang).
    run = cfg.execution
    return connect(run.address, max(4, math.ceil(run.workers * run.cpus_per_worker) + 2),
                   dashboard=False)


def build_trainer(cfg: TrainConfig, dataset: PreparedDataset, callbacks: list | None = None,
                  in_memory_splits: dict[str, ray.ObjectRef] | None = None) -> TorchTrainer:
    """The TorchTrainer of one run; `callbacks` go into its RunConfig (din_ray.tune.run passes
    `TuneReportCallback()` so Tune sees every epoch's report). `in_memory_splits` (from
    `put_small_splits`; a Tune search passes the one it made for all its trials) are the splits
    delivered whole; None reads them here. A train split not among them streams through Ray
    Data; valid/test not among them are read by the workers themselves (`RayEnv.eval_batches`)."""
    if in_memory_splits is None:
        in_memory_splits = put_small_splits(dataset, cfg)
    datasets = {} if "train" in in_memory_splits else {"train": _read_split(dataset, cfg)}
    return _trainer(cfg, datasets, in_memory_splits, callbacks)


def put_small_splits(dataset: PreparedDataset, cfg: TrainConfig) -> dict[str, ray.ObjectRef]:
    """Read each split whose Parquet files total less than `cfg.execution.cache_below_mb` here,
    once, and
    put its columns into Ray's object store. -> split -> ObjectRef of `in_memory.read_columns`

    A Ray Data pass costs seconds before its first batch (a read, or a `materialize()` of 20-25
    s per split on a loaded 2-core machine, then a new streaming execution per epoch); a split of
    a few MB reads here in a fraction of a second, and the workers slice it in place."""
    refs = {}
    for split in SPLITS:
        size_mb = in_memory.split_mb(dataset, split)
        if size_mb < cfg.execution.cache_below_mb:
            refs[split] = ray.put(in_memory.read_columns(dataset, split))
            log.info("%s split: %.1f MB of Parquet, read once and shared through the object "
                     "store", split, size_mb)
    return refs


def _read_split(dataset: PreparedDataset, cfg: TrainConfig) -> ray.data.Dataset:
    """A large train split as a Ray Dataset, streamed from its Parquet files on every pass.

    The file order is set by the run's seed and the epoch: every epoch is one
    execution of the split, and Ray Data reseeds a seeded file shuffle with the execution's
    index, so each epoch reads the files in another order, the same in every run with this
    seed. Blocks keep that order through the read and the split between workers
    (`preserve_order`, also given to Ray Train by `_trainer`), not the order in which read tasks
    happen to finish; rows are then shuffled inside each worker's buffer (`RayEnv.train_batches`,
    seeded by seed, epoch and rank). (Small splits never come here: `put_small_splits`.)"""
    shuffle = FileShuffleConfig(seed=cfg.optim.seed) if cfg.optim.shuffle else None
    ds = ray.data.read_parquet([str(f) for f in dataset.files("train")], shuffle=shuffle)
    ds.context.execution_options.preserve_order = True
    # The dataset carries its own copy of the DataContext into the split coordinator: no
    # progress bars there (one per epoch would bury the training log), and the caller's
    # context is left alone.
    ds.context.enable_progress_bars = False
    return ds


def _trainer(cfg: TrainConfig, datasets: dict, in_memory_splits: dict[str, ray.ObjectRef],
             callbacks: list | None) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker=_train_worker,
        # The refs travel inside the config; the driver holds them (and so the arrays) for the
        # trainer's lifetime.
        train_loop_config={"train": cfg.to_dict(), "in_memory": in_memory_splits,
                           "faults": plans_from_env()},
        scaling_config=ScalingConfig(num_workers=cfg.execution.workers,
                                     use_gpu=cfg.execution.use_gpu,
                                     resources_per_worker={"CPU": cfg.execution.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.execution.run_name, storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.execution.max_failures),
            # The best and the latest checkpoints are always kept. Scored by `new_best`, not
            # valid_gauc: Ray breaks ties towards the later epoch, `summarize` towards the
            # earlier, and the latest epoch with new_best = 1 is exactly summarize's best.
            checkpoint_config=CheckpointConfig(num_to_keep=2,
                                               checkpoint_score_attribute="new_best",
                                               checkpoint_score_order="max"),
            callbacks=callbacks),
        datasets=datasets or None,
        dataset_config=TrainSplitConfig(ordered=not cfg.optim.shuffle),
    )


def check_gpus(cfg: TrainConfig) -> None:
    """With use_gpu, fail before any worker is scheduled when the cluster has no GPU at all
    (Ray would otherwise wait forever for a GPU worker slot)."""
    if cfg.execution.use_gpu and ray.cluster_resources().get("GPU", 0) == 0:
        raise ValueError(f"use_gpu=True but no GPU visible to Ray (cluster resources: "
                         f"{ray.cluster_resources()}); train without --use-gpu or join a "
                         "cluster with GPU workers (--address)")


def run_ray(cfg: TrainConfig) -> dict:
    """Train with `cfg.execution.workers` Ray Train workers; write OUTPUT/{metrics.json,checkpoint}.

    Returns the same summary as `train.run_local` (test metrics of the best validation epoch and
    the per-epoch history)."""
    dataset = check_config(cfg)
    check_output_is_this_run(cfg)
    connected = _connect(cfg)
    try:
        check_gpus(cfg)
        result = build_trainer(cfg, dataset).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"run {cfg.execution.run_name!r} under {storage_path(cfg)} "
                               "reported no "
                               "checkpoint")
        with result.checkpoint.as_directory() as latest:
            history = json.loads(ckpt.Checkpoint.open(latest).dense_state()["history"])
        summary = summarize(history)
        best = [c for c, m in (result.best_checkpoints or [])
                if m.get("epoch") == summary["best_epoch"]]
        if not best:
            raise RuntimeError(f"run {cfg.execution.run_name!r} under {storage_path(cfg)}: "
                               "no checkpoint "
                               f"of the best epoch {summary['best_epoch']} was kept")
        best_checkpoint = best[0]
        with best_checkpoint.as_directory() as best_dir:
            finalize_output(cfg, summary, Path(best_dir))
        summary["ray_checkpoint"] = best_checkpoint.path
        return summary
    finally:
        if connected:
            ray.shutdown()
