"""Training in this process: one worker, checkpoints under OUTPUT/checkpoints; what
`din-ray train --local` runs.

A train split below `cache_below_mb` is read into memory once and each epoch is one permutation of
all its rows (`din_ray.data.in_memory`, as a Ray run's in-memory splits, same seed); a larger one
streams from its Parquet files, shuffled file by file. Streaming shuffled only inside a file:
every batch of an epoch's first fifth came from one file of the synthetic set's five, and at the
reference DIN's settings din-ray stayed ~0.005 validation GAUC below a plain DIN that permutes the
whole split; permuted whole, the defaults are level with it (12 seeds; docs/results.md,
"Defaults vs a plain DIN", session 5).

    din-ray train --local --data runs/ml --model din --epochs 5 --output runs/din
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from din_ray import checkpoint as ckpt
from din_ray import io as atomic
from din_ray.config import TrainConfig
from din_ray.data import in_memory
from din_ray.data.format import PreparedDataset, iter_numpy_batches
from din_ray.train.env import WorkerEnv
from din_ray.train.loop import train_loop
from din_ray.train.outputs import check_output_is_this_run, finalize_output
from din_ray.train.selection import best_epoch_dir

log = logging.getLogger(__name__)


class LocalEnv(WorkerEnv):
    """One process, batches streamed from the Parquet files, checkpoints under OUTPUT/checkpoints.

    Keeps the latest and the best epoch's checkpoints; rerunning the same command resumes from
    the latest.
    """

    def __init__(self, cfg: TrainConfig, dataset: PreparedDataset) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.root = Path(cfg.output) / "checkpoints"
        self.device = torch.device(cfg.execution.device or "cpu")
        # The train split's columns in their stored widths, or None to stream it.
        self.train_columns = (in_memory.read_columns(dataset, "train")
                              if in_memory.split_mb(dataset, "train")
                              < cfg.execution.cache_below_mb else None)

    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        seed = in_memory.epoch_seed(self.cfg.optim.seed, epoch)
        if self.train_columns is not None:
            columns = self.train_columns
            rows = in_memory.train_rows(len(columns[self.dataset.schema.label]), 0, 1, seed=seed,
                                        shuffle=self.cfg.optim.shuffle)
            return in_memory.iter_batches(self.dataset.schema, columns, rows,
                                          self.cfg.optim.batch_size)
        return iter_numpy_batches(self.dataset.files("train"), self.dataset.schema,
                                  self.cfg.optim.batch_size, shuffle=self.cfg.optim.shuffle,
                                  seed=seed)

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        return iter_numpy_batches(self.dataset.files(split), self.dataset.schema,
                                  self.cfg.optim.eval_batch_size)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.root.glob("epoch-*") if (p / ckpt.MANIFEST).exists())
        return done[-1] if done else None

    def report(self, metrics: dict, write_checkpoint: Callable[[Path], None]) -> None:
        final = self.root / f"epoch-{metrics['epoch']:04d}"
        with atomic.staged_dir(final) as tmp:
            write_checkpoint(tmp)
        # Retain only the latest and the best epoch (the one `summarize` names).
        keep = {final.name, best_epoch_dir(self.root)}
        for p in self.root.glob("epoch-*"):
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def run_local(cfg: TrainConfig) -> dict:
    """Train in this process (one worker, no Ray) and write OUTPUT/{metrics.json,checkpoint}."""
    dataset = PreparedDataset.open(cfg.data)
    check_output_is_this_run(cfg)  # before any training: another run's output is refused
    env = LocalEnv(cfg, dataset)
    result = train_loop(cfg, env)
    best = best_epoch_dir(env.root)
    finalize_output(cfg, result, env.root / best if best else None)
    return result
