"""The regularizers of `cfg.regularization` as a run applies them: the data-level ones
(filter, dropout) rewrite batches as they are loaded, the gradient ones (mba, difacto, l2) are
built from the ids' counts for the row-wise optimizer."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from din_ray.config import TrainConfig
from din_ray.data.format import PreparedDataset
from din_ray.embeddings.regularization import (
    GRADIENT_REGULARIZERS,
    IdDropout,
    IdFilter,
    RowPenalty,
    build_regularizer,
)
from din_ray.model import CTRModel
from din_ray.train.counts import table_counts, tables_without_counts
from din_ray.train.env import WorkerEnv
from din_ray.train.forward import steps_per_epoch


class BatchRegularizer:
    """The data-level regularizers of `cfg.regularization.reg` applied to batches as they are
    loaded.

    `filter` remaps ids in every split (training and evaluation see the same ids); `dropout`
    discards ids of training batches only, from a generator seeded by (seed, epoch, rank) so a
    resumed run draws the same drops.
    """

    def __init__(self, cfg: TrainConfig, dataset: PreparedDataset, rank: int = 0) -> None:
        self.cfg, self.rank = cfg, rank
        schema = dataset.schema
        self.filter = (IdFilter(schema, dataset.counts(), cfg.regularization.filter_top_k)
                       if cfg.regularization.reg == "filter" else None)
        self.dropout = (IdDropout(schema, cfg.regularization.id_dropout)
                        if cfg.regularization.reg == "dropout" else None)

    def train(self, batches: Iterator[dict[str, np.ndarray]], epoch: int
              ) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.cfg.optim.seed, epoch, self.rank])
        for batch in batches:
            if self.filter is not None:
                batch = self.filter(batch)
            if self.dropout is not None:
                batch = self.dropout(batch, rng)
            yield batch

    def eval(self, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for batch in batches:
            yield self.filter(batch) if self.filter is not None else batch


def embedding_regularizer(cfg: TrainConfig, model: CTRModel, dataset: PreparedDataset,
                          env: WorkerEnv, data_reg: BatchRegularizer,
                          centers: dict[str, Tensor]) -> RowPenalty | None:
    """The gradient regularizer of `cfg.regularization.reg` for this run (None when there is none).

    n_j per table: the prepared `counts.npz` for the feature tables, counted from the training
    split (summed over workers) for the others: bias and first-order tables (n_j = samples
    whose lookups of that table hold j, e.g. whose candidate is j), hashed crosses. λ is scaled
    for the global batch, `cfg.optim.batch_size` × workers
    (`din_ray.embeddings.regularization.LAMBDA_BATCH`).
    """
    if cfg.regularization.reg not in GRADIENT_REGULARIZERS or cfg.regularization.lam == 0:
        return None
    counts = dataset.counts()
    missing = tables_without_counts(model, counts)
    if cfg.regularization.reg in ("mba", "difacto") and missing:
        local = table_counts(model, missing, data_reg.eval(env.train_batches(0)))
        counts = {**counts, **{t: env.all_reduce_sum(torch.from_numpy(c)).numpy()
                               for t, c in local.items()}}
    global_batch = cfg.optim.batch_size * env.world_size
    steps = steps_per_epoch(dataset.num_rows("train"), cfg.optim.batch_size, env.world_size)
    return build_regularizer(cfg.regularization.reg, cfg.regularization.lam, counts, steps,
                             global_batch=global_batch, centers=centers)
