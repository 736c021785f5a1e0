"""Embedding tables updated row by row, laid out for row-wise sharding: the sparse half of
every CTR model.

A model says which tables it needs (`TableSpec`s) and which ids to look up in them
(`SparseRequests`); `EmbeddingTables` holds the rows and answers the lookups. Each table is split
into contiguous row blocks, one per worker (`row_block`); a worker stores only its block. A lookup
deduplicates the ids of every request that uses a table, fetches those rows once (from the
owners, when sharded; see `din_ray.embeddings.sharding`), and scatters them back to the requests'
shapes. In training the fetched rows are a fresh leaf tensor, so after `backward()` its
`.grad` holds exactly one gradient row per touched id: the optimizer then updates only those rows,
and the regularizer (MBA, Eq. 7) sees exactly the mini-batch's touched set (the optimizer is
`din_ray.embeddings.optim.RowWiseOptimizer`). Nothing here costs O(table size) per step.

With one worker this is an ordinary (but sparse-updated) embedding collection.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from din_ray.schema import PAD_ID

SparseRequests = dict[str, tuple[str, Tensor]]  # lookup key -> (table name, ids of any shape)


@dataclass(frozen=True)
class TableSpec:
    """An embedding table: `num_rows` ids of width `dim`; row PAD_ID is kept at zero.

    `zero_init` starts every row at zero (per-id bias terms) instead of small random values.
    """

    name: str
    num_rows: int
    dim: int
    zero_init: bool = False


# --- row gather ---------------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """`src.index_select(0, index)` whose backward sums the gradient rows with one vectorised
    scatter_add. (On CPU the backward of index_select, index_add_, loops over the indices one
    slice at a time, and that of `src[index]` goes through a slower accumulating index_put; with
    B·L ≈ 50k history slots per batch either one costs more than the whole model.)"""

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = src.shape[0]
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        grad = grad.contiguous()
        out = grad.new_zeros(ctx.rows, *grad.shape[1:])
        flat = out.view(ctx.rows, -1)
        flat.scatter_add_(0, index.unsqueeze(1).expand(-1, flat.shape[1]),
                          grad.view(grad.shape[0], -1))
        return out, None


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """Rows `index` (N,) of `src` (R, ...) -> (N, ...), differentiable in `src`; any index may
    repeat (its gradient rows are summed)."""
    if not (src.requires_grad and torch.is_grad_enabled()):
        return src.index_select(0, index)
    return _GatherRows.apply(src, index)


# Rows are initialised in fixed chunks, each from its own seed, so a row's initial value depends
# only on (seed, table, row) and not on how many workers share the table.
INIT_CHUNK_ROWS = 1 << 16


def row_block(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The [start, end) rows owned by `rank`: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def chunk_seed(seed: int, table: str, chunk: int) -> int:
    """The generator seed of one chunk of one table: a stable hash of the run seed, the whole
    table name and the chunk, the same in every process and Python version (Python's `hash()`
    of a str is salted per process; the name's first bytes alone gave `cms_segid` and
    `cms_group_id` identical rows)."""
    key = f"{seed}\0{table}\0{chunk}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def init_rows(spec: TableSpec, start: int, end: int, seed: int, std: float) -> Tensor:
    """N(0, std²) initial values of rows [start, end) of `spec`, PAD row zero.

    Returns: (end - start, dim)
    """
    if spec.zero_init:
        return torch.zeros(end - start, spec.dim)
    out = torch.empty(end - start, spec.dim)
    for chunk in range(start // INIT_CHUNK_ROWS, math.ceil(end / INIT_CHUNK_ROWS)):
        c0, c1 = chunk * INIT_CHUNK_ROWS, min((chunk + 1) * INIT_CHUNK_ROWS, spec.num_rows)
        gen = torch.Generator().manual_seed(chunk_seed(seed, spec.name, chunk))
        values = torch.randn(c1 - c0, spec.dim, generator=gen) * std
        lo, hi = max(c0, start), min(c1, end)
        out[lo - start:hi - start] = values[lo - c0:hi - c0]
    if start <= PAD_ID < end:
        out[PAD_ID - start] = 0.0
    return out


def unique_ids(ids: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """`torch.unique(ids, return_inverse=True)` for ids in [0, num_rows): the sorted unique ids
    (U,) and the position of each id among them (N,).

    When the table has at most 4 rows per id a presence bitmap over the rows replaces the sort:
    O(N + num_rows) instead of O(N log N), and no parallel sort (a DIN batch holds B·(L+1) ids,
    most of them repeats and PAD). Larger tables keep the sort, so no step costs O(table size).
    """
    if ids.numel() == 0 or num_rows > 4 * ids.numel():
        return torch.unique(ids, return_inverse=True)
    present = torch.zeros(num_rows, dtype=torch.bool, device=ids.device)
    present[ids] = True
    position = torch.cumsum(present, 0) - 1  # (num_rows,) rank of each present row
    return present.nonzero().squeeze(1), position.index_select(0, ids)


class IdRangeError(ValueError):
    """An id outside [0, rows) of its embedding table."""

    def __init__(self, table: str, keys: list[str], value: int, num_rows: int, where: str = "",
                 rank: int | None = None) -> None:
        at = f"{where}: " if where else ""
        on = f" on rank {rank}" if rank is not None else ""
        super().__init__(f"{at}embedding table {table!r} (inputs {', '.join(keys)}) got id "
                         f"{value}{on}, outside its rows [0, {num_rows}); ids must come from "
                         f"the table's vocabulary (PAD = {PAD_ID})")
        self.table, self.value = table, value


def first_out_of_range(ids: Tensor, num_rows: int) -> int | None:
    """The smallest id if it is negative, else the largest if it is >= num_rows, else None.

    One min/max pass over the ids (N,), so a lookup pays O(N), never O(table)."""
    if ids.numel() == 0:
        return None
    low, high = torch.aminmax(ids)
    if int(low) < 0:
        return int(low)
    if int(high) >= num_rows:
        return int(high)
    return None


@dataclass
class TouchedRows:
    """What one training step touched in one table, as seen by the table's owner.

    ids: (U,) global row ids owned here, unique; rows: (U, dim) their values as used in forward,
    a leaf whose .grad the backward pass fills.
    """

    ids: Tensor
    rows: Tensor


class EmbeddingTables(torch.nn.Module):
    """All embedding tables of a model, holding this worker's row block of each.

    Args:
        specs: tables by name (from `CTRModel.table_specs()`).
        rank, world_size: this worker's place; (0, 1) holds whole tables.
        seed: initialisation seed (rows are identical for any world size).
        init_std: standard deviation of initial values.

    The weights are buffers (they appear in `state_dict` but not in `parameters()`), so DDP and
    dense optimizers leave them alone; `RowWiseOptimizer` updates them.
    """

    def __init__(self, specs: dict[str, TableSpec], rank: int = 0, world_size: int = 1,
                 seed: int = 0, init_std: float = 0.01) -> None:
        super().__init__()
        self.specs = dict(specs)
        self.rank, self.world_size = rank, world_size
        self.blocks: dict[str, tuple[int, int]] = {}
        for name, spec in self.specs.items():
            if spec.num_rows < world_size:
                raise ValueError(f"table {name!r} has {spec.num_rows} rows, fewer than "
                                 f"{world_size} workers to shard it over")
            start, end = row_block(spec.num_rows, rank, world_size)
            self.blocks[name] = (start, end)
            self.register_buffer(_buffer(name), init_rows(spec, start, end, seed, init_std))
        self.touched: dict[str, TouchedRows] = {}

    def weight(self, table: str) -> Tensor:
        """This worker's block of `table`. -> (end-start, dim)"""
        return getattr(self, _buffer(table))

    def lookup(self, requests: SparseRequests, where: str = "") -> dict[str, Tensor]:
        """Embed every request. Each table is read once, for its deduplicated ids.

        Args:
            requests: key -> (table, ids) with ids of any shape S.
            where: what the ids come from (e.g. "valid split"), named in the error raised for
                an id outside its table.
        Returns: key -> vectors of shape S + (dim,); PAD ids give zero vectors.
        Raises: IdRangeError naming the table, the request keys, `where` and the id, for an id
            outside [0, rows) of its table (checked before any row is read or exchanged).
        """
        by_table: dict[str, list[str]] = {}
        for key, (table, _) in requests.items():
            if table not in self.specs:
                raise KeyError(f"request {key!r} names unknown table {table!r}")
            by_table.setdefault(table, []).append(key)
        flats = {table: torch.cat([requests[k][1].reshape(-1) for k in keys]).long()
                 for table, keys in by_table.items()}
        self._check_ids(flats, by_table, where)
        out: dict[str, Tensor] = {}
        self.touched = {}
        for table, keys in by_table.items():
            flat = flats[table]
            unique, inverse = unique_ids(flat, self.specs[table].num_rows)
            vectors = self._fetch(table, unique)  # (U, dim)
            dim = self.specs[table].dim
            gathered = gather_rows(vectors, inverse)  # (sum of request sizes, dim)
            # One split, not a slice per request: the backward of each slice writes its
            # gradient into a zero tensor of the whole gathered size, and those are summed;
            # a split's backward concatenates the parts once.
            parts = gathered.split([requests[k][1].numel() for k in keys])
            for k, part in zip(keys, parts):
                # (explicit width: an empty batch, S = (0, ...), cannot infer -1)
                out[k] = part.reshape(*requests[k][1].shape, dim)
        return out

    def _check_ids(self, flats: dict[str, Tensor], keys: dict[str, list[str]],
                   where: str) -> None:
        """Raise IdRangeError for the first table whose ids leave [0, rows). Without it an id
        of -1 would silently read the last row (negative indexing)."""
        for table, flat in flats.items():
            bad = first_out_of_range(flat, self.specs[table].num_rows)
            if bad is not None:
                raise IdRangeError(table, keys[table], bad, self.specs[table].num_rows, where)

    def _fetch(self, table: str, unique: Tensor) -> Tensor:
        """Rows for sorted unique global ids (U,) -> (U, dim). Single-worker version; the sharded
        subclass exchanges ids and rows with their owners."""
        return self.read_local(table, unique)

    def read_local(self, table: str, unique: Tensor) -> Tensor:
        """Rows of sorted unique global ids (U,) that this worker holds -> (U, dim). In training
        they are a fresh leaf recorded in `touched`, so backward fills one gradient row per id."""
        start, _ = self.blocks[table]
        rows = self.weight(table)[unique - start]
        if torch.is_grad_enabled() and self.training:
            rows = rows.detach().requires_grad_(True)
            self.touched[table] = TouchedRows(unique, rows)
        return rows

    def touched_gradients(self) -> dict[str, tuple[Tensor, Tensor]]:
        """After backward: table -> (owned unique ids (U,), summed gradient rows (U, dim)).

        PAD is dropped: its row stays zero."""
        out = {}
        for table, t in self.touched.items():
            if t.rows.grad is None:
                continue
            keep = t.ids != PAD_ID
            out[table] = (t.ids[keep], t.rows.grad[keep])
        return out

    def set_rows(self, table: str, values: Tensor) -> None:
        """Overwrite this worker's whole block of `table` with rows [start, end) of `values`
        (a full-table tensor); used by counting models such as the popularity baseline."""
        start, end = self.blocks[table]
        self.weight(table).copy_(values[start:end])

    def memory_bytes(self) -> int:
        return sum(self.weight(t).numel() * self.weight(t).element_size() for t in self.specs)


def _buffer(table: str) -> str:
    return "table__" + table.replace(".", "__")
