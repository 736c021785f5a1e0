"""Row-wise sharded embedding tables over torch.distributed (gloo on CPU, NCCL on GPU).

Every worker owns a contiguous row block of each large table (`row_block`), torchrec-style
(`rw_sharding`): a lookup is input-dist, local lookup, output-dist.

    1. input dist   each worker deduplicates its ids per table, buckets them by owner
                    (searchsorted on the block starts), and sends them with `all_to_all_single`
                    (counts first, then ids);
    2. lookup       each owner deduplicates the union of what it was sent (that union is the
                    global mini-batch's touched set for its block, which MBA needs) and reads those
                    rows into a fresh grad-requiring leaf;
    3. output dist  the rows go back with `_AllToAll`, an autograd-aware all-to-all whose
                    backward sends the gradients back along the same routes with the split sizes
                    swapped. (`dist.all_to_all_single` alone is invisible to autograd: the
                    gradient would silently stop at the exchange.)

After `backward()` the owner's leaf holds, per owned touched id, the sum over workers of the
gradient of each worker's local mean loss. Dividing by the world size gives the gradient of the
global mean loss (DDP averages the dense gradients the same way), so N workers fed the halves of a
global batch make the same update as one worker fed the whole batch.

Small tables (fewer than `replicate_below` rows) are replicated instead: the exchange would cost
more than it saves. Each worker reads them locally; after backward the touched-row gradients and a
touched flag of every replicated table are summed over workers in one all-reduce, so every replica
applies the identical update to the identical row set (the union of touched rows), and stays
equal to the single-worker table.

The collectives run on a process group of their own (`embedding_group`) so they never interleave
with DDP's gradient all-reduces on the default group. Every worker must call `lookup` equally
often with the same tables (an empty id list is fine); the training and evaluation loops keep the
workers in lockstep for that.

This module imports torch only (never Ray): `din_ray.train.distributed` wires it into Ray Train, and the
tests run it with torch.multiprocessing + gloo.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor

from din_ray.embeddings.tables import (
    EmbeddingTables,
    IdRangeError,
    TouchedRows,
    _buffer,
    first_out_of_range,
    init_rows,
    row_block,
)
from din_ray.model.din import TableSpec
from din_ray.schema import PAD_ID

log = logging.getLogger(__name__)

# Tables with fewer rows than this are replicated on every worker. Bias tables and category-like
# tables of the public datasets (tens to hundreds of rows) fall below it; item and user tables
# (thousands to millions of rows) are sharded. 0 shards every table.
DEFAULT_REPLICATE_BELOW = 1024

SHARDED, REPLICATED = "row_wise", "replicated"


def plan_tables(specs: dict[str, TableSpec], world_size: int,
                replicate_below: int = DEFAULT_REPLICATE_BELOW) -> dict[str, str]:
    """Placement of each table: `SHARDED` (row-wise) or `REPLICATED`.

    Raises ValueError naming the table when a sharded table has fewer rows than workers (a block
    would be empty); lower `world_size` or raise `replicate_below` above the table's rows.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if replicate_below < 0:
        raise ValueError(f"replicate_below must be >= 0, got {replicate_below}")
    plan = {}
    for name, spec in specs.items():
        plan[name] = REPLICATED if spec.num_rows < replicate_below else SHARDED
        if plan[name] == SHARDED and spec.num_rows < world_size:
            raise ValueError(
                f"table {name!r} has {spec.num_rows} rows, fewer than the {world_size} workers to "
                f"shard it over; use at most {spec.num_rows} workers or replicate it "
                f"(replicate_below > {spec.num_rows})")
    return plan


def embedding_group() -> dist.ProcessGroup:
    """A process group for the embedding exchanges, same backend as the default group.

    Collective: every rank must call it, in the same order relative to other group creations.
    """
    return dist.new_group(backend=dist.get_backend())


class _AllToAll(torch.autograd.Function):
    """all_to_all_single on the first dimension, differentiable.

    forward: x (sum(in_splits), ...) -> (sum(out_splits), ...);
    backward: the reverse exchange of the gradient (splits swapped).
    """

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup) -> Tensor:
    """Differentiable all-to-all of the rows of `x`: in_splits[r] rows go to rank r, and
    out_splits[r] rows arrive from rank r. -> (sum(out_splits), ...)"""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ShardedEmbeddingTables(EmbeddingTables):
    """`EmbeddingTables` whose large tables are row-wise sharded over a process group.

    Args:
        specs: tables by name (from `CTRModel.table_specs()`).
        rank, world_size: this worker's place in `group`.
        seed, init_std: as `EmbeddingTables`; initial rows are identical for any world size.
        replicate_below: tables with fewer rows are replicated (see `plan_tables`).
        group: process group for the exchanges (`embedding_group()`); None = the default group.

    `blocks[name]` is the worker's own row range: its `row_block` for sharded tables, all rows for
    replicated ones. `memory_bytes()` counts what this worker holds.
    """

    def __init__(self, specs: dict[str, TableSpec], rank: int, world_size: int, seed: int = 0,
                 init_std: float = 0.01, replicate_below: int = DEFAULT_REPLICATE_BELOW,
                 group: dist.ProcessGroup | None = None) -> None:
        self.plan = plan_tables(specs, world_size, replicate_below)
        sharded = {n: s for n, s in specs.items() if self.plan[n] == SHARDED}
        super().__init__(sharded, rank, world_size, seed, init_std)
        for name, spec in specs.items():
            if self.plan[name] == REPLICATED:
                self.blocks[name] = (0, spec.num_rows)
                self.register_buffer(_buffer(name),
                                     init_rows(spec, 0, spec.num_rows, seed, init_std))
        self.specs = dict(specs)  # the caller's order: every rank iterates tables identically
        self.group = group
        for name, spec in sharded.items():
            starts = [row_block(spec.num_rows, r, world_size)[0] for r in range(world_size)]
            self.register_buffer(_starts_name(name), torch.tensor(starts), persistent=False)
        log.debug("rank %d tables: %s", rank,
                  {n: (p, self.blocks[n]) for n, p in self.plan.items()})

    def _check_ids(self, flats: dict[str, Tensor], keys: dict[str, list[str]],
                   where: str) -> None:
        """Range-check every table's ids on every rank before the first exchange, and fail on
        all ranks together: a rank that raised alone would leave the others waiting in the
        next collective. One all-reduce of a (world, tables, 2) report per lookup; each rank
        fills its own row with (bad?, id) per table, the sum is everyone's report."""
        if self.world_size == 1:
            return super()._check_ids(flats, keys, where)
        names = [n for n in self.specs if n in flats]  # the same order on every rank
        device = next(iter(flats.values())).device if flats else None
        report = torch.zeros(self.world_size, len(names), 2, dtype=torch.int64, device=device)
        for i, name in enumerate(names):
            bad = first_out_of_range(flats[name], self.specs[name].num_rows)
            if bad is not None:
                report[self.rank, i, 0], report[self.rank, i, 1] = 1, bad
        dist.all_reduce(report, group=self.group)
        flagged = torch.nonzero(report[:, :, 0]).tolist()  # [(rank, table index)], rank-major
        if flagged:
            rank, i = flagged[0]
            name = names[i]
            raise IdRangeError(name, keys[name], int(report[rank, i, 1]),
                               self.specs[name].num_rows, where, rank=rank)

    def _fetch(self, table: str, unique: Tensor) -> Tensor:
        """Rows of sorted unique global ids (U,) -> (U, dim), from their owners."""
        if self.plan[table] == REPLICATED:
            return super()._fetch(table, unique)
        n = self.world_size
        starts = getattr(self, _starts_name(table))
        owner = torch.searchsorted(starts, unique, right=True) - 1  # (U,), sorted as `unique` is
        send_counts = torch.bincount(owner, minlength=n)  # (n,)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        requested = unique.new_empty(sum(recv))  # ids other workers (and this one) ask of us
        dist.all_to_all_single(requested, unique.contiguous(), recv, send, group=self.group)
        # The union of all requests: the global batch's touched rows of this block.
        owned, inverse = torch.unique(requested, return_inverse=True)
        start, _ = self.blocks[table]
        rows = self.weight(table)[owned - start]  # (V, dim)
        if torch.is_grad_enabled() and self.training:
            rows = rows.detach().requires_grad_(True)
            self.touched[table] = TouchedRows(owned, rows)
        # Duplicate requests share one leaf row; autograd sums their gradients into it.
        return all_to_all(rows[inverse], send, recv, self.group)  # (U, dim)

    def touched_gradients(self) -> dict[str, tuple[Tensor, Tensor]]:
        """After backward: table -> (ids (U,), gradient rows (U, dim)) of the global mean loss.

        Sharded tables: this worker's owned touched ids. Replicated tables: the union of every
        worker's touched ids, identical on every worker (one all-reduce for all of them).
        PAD is dropped: its row stays zero.
        """
        out = {}
        scale = 1.0 / self.world_size
        for table, (ids, grad) in super().touched_gradients().items():
            if self.plan[table] == SHARDED:
                out[table] = (ids, grad * scale)
        out.update(self._replicated_gradients(scale))
        return out

    def _replicated_gradients(self, scale: float) -> dict[str, tuple[Tensor, Tensor]]:
        names = [n for n in self.specs if self.plan[n] == REPLICATED]
        if not names:
            return {}
        parts = []
        for name in names:
            spec, weight = self.specs[name], self.weight(name)
            dense = torch.zeros(spec.num_rows, spec.dim + 1, dtype=weight.dtype,
                                device=weight.device)  # (rows, dim | touched flag)
            t = self.touched.get(name)
            if t is not None and t.rows.grad is not None:
                dense[t.ids, :-1] = t.rows.grad
                dense[t.ids, -1] = 1.0
            parts.append(dense.reshape(-1))
        flat = torch.cat(parts)
        if self.world_size > 1:
            dist.all_reduce(flat, group=self.group)
        out = {}
        for name, part in zip(names, torch.split(flat, [p.numel() for p in parts])):
            spec = self.specs[name]
            dense = part.reshape(spec.num_rows, spec.dim + 1)  # (rows, dim + 1)
            ids = torch.nonzero(dense[:, -1] > 0).squeeze(-1)
            ids = ids[ids != PAD_ID]
            if ids.numel():
                out[name] = (ids, dense[ids, :-1] * scale)
        return out


def _starts_name(table: str) -> str:
    return "starts__" + table.replace(".", "__")
