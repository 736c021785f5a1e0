"""A plain PyTorch DIN, independent of din_ray's model and training code, as a yardstick for
`din-ray train`'s defaults (issue 12 item 13).

What it shares with din-ray is only the data (the prepared Parquet, read with
`din_ray.data.in_memory.read_columns`) and the metric (`din_ray.metrics.gauc`). The model is the
paper's: N(0, 0.05²) embeddings, the local activation unit 80 -> 40 -> 1 with PReLU over
[e, v, e − v, e ⊙ v] and weighted-sum pooling (no softmax), an MLP 200 -> 80 -> 1 with Dice whose
statistics are plain BatchNorm running statistics (momentum 0.1); no regularizer; Adam 1e-3,
batch 256, early stopping on validation GAUC.

    PYTHONPATH=. python benchmarks/reference_din.py --data /tmp/ml-def --seed 0 \
        --output benchmarks/results/reference_din_ml.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from din_ray.data.format import PreparedDataset
from din_ray.data.in_memory import read_columns
from din_ray.metrics import evaluate_predictions
from din_ray.schema import PAD_ID


class PReLU(nn.Module):
    """Eq. (8), one slope per channel of the last dimension. x (..., C) -> (..., C)"""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((channels,), 0.25))

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, x, self.alpha * x)


class Dice(nn.Module):
    """Eq. (9) with BatchNorm's own running statistics. x (N, C) -> (N, C)"""

    def __init__(self, channels: int, momentum: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(channels, affine=False, eps=1e-8, momentum=momentum)
        self.alpha = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        p = torch.sigmoid(self.norm(x))
        return p * x + (1 - p) * self.alpha * x


class ReferenceDIN(nn.Module):
    """Every schema feature embedded; each behaviour feature's sequence attended by the ad
    feature it is aligned with."""

    def __init__(self, schema, dim: int, dice_momentum: float) -> None:
        super().__init__()
        self.schema = schema
        self.tables = nn.ModuleDict({name: nn.Embedding(rows, dim)
                                     for name, (rows, _) in schema.tables.items()})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.05)
        self.behaviours = [f for f in schema.features if f.is_sequence]
        self.singles = [f for f in schema.features if not f.is_sequence]
        key_dim = dim * len(self.behaviours)
        self.attention = nn.Sequential(nn.Linear(4 * key_dim, 80), PReLU(80),
                                       nn.Linear(80, 40), PReLU(40), nn.Linear(40, 1))
        mlp_in = dim * len(self.singles) + key_dim
        self.mlp = nn.Sequential(nn.Linear(mlp_in, 200), Dice(200, dice_momentum),
                                 nn.Linear(200, 80), Dice(80, dice_momentum), nn.Linear(80, 1))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """batch: id columns, (B,) or (B, L) for behaviours -> logits (B,)"""
        singles = [self.tables[f.table](batch[f.name]) for f in self.singles]  # each (B, D)
        keys = torch.cat([self.tables[f.table](batch[f.name]) for f in self.behaviours],
                         dim=-1)  # (B, L, K)
        query = torch.cat([self.tables[f.table](batch[f.aligned_with])
                           for f in self.behaviours], dim=-1)  # (B, K)
        mask = batch[self.behaviours[0].name] != PAD_ID  # (B, L)
        q = query.unsqueeze(1).expand_as(keys)  # (B, L, K)
        weights = self.attention(torch.cat([keys, q, keys - q, keys * q], -1)).squeeze(-1)
        pooled = ((weights * mask).unsqueeze(-1) * keys).sum(1)  # (B, K)
        return self.mlp(torch.cat([*singles, pooled], dim=-1)).squeeze(-1)


def tensors(columns: dict[str, np.ndarray], schema, rows: np.ndarray) -> dict[str, Tensor]:
    return {f.name: torch.from_numpy(columns[f.name][rows].astype(np.int64))
            for f in schema.features}


@torch.no_grad()
def evaluate(model: ReferenceDIN, columns: dict, schema) -> dict:
    model.eval()
    n = len(columns[schema.label])
    probs = np.concatenate([
        torch.sigmoid(model(tensors(columns, schema, np.arange(i, min(i + 8192, n))))).numpy()
        for i in range(0, n, 8192)])
    return evaluate_predictions(columns[schema.label], probs, columns[schema.user_column])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--dice-momentum", type=float, default=0.1)
    p.add_argument("--output", default="")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    ds = PreparedDataset.open(args.data)
    schema = ds.schema
    train, valid, test = (read_columns(ds, s) for s in ("train", "valid", "test"))
    model = ReferenceDIN(schema, dim=16, dice_momentum=args.dice_momentum)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(args.seed)
    n = len(train[schema.label])
    best, best_state, history, since_best = -1.0, None, [], 0
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = rng.permutation(n)
        for i in range(0, n - 1, 256):  # a final batch of one row has no batch statistics
            rows = order[i:i + 256]
            labels = torch.from_numpy(train[schema.label][rows].astype(np.float32))
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(tensors(train, schema, rows)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        metrics = evaluate(model, valid, schema)
        history.append({"epoch": epoch, "valid_gauc": metrics["gauc"]})
        print(f"epoch {epoch}: valid gauc {metrics['gauc']:.4f}", flush=True)
        if metrics["gauc"] > best:
            best, since_best = metrics["gauc"], 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= args.patience:
                break
    model.load_state_dict(best_state)
    result = {"data": args.data, "seed": args.seed, "dice_momentum": args.dice_momentum,
              "best_epoch": max(history, key=lambda h: h["valid_gauc"])["epoch"],
              "valid_gauc": best, "test_gauc": evaluate(model, test, schema)["gauc"],
              "history": history, "seconds": round(time.time() - start, 1)}
    print(json.dumps(result), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
