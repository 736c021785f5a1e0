"""Distributed training on Ray Train (V2): Ray Data shards, DDP dense layers, row-wise sharded
embedding tables, sharded checkpoints in Ray's storage, restarts from the latest checkpoint.

`run_ray(cfg)` is the driver: it validates the configuration and the data up front (before any
worker starts), reads the prepared Parquet splits with Ray Data, runs `train.train_loop` in
`cfg.workers` Ray Train workers through `RayEnv`, and writes the same OUTPUT/{metrics.json,
checkpoint} as `train.run_local`.

    din-ray train --data runs/ml --model din --workers 2 --output runs/din-2w

Per worker (`RayEnv`):
  * data: `get_dataset_shard(split).iter_batches(batch_format="pyarrow")`; the train split is
    split with equal row counts (so every worker runs the same number of steps, which DDP and the
    embedding all-to-alls need; with `shuffle=False` every worker reads the whole split in order
    and trains on its share of each global batch); valid/test are split without dropping a row
    and evaluated in lockstep (an exhausted worker feeds empty batches until every worker is
    done), so the metrics over the gathered predictions are exactly the single-process values;
  * dense layers: `ray.train.torch.prepare_model` (DDP);
  * embeddings: `din_ray.sharding.ShardedEmbeddingTables` on a process group of their own;
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
import os
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
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from din_ray import checkpoint as ckpt
from din_ray.data.format import SPLITS, DataError, PreparedDataset, to_numpy
from din_ray.embedding import EmbeddingTables
from din_ray.local_ray import connect
from din_ray.model import CTRModel, build_model
from din_ray.schema import Schema
from din_ray.sharding import ShardedEmbeddingTables, embedding_group, plan_tables
from din_ray.train import TrainConfig, WorkerEnv, finalize_output, summarize, train_loop

log = logging.getLogger(__name__)

# Test-only fault injection: cfg.extra[FAIL_KEY] = {"rank", "epoch" (1-based), "step" (0-based),
# "marker" (a file path)} makes that worker exit abruptly at that step, once (the marker file
# records that it happened, so the restarted worker carries on).
FAIL_KEY = "fail_at"


# --- the worker side ----------------------------------------------------------------------------
class RayEnv(WorkerEnv):
    """A Ray Train worker's batches, tables, collectives and checkpoints."""

    def __init__(self, cfg: TrainConfig, schema: Schema) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.cfg, self.schema = cfg, schema
        self.device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")

    # data
    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        shard = ray.train.get_dataset_shard("train")
        if self.cfg.shuffle:
            batches = shard.iter_batches(
                batch_size=self.cfg.batch_size, batch_format="pyarrow",
                local_shuffle_buffer_size=8 * self.cfg.batch_size,
                local_shuffle_seed=(self.cfg.seed * 10_007 + epoch) * 1_009 + self.rank)
        else:
            batches = self._share_of_global_batches(shard)
        numpy = (to_numpy(self.schema, b) for b in batches)
        return self._lockstep(self._maybe_fail(numpy, epoch), pad=False)

    def _share_of_global_batches(self, shard) -> Iterator[pa.Table]:
        """Unshuffled training: every worker reads the whole split in file order (see
        EvalSplitConfig) in global batches of batch_size * workers rows and trains on its
        contiguous share of each (a last short batch cut to a multiple of the worker count), so
        step t trains on the rows one process reading the files in order takes at step t."""
        for batch in shard.iter_batches(batch_size=self.cfg.batch_size * self.world_size,
                                        batch_format="pyarrow"):
            share = batch.num_rows // self.world_size
            if share:
                yield batch.slice(self.rank * share, share)

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        batches = ray.train.get_dataset_shard(split).iter_batches(
            batch_size=self.cfg.eval_batch_size, batch_format="pyarrow")
        return self._lockstep((to_numpy(self.schema, b) for b in batches), pad=True)

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
            dist.all_reduce(more, op=op)
            if not int(more):
                return
            yield batch if batch is not None else self._empty_batch()

    def _empty_batch(self) -> dict[str, np.ndarray]:
        cols = {self.schema.label: np.zeros(0, np.float32),
                self.schema.user_column: np.zeros(0, np.int64)}
        for f in self.schema.features:
            cols[f.name] = np.zeros((0, f.max_len) if f.is_sequence else 0, np.int64)
        return cols

    def _maybe_fail(self, batches: Iterator[dict[str, np.ndarray]], epoch: int
                    ) -> Iterator[dict[str, np.ndarray]]:
        plan = self.cfg.extra.get(FAIL_KEY)
        for step, batch in enumerate(batches):
            if (plan and plan["rank"] == self.rank and plan["epoch"] == epoch + 1
                    and plan["step"] == step and not Path(plan["marker"]).exists()):
                Path(plan["marker"]).write_text(f"rank {self.rank} epoch {epoch + 1} step {step}")
                log.warning("fault injection: rank %d exits at epoch %d step %d", self.rank,
                            epoch + 1, step)
                os._exit(1)
            yield batch

    # model placement
    def make_tables(self, model: CTRModel, cfg: TrainConfig) -> EmbeddingTables:
        tables = ShardedEmbeddingTables(model.table_specs(), self.rank, self.world_size,
                                        seed=cfg.seed, init_std=cfg.init_std,
                                        replicate_below=cfg.replicate_below,
                                        group=embedding_group())
        log.info("rank %d/%d holds %.1f MB of embeddings (%s)", self.rank, self.world_size,
                 tables.memory_bytes() / 1e6, tables.plan)
        return tables

    def wrap_dense(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=self.cfg.use_gpu)

    # collectives
    def gather(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, arrays)
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
            # Every worker reports its own files under the same name; Ray merges them.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch-{metrics['epoch']:04d}")


def _train_worker(config: dict) -> None:
    """train_loop_per_worker: rebuild the config and run the shared training loop."""
    cfg = TrainConfig.from_dict(config)
    torch.set_num_threads(cfg.threads or max(1, int(cfg.cpus_per_worker)))
    env = RayEnv(cfg, PreparedDataset.open(cfg.data).schema)
    train_loop(cfg, env)


class EvalSplitConfig(DataConfig):
    """Train split into equal row counts (DDP and the all-to-alls need equal step counts; at
    most workers - 1 rows per epoch are dropped); valid/test split without dropping any row.

    `ordered=True` (cfg.shuffle off) hands every worker the whole train split in file order
    instead; `RayEnv` then takes each worker's share of every global batch. Ray Data's split
    deals blocks to workers by its own rule (it promises no order), so only this makes a
    step's global batch the rows of a known range, as one process reading in order sees them.
    """

    def __init__(self, ordered: bool = False) -> None:
        options = None
        if ordered:
            options = {"train": self.default_ingest_options()}
            options["train"].preserve_order = True
        super().__init__(datasets_to_split=[] if ordered else "all", execution_options=options)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out = super().configure({k: v for k, v in datasets.items() if k == "train"}, world_size,
                                worker_handles, worker_node_ids, **kwargs)
        for name, ds in datasets.items():
            if name != "train":
                if ds.name is None:
                    ds.set_name(name)  # names the split in Ray Data's logs and dashboard
                for i, it in enumerate(ds.streaming_split(world_size, equal=False)):
                    out[i][name] = it
        return out


# --- the driver ---------------------------------------------------------------------------------
def check_config(cfg: TrainConfig) -> PreparedDataset:
    """Everything that can be checked before a worker starts; raises ValueError (or DataError /
    SchemaError, both ValueErrors) naming the directory, file, table or field at fault."""
    if cfg.use_gpu:
        # ShardedEmbeddingTables and RayEnv are device-agnostic (NCCL needs the ids and rows on
        # the GPU, which they keep wherever the batch is), but train.train_loop still builds its
        # batches and tables on the CPU; until it places them on env.device, refuse rather than
        # fail on the first step.
        raise ValueError("use_gpu=True: the training loop (din_ray.train) does not place batches "
                         "and tables on the GPU yet; train on CPU workers")
    dataset = PreparedDataset.open(cfg.data)
    for split in SPLITS:
        files = dataset.files(split)
        if not files:
            raise DataError(f"{dataset.root / split}: no Parquet files")
        for path in files:
            dataset.check_file(path)
    if dataset.num_rows("train") < cfg.workers:
        raise ValueError(f"{cfg.data}: {dataset.num_rows('train')} training rows cannot feed "
                         f"{cfg.workers} workers")
    model = build_model(dataset.schema.with_embedding_dim(cfg.embedding_dim), cfg.model_config())
    plan_tables(model.table_specs(), cfg.workers, cfg.replicate_below)
    return dataset


def storage_path(cfg: TrainConfig) -> str:
    """Ray Train storage for the run: `cfg.storage_path` (a URI or a local directory), or
    OUTPUT/ray; local paths are made absolute as Ray requires."""
    path = cfg.storage_path or str(Path(cfg.output) / "ray")
    return path if "://" in path else str(Path(path).resolve())


def _connect(cfg: TrainConfig) -> bool:
    """Join the running Ray (this process's, `cfg.address` or $RAY_ADDRESS), else start a
    local one. Returns whether this call connected (and so should disconnect)."""
    # Logical CPUs beyond the workers' so Ray Data always has some to read with (2 workers at
    # 1 CPU on a 2-core machine would otherwise leave it none and the run would hang).
    return connect(cfg.address, max(4, math.ceil(cfg.workers * cfg.cpus_per_worker) + 2))


def build_trainer(cfg: TrainConfig, dataset: PreparedDataset,
                  callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer of one run; `callbacks` go into its RunConfig (din_ray.tune passes
    `TuneReportCallback()` so Tune sees every epoch's report)."""
    datasets = {split: _read_split(dataset, split, cfg) for split in SPLITS}
    return _trainer(cfg, datasets, callbacks)


def _read_split(dataset: PreparedDataset, split: str, cfg: TrainConfig) -> ray.data.Dataset:
    """A split as a Ray Dataset: streamed from its Parquet files on every pass, or, below
    `cfg.cache_below_mb`, read once into the object store. Every streamed pass (each epoch's
    training and evaluation) starts a new execution whose first batch takes seconds (~12 s in a
    worker on a 2-core machine), which dominates the epochs of small datasets; a cached split
    starts in well under a second."""
    files = dataset.files(split)
    ds = ray.data.read_parquet([str(f) for f in files],
                               shuffle="files" if split == "train" and cfg.shuffle else None)
    ds.context.execution_options.preserve_order = not cfg.shuffle  # file order (EvalSplitConfig)
    # Each dataset carries its own copy of the DataContext (taken when it was created, and passed
    # on to its materialized copy) into the split coordinators: no progress bars there (three
    # datasets per epoch would bury the training log), and the caller's context is left alone.
    ds.context.enable_progress_bars = False
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    if size_mb < cfg.cache_below_mb:
        ds = ds.materialize()
        log.info("%s split: %.1f MB of Parquet, kept in the object store across epochs", split,
                 size_mb)
    return ds


def _trainer(cfg: TrainConfig, datasets: dict, callbacks: list | None) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker=_train_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # The best and the latest checkpoints are always kept. Scored by `new_best`, not
            # valid_gauc: Ray breaks ties towards the later epoch, `summarize` towards the
            # earlier, and the latest epoch with new_best = 1 is exactly summarize's best.
            checkpoint_config=CheckpointConfig(num_to_keep=2,
                                               checkpoint_score_attribute="new_best",
                                               checkpoint_score_order="max"),
            callbacks=callbacks),
        datasets=datasets,
        dataset_config=EvalSplitConfig(ordered=not cfg.shuffle),
    )


def run_ray(cfg: TrainConfig) -> dict:
    """Train with `cfg.workers` Ray Train workers; write OUTPUT/{metrics.json,checkpoint}.

    Returns the same summary as `train.run_local` (test metrics of the best validation epoch and
    the per-epoch history)."""
    dataset = check_config(cfg)
    connected = _connect(cfg)
    try:
        result = build_trainer(cfg, dataset).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"run {cfg.run_name!r} under {storage_path(cfg)} reported no "
                               "checkpoint")
        with result.checkpoint.as_directory() as latest:
            history = json.loads(ckpt.Checkpoint.open(latest).dense_state()["history"])
        summary = summarize(history)
        best = [c for c, m in (result.best_checkpoints or [])
                if m.get("epoch") == summary["best_epoch"]]
        if not best:
            raise RuntimeError(f"run {cfg.run_name!r} under {storage_path(cfg)}: no checkpoint "
                               f"of the best epoch {summary['best_epoch']} was kept")
        best_checkpoint = best[0]
        with best_checkpoint.as_directory() as best_dir:
            finalize_output(cfg, summary, Path(best_dir))
        summary["ray_checkpoint"] = best_checkpoint.path
        return summary
    finally:
        if connected:
            ray.shutdown()
