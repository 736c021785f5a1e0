"""The worker protocol: what differs between one process (`din_ray.train.local.LocalEnv`) and a
Ray Train worker (`din_ray.train.distributed.RayEnv`): where batches come from, how tables are
sharded, how dense gradients and metrics are synchronised, where checkpoints go."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from din_ray.config import TrainConfig
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import CTRModel


class WorkerEnv:
    """Where a worker's batches, tables, synchronisation and checkpoints come from."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where the model, tables and batches live

    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def make_tables(self, model: CTRModel, cfg: TrainConfig) -> EmbeddingTables:
        tables = EmbeddingTables(model.table_specs(), seed=cfg.optim.seed,
                                 init_std=cfg.optim.init_std)
        return tables.to(self.device)

    def wrap_dense(self, model: nn.Module) -> nn.Module:
        return model

    def gather(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Concatenate each array over all workers (every worker gets the result)."""
        return arrays

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every worker rank 0's copy of the model's buffers (Dice's running statistics),
        the copy the checkpoint holds. A no-op in one process."""
        if self.world_size == 1 or not dist.is_initialized():
            return
        for buffer in model.buffers():
            out = buffer.to(self.device)
            dist.broadcast(out, src=0)
            buffer.copy_(out)

    def latest_checkpoint(self) -> Path | None:
        return None

    def report(self, metrics: dict, write_checkpoint: Callable[[Path], None]) -> None:
        raise NotImplementedError
