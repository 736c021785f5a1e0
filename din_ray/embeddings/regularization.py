"""Regularizers of the paper's comparison (§5.1, §6.5, Table 4), selected with `--reg`:

    none     no regularization
    mba      mini-batch aware L2 (Eq. 7): λ·w_j/n_j on the rows a mini-batch touched
    difacto  DiFacto's frequency-proportional L2 (arXiv v1 Eq. 11): λ·n_j·w_j on touched rows
    l2       ordinary L2 over whole tables (Eq. 5): every row, every step (O(table) per step)
    dropout  discard 50 % of each training sample's feature ids (`IdDropout`, data level)
    filter   keep only the K most frequent ids per table, the rest become OOV (`IdFilter`)

The gradient regularizers (`RowPenalty`) give `penalty(table, ids, rows) -> (U, dim)`, the
gradient of their term on the given rows: ids (U,) global row ids, rows (U, dim) their values.
`RowWiseOptimizer` applies it in one of two forms (`reg_form`): "coupled" adds it to the data
gradient before the optimizer's update, as Eq. 7 is written; "decoupled" (the default) subtracts
lr·penalty after the update, as AdamW does with weight decay. Under SGD the two are the same
update. Under Adam the coupled term is divided by Adam's running gradient scale: once it
dominates a row's gradient the row moves about lr per touch towards zero whatever λ is, so λ
stops meaning anything; decoupled, the shrinkage is lr·λ·w_j/n_j per touch, as under SGD.

λ is defined for a global mini-batch of `LAMBDA_BATCH` samples: the penalty of a step over a
global batch of G samples (batch_size × workers) is scaled by LAMBDA_BATCH / G. The data term is a
mean over G samples, so without the scaling N workers (or an N× larger batch) would weigh the
penalty N× more against the data at the same λ (Eq. 5: the epoch's objective is
Σ loss / G + λ‖W‖²).

The data-level ones rewrite batches of ids before the model sees them (`din_ray.train.loop` applies
them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from din_ray.schema import NUM_RESERVED_IDS, OOV_ID, PAD_ID, Schema

# The global batch λ is defined for: the default batch size of one worker, so a default
# single-worker run regularizes as before the scaling existed.
LAMBDA_BATCH = 256
REG_FORMS = ("decoupled", "coupled")


class RowPenalty:
    """An L2 term on embedding rows: penalty_j = λ · s · c_j · (w_j − w0_j), c_j per regularizer.

    Args:
        lam: λ.
        centers: table -> (rows, dim) values the rows are pulled towards (default zero), e.g.
            the popularity logits ad bias rows start at, so the penalty pulls a bias towards
            its prior click rate instead of towards logit 0 (a 50 % click rate).
        global_batch: samples per step over all workers (G); the term is scaled by
            s = LAMBDA_BATCH / G so that λ means the same at any worker count and batch size.
    """

    whole_tables = False

    def __init__(self, lam: float, centers: dict[str, Tensor] | None = None,
                 global_batch: int = LAMBDA_BATCH) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        self.lam = lam
        self.strength = lam * LAMBDA_BATCH / global_batch  # λ · s
        self.centers = dict(centers or {})

    def weights(self, table: str, ids: Tensor) -> Tensor | float:
        """c_j of the rows `ids` (U,) -> (U, 1) or a scalar."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> RowPenalty:
        """Keep the term's tensors on the tables' device (the training loop calls this once),
        so a step indexes them where the ids are."""
        self.centers = {t: c.to(device) for t, c in self.centers.items()}
        return self

    def penalty(self, table: str, ids: Tensor, rows: Tensor) -> Tensor:
        """The term's gradient on `rows` (U, dim) of global ids `ids` (U,). -> (U, dim)"""
        center = self.centers.get(table)
        if center is not None:
            rows = rows - center[ids].to(rows.dtype)
        return self.strength * self.weights(table, ids) * rows


class MiniBatchAware(RowPenalty):
    """Mini-batch aware L2 (paper §5.1, Eq. 7): penalty_j = λ · (α_mj / n_j) · w_j.

    α_mj = 1 exactly for the rows touched in mini-batch m, which are the rows this is called
    with, so the cost grows with the touched rows, never with the table. n_j counts, per table,
    the training samples whose lookups of that table include id j: `counts.npz` of the prepared
    data for the feature tables, and counted from the training split for derived tables (a
    candidate's bias table: the samples whose candidate is j, not the history occurrences its
    base table also counts; see `din_ray.train.loop.table_counts`).

    Args:
        lam: λ (the paper uses 0.01).
        counts: table -> (vocab_size,) int64 n_j; every table the optimizer updates needs one.
        centers, global_batch: as `RowPenalty`.
    """

    def __init__(self, lam: float, counts: dict[str, np.ndarray],
                 centers: dict[str, Tensor] | None = None,
                 global_batch: int = LAMBDA_BATCH) -> None:
        super().__init__(lam, centers, global_batch)
        # 1/n_j, with unseen ids (n_j = 0, e.g. OOV) treated as seen once.
        self.inv_counts = {t: torch.from_numpy(1.0 / np.maximum(c, 1)).float()
                           for t, c in counts.items()}

    def _inv(self, table: str) -> Tensor:
        inv = self.inv_counts.get(table)
        if inv is None:
            raise KeyError(f"no id counts for table {table!r}; have {sorted(self.inv_counts)} "
                           "(count derived tables with din_ray.train.loop.table_counts)")
        return inv

    def weights(self, table: str, ids: Tensor) -> Tensor:
        return self._inv(table)[ids].unsqueeze(-1)  # (U, 1)

    def to(self, device: torch.device | str) -> MiniBatchAware:
        super().to(device)
        self.inv_counts = {t: c.to(device) for t, c in self.inv_counts.items()}
        return self


class DiFacto(MiniBatchAware):
    """DiFacto's adaptive L2 (arXiv v1 Eq. 11): penalty_j = λ · n_j · w_j on touched rows.

    The opposite weighting of MBA: frequent ids are penalised most. Same counts, same cost.
    """

    def __init__(self, lam: float, counts: dict[str, np.ndarray],
                 centers: dict[str, Tensor] | None = None,
                 global_batch: int = LAMBDA_BATCH) -> None:
        super().__init__(lam, counts, centers, global_batch)
        # Reuse MBA's lookup on n_j instead of 1/n_j.
        self.inv_counts = {t: torch.from_numpy(np.asarray(c, dtype=np.float32))
                           for t, c in counts.items()}


class WholeTableL2(RowPenalty):
    """Ordinary L2 over whole tables (Eq. 5), for comparison with MBA.

    Every row j of every table gets penalty_j = (λ / S) · w_j at every step, S = steps per
    epoch: Eq. 5's λ‖W‖² spread evenly over an epoch's mini-batches, i.e. exactly the objective
    that MBA (Eq. 6/7) approximates by touching only the rows in the batch. Untouched rows
    therefore get an optimizer update too, so a step costs O(table rows), which is the point of
    the comparison (`benchmarks/mba_cost.py`). In the coupled form under Adam the update of an
    untouched row is scale-free (about lr·sign(w_j)), so rare ids shrink fast whatever λ is.
    """

    whole_tables = True

    def __init__(self, lam: float, steps_per_epoch: int = 1,
                 centers: dict[str, Tensor] | None = None,
                 global_batch: int = LAMBDA_BATCH) -> None:
        super().__init__(lam, centers, global_batch)
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.coef = 1.0 / steps_per_epoch

    def weights(self, table: str, ids: Tensor) -> float:
        return self.coef

    @staticmethod
    def expand(tables, gradients: dict[str, tuple[Tensor, Tensor]]
               ) -> dict[str, tuple[Tensor, Tensor]]:
        """Touched-row gradients -> gradients over every row this worker owns (zeros where the
        batch did not touch a row), so the optimizer and `penalty` visit the whole table.

        Args:
            tables: the `EmbeddingTables` (its row blocks and weights).
            gradients: table -> (ids (U,), grad (U, dim)) from `touched_gradients()`.
        Returns: table -> (ids (R,), grad (R, dim)), R = the block's rows minus PAD.
        """
        out = {}
        for name in tables.specs:
            start, end = tables.blocks[name]
            weight = tables.weight(name)
            full = torch.zeros_like(weight)  # (end - start, dim)
            if name in gradients:
                ids, grad = gradients[name]
                full[ids - start] = grad
            ids = torch.arange(start, end, device=weight.device)
            keep = ids != PAD_ID  # PAD stays zero
            out[name] = (ids[keep], full[keep])
        return out


# --- data-level regularizers --------------------------------------------------------------------
class IdFilter:
    """Frequency filter (§6.5): per table, keep the `top_k` ids with the largest n_j; every other
    id maps to OOV. Applied to every split, so evaluation sees the same ids as training.

    Ties in n_j keep the smaller id (deterministic). Tables with at most `top_k` real ids are
    left as they are.

    Args:
        schema: the dataset schema (features name their tables).
        counts: table -> (vocab_size,) n_j from `counts.npz`.
        top_k: ids kept per table (PAD and OOV are always kept).
    """

    def __init__(self, schema: Schema, counts: dict[str, np.ndarray], top_k: int) -> None:
        if top_k < 0:
            raise ValueError(f"filter_top_k must be >= 0, got {top_k}")
        self.schema = schema
        self.remap: dict[str, np.ndarray] = {}
        for table, (rows, _) in schema.tables.items():
            if rows - NUM_RESERVED_IDS <= top_k:
                continue
            c = np.asarray(counts[table]).copy()
            c[:NUM_RESERVED_IDS] = -1  # never "kept" by rank; PAD/OOV map to themselves below
            order = np.argsort(-c, kind="stable")
            remap = np.full(rows, OOV_ID, np.int64)
            kept = order[:top_k]
            remap[kept] = kept
            remap[PAD_ID], remap[OOV_ID] = PAD_ID, OOV_ID
            self.remap[table] = remap

    def kept(self, table: str) -> int | None:
        """Number of real ids kept in `table` (None when it is not filtered)."""
        remap = self.remap.get(table)
        return None if remap is None else int((remap >= NUM_RESERVED_IDS).sum())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        for f in self.schema.features:
            remap = self.remap.get(f.table)
            if remap is not None:
                out[f.name] = remap[batch[f.name]]
        return out


class IdDropout:
    """Feature-id dropout (§6.5): each id of a training sample is discarded (set to PAD) with
    probability `rate` (the paper: 50 %). Training batches only.

    A history slot is one behaviour: its aligned ids (item and category) are dropped together,
    so the slot disappears rather than leaving a category without its item. Scalar features
    (candidate item, candidate category, profile, context) are dropped independently.

    Args:
        schema: the dataset schema.
        rate: drop probability.
    `__call__(batch, rng)` takes the random generator, so the caller decides the seeding.
    """

    def __init__(self, schema: Schema, rate: float = 0.5) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {rate}")
        self.schema, self.rate = schema, rate

    def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
        out = dict(batch)
        behaviour = self.schema.behavior_features
        if behaviour:
            shape = batch[behaviour[0].name].shape  # (B, L)
            drop = rng.random(shape) < self.rate
            for f in behaviour:
                out[f.name] = np.where(drop, PAD_ID, batch[f.name])
        for f in self.schema.features:
            if not f.is_sequence:
                drop = rng.random(batch[f.name].shape) < self.rate  # (B,)
                out[f.name] = np.where(drop, PAD_ID, batch[f.name])
        return out


REGULARIZERS = ("none", "mba", "l2", "difacto", "dropout", "filter")
# Regularizers acting on the embedding gradients (the others act on the data).
GRADIENT_REGULARIZERS = ("mba", "l2", "difacto")


def build_regularizer(name: str, lam: float, counts: dict[str, np.ndarray],
                      steps_per_epoch: int = 1, global_batch: int = LAMBDA_BATCH,
                      centers: dict[str, Tensor] | None = None) -> RowPenalty | None:
    """The gradient regularizer for `--reg name`; None for none/dropout/filter or λ = 0.

    Args:
        name, lam: `--reg` and `--lam`.
        counts: table -> n_j (mba, difacto).
        steps_per_epoch: global steps per epoch (l2).
        global_batch: samples per step over all workers (see `RowPenalty`).
        centers: table -> rows the penalty pulls towards instead of zero.
    """
    if name not in REGULARIZERS:
        raise ValueError(f"reg must be one of {REGULARIZERS}, got {name!r}")
    if name not in GRADIENT_REGULARIZERS or lam == 0:
        return None
    if name == "mba":
        return MiniBatchAware(lam, counts, centers, global_batch)
    if name == "difacto":
        return DiFacto(lam, counts, centers, global_batch)
    return WholeTableL2(lam, steps_per_epoch, centers, global_batch)
