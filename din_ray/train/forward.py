"""The forward pass every stage shares: numpy batches onto the device, sparse lookups, the
dense part under the run's precision. Training (`din_ray.train.loop`), evaluation, prediction and
the benchmarks all call `forward`, so they score a batch identically."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import Tensor, nn

from din_ray.embeddings.tables import EmbeddingTables


def to_torch(batch: dict[str, np.ndarray], device: torch.device | None = None
             ) -> dict[str, Tensor]:
    """A numpy batch as tensors on `device` (None: the CPU, sharing the arrays' memory).

    To a GPU the columns go through pinned host memory and asynchronous copies, so the copy
    overlaps the work already queued on the device."""
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    if device is None or device.type == "cpu":
        return out
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin)
            for k, v in out.items()}


def dense_autocast(device: torch.device, precision: str):
    """The autocast context of the dense part: bf16 for precision="bf16", else none."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def enable_tf32() -> None:
    """TF32 tensor-core matmuls for fp32 work on CUDA (Ampere and later; no effect on CPU)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def forward(model: nn.Module, tables: EmbeddingTables, batch: dict[str, Tensor],
            where: str = "", precision: str = "fp32") -> Tensor:
    """Logits (B,) fp32 of `batch`: sparse lookups (fp32 rows), then the dense part (under
    bf16 autocast for precision="bf16"). `where` names the batch's origin in the error for an
    out-of-range id."""
    dense = model.module if hasattr(model, "module") else model  # unwrap DDP for its methods
    embedded = tables.lookup(dense.sparse_inputs(batch), where)
    device = next(iter(batch.values())).device
    with dense_autocast(device, precision):
        logits = model(embedded, batch)
    return logits.float()

def steps_per_epoch(train_rows: int, batch_size: int, world_size: int) -> int:
    """Optimisation steps in one epoch: global batches of `batch_size` x `world_size` over
    `train_rows` samples, the last one partial (at least 1)."""
    return max(1, math.ceil(train_rows / max(batch_size * world_size, 1)))

