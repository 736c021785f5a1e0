"""Regularizers of the paper's comparison (§5.1, §6.5, Table 4), selected with `--reg`:

    none     no regularization
    mba      mini-batch aware L2 (Eq. 7): λ·w_j/n_j on the rows a mini-batch touched
    difacto  DiFacto's frequency-proportional L2 (arXiv v1 Eq. 11): λ·n_j·w_j on touched rows
    l2       ordinary L2 over whole tables (Eq. 5): every row, every step (O(table) per step)
    dropout  discard 50 % of each training sample's feature ids (`IdDropout`, data level)
    filter   keep only the K most frequent ids per table, the rest become OOV (`IdFilter`)

The gradient regularizers are callables `(table, ids, weight_rows, grad_rows) -> grad_rows`
applied by `RowWiseOptimizer`: ids (U,) global row ids, weight_rows and grad_rows (U, dim). The
data-level ones rewrite batches of ids before the model sees them (`din_ray.train` applies them).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from din_ray.schema import NUM_RESERVED_IDS, OOV_ID, PAD_ID, Schema

Regularizer = Callable[[str, Tensor, Tensor, Tensor], Tensor]


class MiniBatchAware:
    """Mini-batch aware L2 (paper §5.1, Eq. 7): grad_j += λ · (α_mj / n_j) · w_j.

    α_mj = 1 exactly for the rows touched in mini-batch m, which are the rows this is called
    with, so the cost grows with the touched rows, never with the table. n_j is the number of
    training samples containing id j (`counts.npz` of the prepared data). Tables without counts
    (e.g. per-id biases derived from a feature) use the counts of the table they are named after
    (`item_id.bias` -> `item_id`).

    Args:
        lam: λ (the paper uses 0.01).
        counts: table -> (vocab_size,) int64 n_j.
    """

    def __init__(self, lam: float, counts: dict[str, np.ndarray]) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = lam
        # 1/n_j, with unseen ids (n_j = 0, e.g. OOV) treated as seen once.
        self.inv_counts = {t: torch.from_numpy(1.0 / np.maximum(c, 1)).float()
                           for t, c in counts.items()}

    def _inv(self, table: str) -> Tensor:
        inv = self.inv_counts.get(table)
        if inv is None:
            inv = self.inv_counts.get(table.split(".", 1)[0])
        if inv is None:
            raise KeyError(f"no id counts for table {table!r}; have {sorted(self.inv_counts)}")
        return inv

    def to(self, device: torch.device | str) -> MiniBatchAware:
        """Keep the counts on the tables' device (the training loop calls this once), so a step
        indexes them where the ids are."""
        self.inv_counts = {t: c.to(device) for t, c in self.inv_counts.items()}
        return self

    def __call__(self, table: str, ids: Tensor, rows: Tensor, grad: Tensor) -> Tensor:
        return grad + self.lam * self._inv(table)[ids].unsqueeze(-1) * rows


class DiFacto(MiniBatchAware):
    """DiFacto's adaptive L2 (arXiv v1 Eq. 11): grad_j += λ · n_j · w_j on touched rows.

    The opposite weighting of MBA: frequent ids are penalised most. Same counts, same cost.
    """

    def __init__(self, lam: float, counts: dict[str, np.ndarray]) -> None:
        super().__init__(lam, counts)
        # Reuse MBA's lookup (with its derived-table fallback) on n_j instead of 1/n_j.
        self.inv_counts = {t: torch.from_numpy(np.asarray(c, dtype=np.float32))
                           for t, c in counts.items()}


class WholeTableL2:
    """Ordinary L2 over whole tables (Eq. 5), for comparison with MBA.

    Every row j of every table gets grad_j += (λ / S) · w_j at every step, S = steps per epoch:
    Eq. 5's λ‖W‖² spread evenly over an epoch's mini-batches, i.e. exactly the objective that MBA
    (Eq. 6/7) approximates by touching only the rows in the batch. Untouched rows therefore get an
    optimizer update too, so a step costs O(table rows), which is the point of the comparison
    (`benchmarks/mba_cost.py`). Note that with Adam the update of an untouched row is
    scale-free (about lr·sign(w_j)), so rare ids shrink fast whatever λ is.
    """

    whole_tables = True

    def __init__(self, lam: float, steps_per_epoch: int = 1) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.lam = lam
        self.coef = lam / steps_per_epoch

    def __call__(self, table: str, ids: Tensor, rows: Tensor, grad: Tensor) -> Tensor:
        return grad + self.coef * rows

    def to(self, device: torch.device | str) -> WholeTableL2:
        return self  # holds no tensors

    @staticmethod
    def expand(tables, gradients: dict[str, tuple[Tensor, Tensor]]
               ) -> dict[str, tuple[Tensor, Tensor]]:
        """Touched-row gradients -> gradients over every row this worker owns (zeros where the
        batch did not touch a row), so the optimizer and `__call__` visit the whole table.

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
                      steps_per_epoch: int = 1) -> Regularizer | None:
    """The gradient regularizer for `--reg name`; None for none/dropout/filter or λ = 0."""
    if name not in REGULARIZERS:
        raise ValueError(f"reg must be one of {REGULARIZERS}, got {name!r}")
    if name not in GRADIENT_REGULARIZERS or lam == 0:
        return None
    if name == "mba":
        return MiniBatchAware(lam, counts)
    if name == "difacto":
        return DiFacto(lam, counts)
    return WholeTableL2(lam, steps_per_epoch)
