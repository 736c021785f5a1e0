"""Row-wise sharded embedding tables over torch.distributed (gloo on CPU, NCCL on GPU).

Every worker owns a contiguous row block of each large table (`row_block`), torchrec-style
(`rw_sharding`). Each placement is one `PlacementLookup` class with torchrec's three steps,
input dist -> lookup -> output dist: `RowWiseLookup` for sharded tables, `ReplicatedLookup` for
small replicated ones; `ShardedEmbeddingTables` routes each table to its placement's lookup.
A row-wise lookup:

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

This module imports torch only (never Ray): `din_ray.train.distributed` wires it into Ray
Train, and the tests run it with torch.multiprocessing + gloo.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor

from din_ray.embeddings.tables import (
    EmbeddingTables,
    IdRangeError,
    TableSpec,
    _buffer,
    first_out_of_range,
    init_rows,
    row_block,
)
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


class PlacementLookup:
    """How the lookups of one placement's tables reach their rows: torchrec's `EmbeddingSharding`
    steps, one subclass per placement.

        input_dist   the ids this worker asked for -> the ids this worker must read, and the route
                     back;
        lookup       read those rows (a grad-requiring leaf in training, see
                     `EmbeddingTables.read_local`);
        output_dist  send the rows back along the route, differentiably.

    `gradients` then turns what backward left in the touched leaves into the update every
    holder of a row applies: the gradient of the global mean loss.

    Args:
        tables: the names of this placement's tables.
        world_size: workers in `group`.
        group: process group of the exchanges; None = the default group.
    """

    def __init__(self, tables: tuple[str, ...], world_size: int,
                 group: dist.ProcessGroup | None) -> None:
        self.tables, self.world_size, self.group = tables, world_size, group

    def fetch(self, owner: EmbeddingTables, table: str, unique: Tensor) -> Tensor:
        """Rows (U, dim) of this worker's sorted unique global ids (U,) of `table`."""
        ids, route = self.input_dist(owner, table, unique)
        return self.output_dist(self.lookup(owner, table, ids), route)

    def input_dist(self, owner: EmbeddingTables, table: str,
                   unique: Tensor) -> tuple[Tensor, object]:
        raise NotImplementedError

    def lookup(self, owner: EmbeddingTables, table: str, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def output_dist(self, rows: Tensor, route: object) -> Tensor:
        raise NotImplementedError

    def gradients(self, owner: EmbeddingTables) -> dict[str, tuple[Tensor, Tensor]]:
        """After backward: table -> (ids (U,), gradient rows (U, dim)) of the global mean loss,
        for this placement's tables; PAD dropped."""
        raise NotImplementedError


class RowWiseLookup(PlacementLookup):
    """Row-wise sharded tables (`SHARDED`): each row lives on the worker whose `row_block` holds
    it, so ids travel to their owners and rows travel back (steps 1-3 of the module docstring).
    """

    def input_dist(self, owner: EmbeddingTables, table: str,
                   unique: Tensor) -> tuple[Tensor, tuple[list[int], list[int]]]:
        """Bucket the sorted unique ids (U,) by owner and exchange them: -> the ids every worker
        asked this one for (sum(recv),), and the (send, recv) split sizes."""
        n = self.world_size
        starts = getattr(owner, _starts_name(table))  # (n,) first row of every worker's block
        rank = torch.searchsorted(starts, unique, right=True) - 1  # (U,), sorted as `unique` is
        send_counts = torch.bincount(rank, minlength=n)  # (n,)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        requested = unique.new_empty(sum(recv))  # ids other workers (and this one) ask of us
        dist.all_to_all_single(requested, unique.contiguous(), recv, send, group=self.group)
        return requested, (send, recv)

    def lookup(self, owner: EmbeddingTables, table: str, ids: Tensor) -> Tensor:
        """Rows of the requested ids (R,) -> (R, dim). The union of all requests is the global
        batch's touched set of this block: one leaf row per owned id, which duplicate requests
        share (autograd sums their gradients into it)."""
        owned, inverse = torch.unique(ids, return_inverse=True)
        return owner.read_local(table, owned)[inverse]

    def output_dist(self, rows: Tensor, route: tuple[list[int], list[int]]) -> Tensor:
        send, recv = route
        return all_to_all(rows, send, recv, self.group)  # (U, dim)

    def gradients(self, owner: EmbeddingTables) -> dict[str, tuple[Tensor, Tensor]]:
        """This worker's owned touched ids: the sum over workers of their local mean losses'
        gradients, divided by the world size."""
        scale = 1.0 / self.world_size
        return {table: (ids, grad * scale)
                for table, (ids, grad) in EmbeddingTables.touched_gradients(owner).items()
                if table in self.tables}


class ReplicatedLookup(PlacementLookup):
    """Replicated tables (`REPLICATED`): every worker holds every row, so a lookup is local and
    the exchange happens once per step, on the gradients: one all-reduce for all these tables,
    so every replica applies the identical update to the identical row set."""

    def input_dist(self, owner: EmbeddingTables, table: str,
                   unique: Tensor) -> tuple[Tensor, None]:
        return unique, None

    def lookup(self, owner: EmbeddingTables, table: str, ids: Tensor) -> Tensor:
        return owner.read_local(table, ids)

    def output_dist(self, rows: Tensor, route: None) -> Tensor:
        return rows

    def gradients(self, owner: EmbeddingTables) -> dict[str, tuple[Tensor, Tensor]]:
        """The union of every worker's touched ids, identical on every worker, with the mean of
        the workers' gradients."""
        if not self.tables:
            return {}
        scale = 1.0 / self.world_size
        parts = []
        for name in self.tables:
            spec, weight = owner.specs[name], owner.weight(name)
            dense = torch.zeros(spec.num_rows, spec.dim + 1, dtype=weight.dtype,
                                device=weight.device)  # (rows, dim | touched flag)
            t = owner.touched.get(name)
            if t is not None and t.rows.grad is not None:
                dense[t.ids, :-1] = t.rows.grad
                dense[t.ids, -1] = 1.0
            parts.append(dense.reshape(-1))
        flat = torch.cat(parts)
        if self.world_size > 1:
            dist.all_reduce(flat, group=self.group)
        out = {}
        for name, part in zip(self.tables, torch.split(flat, [p.numel() for p in parts])):
            spec = owner.specs[name]
            dense = part.reshape(spec.num_rows, spec.dim + 1)  # (rows, dim + 1)
            ids = torch.nonzero(dense[:, -1] > 0).squeeze(-1)
            ids = ids[ids != PAD_ID]
            if ids.numel():
                out[name] = (ids, dense[ids, :-1] * scale)
        return out


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
        # One lookup per placement; sharded tables' gradients first, as `touched_gradients` did.
        self.lookups: dict[str, PlacementLookup] = {
            SHARDED: RowWiseLookup(tuple(sharded), world_size, group),
            REPLICATED: ReplicatedLookup(
                tuple(n for n in self.specs if self.plan[n] == REPLICATED), world_size, group),
        }
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
        """Rows of sorted unique global ids (U,) -> (U, dim), through the table's placement."""
        return self.lookups[self.plan[table]].fetch(self, table, unique)

    def touched_gradients(self) -> dict[str, tuple[Tensor, Tensor]]:
        """After backward: table -> (ids (U,), gradient rows (U, dim)) of the global mean loss.

        Sharded tables: this worker's owned touched ids. Replicated tables: the union of every
        worker's touched ids, identical on every worker (one all-reduce for all of them).
        PAD is dropped: its row stays zero.
        """
        out = {}
        for lookup in self.lookups.values():
            out.update(lookup.gradients(self))
        return out


def _starts_name(table: str) -> str:
    return "starts__" + table.replace(".", "__")

