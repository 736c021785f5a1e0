"""The row-wise optimizer of the embedding tables: Adam or SGD on the rows one step touched.

The tables are buffers, not parameters (`din_ray.embeddings.tables.EmbeddingTables`), so no dense
optimizer sees them; after `backward()` the tables report one summed gradient row per touched id
(`touched_gradients()`), and `RowWiseOptimizer.step` updates exactly those rows, with a row
penalty (`din_ray.embeddings.regularization`, e.g. MBA, Eq. 7) folded in. Its state (Adam's
moments) is shaped like the worker's row block of each table, so it shards with the tables and a
step costs O(touched rows), never O(table).

    tables = EmbeddingTables(model.table_specs())
    optimizer = RowWiseOptimizer(tables, "adam", lr=1e-3)
    loss.backward()
    optimizer.step(tables.touched_gradients(), regularizer)
"""

from __future__ import annotations

import torch
from torch import Tensor

from din_ray.embeddings.tables import EmbeddingTables
from din_ray.schema import PAD_ID


class RowWiseOptimizer:
    """Adam or SGD applied only to the rows a step touched (lazy Adam, as torch.optim.SparseAdam).

    State per table: first and second moments shaped like the worker's block; a global step
    count for bias correction. A regularizer (`din_ray.embeddings.regularization.RowPenalty`,
    e.g. MBA, Eq. 7) gives the penalty gradient p of the touched rows, applied in `reg_form`:

        "coupled"    g <- g + p before the update (Eq. 7 as written; under Adam p is then
                     normalised with g, so a dominating penalty moves a row about lr per touch
                     whatever λ is);
        "decoupled"  w <- update(w, g) - lr · p, p taken at the pre-step weights (AdamW's
                     decoupled weight decay), so the shrinkage stays proportional to λ.

    Under SGD both forms are the same update.

    `lazy=False` (Adam only) updates every row of every table each step, untouched rows with a
    zero gradient, which is torch.optim.Adam on dense tables: O(table) per step, kept for
    comparisons with a plain PyTorch DIN (benchmarks/reference_din.py).
    """

    def __init__(self, tables: EmbeddingTables, kind: str = "adam", lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 reg_form: str = "decoupled", lazy: bool = True) -> None:
        if kind not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {kind!r}")
        if reg_form not in ("decoupled", "coupled"):
            raise ValueError(f"reg_form must be 'decoupled' or 'coupled', got {reg_form!r}")
        self.tables, self.kind, self.lr, self.betas, self.eps = tables, kind, lr, betas, eps
        self.reg_form, self.lazy = reg_form, lazy
        self.step_count = 0
        self.state: dict[str, dict[str, Tensor]] = {}
        if kind == "adam":
            for name in tables.specs:
                w = tables.weight(name)
                self.state[name] = {"exp_avg": torch.zeros_like(w),
                                    "exp_avg_sq": torch.zeros_like(w)}

    @torch.no_grad()
    def step(self, gradients: dict[str, tuple[Tensor, Tensor]], regularizer=None) -> None:
        """Update the rows in `gradients` (table -> (global ids (U,), grad (U, dim))), with the
        penalty of `regularizer` (None: none) in this optimizer's `reg_form`."""
        self.step_count += 1
        if self.kind == "adam" and not self.lazy:
            gradients = self._every_row(gradients)
        for table, (ids, grad) in gradients.items():
            start, _ = self.tables.blocks[table]
            local = ids - start
            weight = self.tables.weight(table)
            # ids are unique: index_select / index_copy_ read and write the rows (cheaper on
            # CPU than advanced indexing and index_put_, whose accumulate path they need not).
            rows = weight.index_select(0, local)
            penalty = regularizer.penalty(table, ids, rows) if regularizer is not None else None
            if penalty is not None and self.reg_form == "coupled":
                grad = grad + penalty
            if self.kind == "sgd":
                new = rows - self.lr * grad
            else:
                b1, b2 = self.betas
                st = self.state[table]
                m = st["exp_avg"].index_select(0, local).mul_(b1).add_(grad, alpha=1 - b1)
                v = (st["exp_avg_sq"].index_select(0, local).mul_(b2)
                     .addcmul_(grad, grad, value=1 - b2))
                st["exp_avg"].index_copy_(0, local, m)
                st["exp_avg_sq"].index_copy_(0, local, v)
                bc1 = 1 - b1 ** self.step_count
                bc2 = 1 - b2 ** self.step_count
                denom = (v / bc2).sqrt_().add_(self.eps)
                new = torch.addcdiv(rows, m, denom, value=-self.lr / bc1)  # one pass, not three
            if penalty is not None and self.reg_form == "decoupled":
                new = new.add_(penalty, alpha=-self.lr)  # in place: `new` is this step's own
            weight.index_copy_(0, local, new)

    def _every_row(self, gradients: dict[str, tuple[Tensor, Tensor]]
                   ) -> dict[str, tuple[Tensor, Tensor]]:
        """Dense Adam: every row of every table (but PAD) with a zero gradient where untouched.
        -> table -> (ids (R,), grad (R, dim)) over the worker's whole block."""
        out = {}
        for table in self.tables.specs:
            start, end = self.tables.blocks[table]
            w = self.tables.weight(table)
            ids = torch.arange(start, end, device=w.device)
            full = torch.zeros_like(w)
            if table in gradients:
                touched, grad = gradients[table]
                full[touched - start] = grad
            keep = ids != PAD_ID
            out[table] = (ids[keep], full[keep])
        return out

    def state_rows(self, table: str) -> dict[str, Tensor]:
        return self.state.get(table, {})
