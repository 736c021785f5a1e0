"""Shared parts of the benchmarks: the fixed batches, din-ray's training step as `train_loop` runs
it, and deepctr-torch's DIN on the same data and architecture.

deepctr-torch (PyPI `deepctr-torch`) starts a version check over the network in a thread when it
is imported; `import_deepctr()` makes that check fail at once, offline, before importing it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor, nn

from din_ray.data.format import PreparedDataset, iter_numpy_batches
from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import ModelConfig, build_model
from din_ray.schema import PAD_ID
from din_ray.train.loop import forward, to_torch

ITEM, CATE, HIST_ITEM, HIST_CATE = "item_id", "cate_id", "hist_item_id", "hist_cate_id"


@dataclass(frozen=True)
class Arch:
    """The benchmark architecture (issue 9): the same in both frameworks."""

    embedding_dim: int = 16
    attention_hidden: tuple[int, ...] = (80, 40)
    mlp_hidden: tuple[int, ...] = (200, 80)
    activation: str = "prelu"  # "prelu" or "dice"
    lr: float = 1e-3
    init_std: float = 0.01


def load_batches(data: str | Path, batch_size: int, count: int,
                 full_history: bool = False, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The first `count` full training batches of a prepared dataset (held in memory, so both
    frameworks train on exactly the same arrays).

    With `full_history`, every padded history slot is filled with a random behaviour of the same
    sample's vocabularies (item and its category drawn independently), so no slot is padding: the
    worst case for work that skips padding.
    """
    ds = PreparedDataset.open(data)
    out = []
    rng = np.random.default_rng(seed)
    items, cates = ds.schema.tables[ITEM][0], ds.schema.tables[CATE][0]
    for batch in iter_numpy_batches(ds.files("train"), ds.schema, batch_size, drop_last=True):
        if full_history:
            pad = batch[HIST_ITEM] == PAD_ID
            batch = dict(batch)
            batch[HIST_ITEM] = np.where(pad, rng.integers(2, items, pad.shape), batch[HIST_ITEM])
            batch[HIST_CATE] = np.where(pad, rng.integers(2, cates, pad.shape), batch[HIST_CATE])
        out.append(batch)
        if len(out) == count:
            break
    if len(out) < count:
        raise ValueError(f"{data}: only {len(out)} batches of {batch_size}, {count} needed")
    return out


class DinRayTrainer:
    """din-ray's training step exactly as `din_ray.train.loop._train_epoch` runs it: numpy batch ->
    tensors, `EmbeddingTables.lookup` (deduplicated ids), the dense model, BCE-with-logits, dense
    Adam, lazy row-wise Adam on the touched rows. No regularizer (deepctr's side runs none either).
    """

    def __init__(self, dataset: PreparedDataset, arch: Arch, seed: int = 0,
                 compile_model: bool = False, fused_adam: bool = False) -> None:
        torch.manual_seed(seed)
        self.schema = dataset.schema.with_embedding_dim(arch.embedding_dim)
        config = ModelConfig(model="din", activation=arch.activation,
                             attention_hidden=arch.attention_hidden, mlp_hidden=arch.mlp_hidden,
                             ad_bias=False)
        self.model = build_model(self.schema, config)
        self.tables = EmbeddingTables(self.model.table_specs(), seed=seed, init_std=arch.init_std)
        params = list(self.model.parameters())
        self.dense_opt = torch.optim.Adam(params, lr=arch.lr, fused=fused_adam or None)
        self.sparse_opt = RowWiseOptimizer(self.tables, "adam", lr=arch.lr)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.net = torch.compile(self.model) if compile_model else self.model

    def train_step(self, batch: dict[str, np.ndarray]) -> float:
        self.model.train()
        self.tables.train()
        t = to_torch(batch)
        logits = self.net(self.tables.lookup(self.model.sparse_inputs(t)), t)
        loss = self.loss_fn(logits, t[self.schema.label])
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.dense_opt.step()
        self.sparse_opt.step(self.tables.touched_gradients(), None)
        return loss.item()

    @torch.no_grad()
    def predict(self, batch: dict[str, np.ndarray]) -> Tensor:
        self.model.eval()
        self.tables.eval()
        return torch.sigmoid(forward(self.net, self.tables, to_torch(batch)))


def import_deepctr():
    """Import deepctr_torch with its import-time network version check disabled (no internet
    here): in this process `requests.get` answers at once with a non-OK status, which the check
    (deepctr_torch.utils.check_version) takes as "no newer version known"."""
    import requests

    def offline(*args, **kwargs):
        return SimpleNamespace(status_code=0, text="")

    requests.get = offline
    import deepctr_torch

    return deepctr_torch


class DeepCTRTrainer:
    """deepctr-torch's DIN on the same data and architecture, trained by the inner loop of its
    `BaseModel.fit` (forward, BCE on the sigmoid output with reduction='sum', its regularization
    loss, backward, Adam step), minus fit's DataLoader, tqdm and per-batch metrics.

    deepctr's Dice needs 3-D input, so Dice is only possible in its attention unit (its outer DNN
    builds Dice(dim=3) and asserts on the 2-D MLP input): with activation "dice" the MLP uses
    PReLU.
    """

    def __init__(self, dataset: PreparedDataset, arch: Arch, seed: int = 0) -> None:
        dc = import_deepctr()
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
        from deepctr_torch.models import DIN

        schema = dataset.schema
        items, cates = schema.tables[ITEM][0], schema.tables[CATE][0]
        L = schema.max_history
        d = arch.embedding_dim
        columns = [
            SparseFeat(ITEM, items, embedding_dim=d),
            SparseFeat(CATE, cates, embedding_dim=d),
            VarLenSparseFeat(SparseFeat(HIST_ITEM, items, embedding_dim=d, embedding_name=ITEM),
                             maxlen=L, length_name="seq_length"),
            VarLenSparseFeat(SparseFeat(HIST_CATE, cates, embedding_dim=d, embedding_name=CATE),
                             maxlen=L, length_name="seq_length"),
        ]
        att_act = "Dice" if arch.activation == "dice" else "prelu"
        self.model = DIN(columns, [ITEM, CATE], dnn_use_bn=False,
                         dnn_hidden_units=arch.mlp_hidden, dnn_activation="prelu",
                         att_hidden_size=arch.attention_hidden, att_activation=att_act,
                         att_weight_normalization=False, l2_reg_dnn=0.0, l2_reg_embedding=0.0,
                         dnn_dropout=0.0, init_std=arch.init_std, seed=seed, task="binary",
                         device="cpu")
        self.model.compile(torch.optim.Adam(self.model.parameters(), lr=arch.lr),
                           "binary_crossentropy")
        self.order = list(self.model.feature_index)  # column order of deepctr's X
        self.version = dc.__version__

    def to_x(self, batch: dict[str, np.ndarray]) -> tuple[Tensor, Tensor]:
        """deepctr's input: one float matrix (B, 1 + 1 + L + L + 1), columns in feature order."""
        length = (batch[HIST_ITEM] != PAD_ID).sum(1)
        cols = {ITEM: batch[ITEM][:, None], CATE: batch[CATE][:, None],
                HIST_ITEM: batch[HIST_ITEM], HIST_CATE: batch[HIST_CATE],
                "seq_length": length[:, None]}
        x = np.concatenate([cols[name] for name in self.order], axis=1).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(batch["label"].astype(np.float32))

    def train_step(self, xy: tuple[Tensor, Tensor]) -> float:
        """One step of fit's inner loop on a prepared (x, y). Returns the mean loss."""
        x, y = xy
        self.model.train()
        y_pred = self.model(x).squeeze(-1)
        self.model.optim.zero_grad()
        loss = self.model.loss_func(y_pred, y, reduction="sum")
        total = loss + self.model.get_regularization_loss() + self.model.aux_loss
        total.backward()
        self.model.optim.step()
        return loss.item() / len(y)

    @torch.no_grad()
    def predict(self, xy: tuple[Tensor, Tensor]) -> Tensor:
        self.model.eval()
        return self.model(xy[0]).squeeze(-1)


def time_steps(step, inputs: list, repeat_to: int) -> float:
    """Seconds for `repeat_to` calls of `step`, cycling through `inputs`."""
    t0 = time.perf_counter()
    for i in range(repeat_to):
        step(inputs[i % len(inputs)])
    return time.perf_counter() - t0


def attention_concat(att, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
    """The local activation unit in the paper's form, for the ablation: MLP over the
    concatenation [e, v, e−v, e⊙v] of every one of the B·L slots. -> pooled (B, D)"""
    v = query.unsqueeze(1).expand_as(keys)  # (B, L, D)
    h = att.first_act(att.first(torch.cat([keys, v, keys - v, keys * v], dim=-1)), mask)
    scores = att.rest(h, mask).squeeze(-1) * mask  # (B, L)
    return (scores.unsqueeze(-1) * keys).sum(1)


def attention_decomposed(att, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
    """First-layer algebra only (the candidate's term once per sample), still over all B·L
    slots: din-ray's attention before packing, for the ablation. -> pooled (B, D)"""
    w_e, w_v, w_d, w_p = att.first.weight.split(att.dim, dim=1)
    per_behaviour = keys @ (w_e + w_d).T  # (B, L, H)
    per_candidate = query @ (w_v - w_d).T + att.first.bias  # (B, H)
    interaction = (keys * query.unsqueeze(1)) @ w_p.T  # (B, L, H)
    h = att.first_act(per_behaviour + per_candidate.unsqueeze(1) + interaction, mask)
    scores = att.rest(h, mask).squeeze(-1) * mask  # (B, L)
    return (scores.unsqueeze(-1) * keys).sum(1)


def attention_packed(att, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
    """din-ray's current `TargetAttention`: algebra plus real behaviours packed. -> (B, D)"""
    return att(query, keys, mask)[0]
