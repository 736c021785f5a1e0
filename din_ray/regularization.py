"""Regularizers for embedding rows, applied by `RowWiseOptimizer` to the rows a step touched.

A regularizer is a callable `(table, ids, weight_rows, grad_rows) -> grad_rows`:
ids (U,) global row ids touched in the mini-batch, weight_rows and grad_rows (U, dim).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

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

    def __call__(self, table: str, ids: Tensor, rows: Tensor, grad: Tensor) -> Tensor:
        return grad + self.lam * self._inv(table)[ids].unsqueeze(-1) * rows


REGULARIZERS = ("none", "mba")


def build_regularizer(name: str, lam: float, counts: dict[str, np.ndarray]) -> Regularizer | None:
    if name == "none" or lam == 0:
        return None
    if name == "mba":
        return MiniBatchAware(lam, counts)
    raise ValueError(f"reg must be one of {REGULARIZERS}, got {name!r}")
