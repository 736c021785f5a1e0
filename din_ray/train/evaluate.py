"""Evaluation: a split's predictions gathered from every worker (so metrics equal the
single-process values), and a saved checkpoint re-evaluated on prepared data (`din-ray
evaluate`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from din_ray import checkpoint as ckpt
from din_ray.data.format import PreparedDataset, iter_numpy_batches
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.metrics import evaluate_predictions
from din_ray.schema import Schema
from din_ray.train.env import WorkerEnv
from din_ray.train.forward import forward, to_torch
from din_ray.train.regularizers import BatchRegularizer


@torch.no_grad()
def predict_split(model: nn.Module, tables: EmbeddingTables, batches, schema: Schema,
                  env: WorkerEnv, split: str = "", precision: str = "fp32"
                  ) -> dict[str, np.ndarray]:
    """Probabilities for one split, gathered from every worker: label, prob, user arrays.

    The probabilities stay on the device until the split is done: one copy to the host per
    split, not one per batch."""
    model.eval()
    tables.eval()
    labels, probs, users = [], [], []
    where = f"{split} split" if split else ""
    for batch in batches:
        t = to_torch(batch, env.device)
        probs.append(torch.sigmoid(forward(model, tables, t, where, precision)))
        labels.append(batch[schema.label])
        users.append(batch[schema.user_column])
    prob = torch.cat(probs).cpu().numpy() if probs else np.zeros(0, np.float32)
    local = {"label": _cat(labels, np.float32), "prob": prob.astype(np.float32),
             "user": _cat(users, np.int64)}
    return env.gather(local)


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def evaluate_split(model, tables, batches, schema, env, split: str = "",
                   precision: str = "fp32") -> dict:
    p = predict_split(model, tables, batches, schema, env, split, precision)
    return evaluate_predictions(p["label"], p["prob"], p["user"])


def evaluate_checkpoint(path: str | Path, data: str | Path, batch_size: int = 8192) -> dict:
    """Recompute valid/test metrics of a checkpoint on a prepared dataset. `path` is a
    checkpoint, a train output or a tune output (`din_ray.checkpoint.resolve_checkpoint`), as
    `din-ray serve` takes."""
    path = ckpt.resolve_checkpoint(path)
    model, tables, c = ckpt.load_model(path)
    dataset = PreparedDataset.open(data)
    if dataset.schema.with_embedding_dim(c.schema.features[0].embedding_dim) != c.schema:
        raise ValueError(f"{data}: its schema does not match the checkpoint's ({path})")
    out = {}
    # A filter run is evaluated on the same filtered ids it was trained and validated on.
    data_reg = BatchRegularizer(c.train_config(), dataset)
    for split in ("valid", "test"):
        batches = data_reg.eval(iter_numpy_batches(dataset.files(split), dataset.schema,
                                                   batch_size))
        for k, v in evaluate_split(model, tables, batches, c.schema, WorkerEnv(), split).items():
            out[f"{split}_{k}"] = v
    out.update(gauc=out["test_gauc"], auc=out["test_auc"], logloss=out["test_logloss"])
    return out
