"""Real multi-process torch.distributed (gloo) runs for the sharding and Ray tests.

`spawn(fn, world, tmp)` starts `world` processes that join one gloo group and each run
`fn(rank, world, *args)`; their return values come back in rank order. The worker functions below
are module-level so spawned processes can import them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from din_ray import checkpoint as ckpt
from din_ray.data.format import PreparedDataset
from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.regularization import build_regularizer
from din_ray.embeddings.sharding import ShardedEmbeddingTables, embedding_group
from din_ray.embeddings.tables import EmbeddingTables, IdRangeError, TableSpec, row_block
from din_ray.model import build_model
from din_ray.train.loop import (
    TrainConfig,
    WorkerEnv,
    forward,
    table_counts,
    tables_without_counts,
    to_torch,
    train_loop,
)


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, tmp: Path, *args) -> list:
    """Run fn(rank, world, *args) in `world` gloo processes; their results in rank order."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    init_file = tmp / f"init-{os.getpid()}-{world}"
    init_file.unlink(missing_ok=True)
    mp.start_processes(_entry, args=(world, str(init_file), str(tmp), fn, args), nprocs=world,
                       start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def equivalence_config(data: Path, **overrides) -> TrainConfig:
    """PReLU (Dice normalises with per-worker batch statistics, like BatchNorm under DDP, so
    it is not equivalent to one worker on the global batch) and no dropout."""
    values = dict(data=str(data), activation="prelu", dropout=0.0, embedding_dim=4,
                  attention_hidden=(8, 4), mlp_hidden=(16, 8), lam=0.05, lr=0.01)
    values.update(overrides)
    return TrainConfig(**values)


def train_steps(rank: int, world: int, data: str, replicate_below: int, steps: int,
                global_batch: int, ckpt_dir: str | None = None) -> dict:
    """Train `steps` steps on the first global batches of the training split; this rank takes
    its contiguous share of each. world == 1 runs without any process group (whole tables).

    Returns the global loss of every step, the dense state, this rank's row block of every table
    and the embedding bytes held here."""
    cfg = equivalence_config(Path(data), replicate_below=replicate_below)
    dataset = PreparedDataset.open(data)
    schema = dataset.schema.with_embedding_dim(cfg.embedding_dim)
    torch.manual_seed(cfg.seed)
    model = build_model(schema, cfg.model_config())
    if world == 1:
        tables, dense = EmbeddingTables(model.table_specs(), seed=cfg.seed), model
    else:
        tables = ShardedEmbeddingTables(model.table_specs(), rank, world, seed=cfg.seed,
                                        replicate_below=replicate_below, group=embedding_group())
        dense = torch.nn.parallel.DistributedDataParallel(model)
    dense_opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sparse_opt = RowWiseOptimizer(tables, "adam", lr=cfg.lr, reg_form=cfg.reg_form)
    rows = dataset.read_split("train")
    counts = {**dataset.counts(), **table_counts(model, tables_without_counts(
        model, dataset.counts()), iter([rows]))}
    regularizer = build_regularizer("mba", cfg.lam, counts, global_batch=global_batch)
    share = global_batch // world
    losses = []
    for step in range(steps):
        lo = step * global_batch + rank * share
        batch = to_torch({k: v[lo:lo + share] for k, v in rows.items()})
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            forward(dense, tables, batch), batch[schema.label])
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        sparse_opt.step(tables.touched_gradients(), regularizer)
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
        losses.append(float(global_loss) / world)
    if ckpt_dir is not None:
        ckpt.write_worker_files(ckpt_dir, tables, sparse_opt)
        if world > 1:
            dist.barrier()
        if rank == 0:
            ckpt.write_manifest(ckpt_dir, schema=schema, config=cfg.to_dict(), metrics={},
                                dense={"model": model.state_dict()}, specs=tables.specs,
                                world_size=world, vocab_dir=dataset.root / "vocab")
    blocks = {}
    for name, spec in tables.specs.items():
        start, end = row_block(spec.num_rows, rank, world)
        held = tables.blocks[name][0]
        blocks[name] = (start, end, tables.weight(name)[start - held:end - held].clone())
    return {"losses": losses, "dense": model.state_dict(), "blocks": blocks,
            "memory_bytes": tables.memory_bytes()}


def lookup_bad_ids(rank: int, world: int, cases: list[tuple[int, str, int]]) -> list[str]:
    """One lookup per case (bad_rank, table, bad_id), in which only `bad_rank` asks `table` for
    `bad_id`; the other ranks' ids are fine. Returns the error this rank raised in each lookup
    ("" when it raised none): the ranks stay in step only if they all fail together."""
    specs = {"item_id": TableSpec("item_id", 200, 4), "cate_id": TableSpec("cate_id", 12, 4)}
    tables = ShardedEmbeddingTables(specs, rank, world, replicate_below=50,
                                    group=embedding_group())  # item sharded, cate replicated
    errors = []
    for bad_rank, table, bad_id in cases:
        ids = {name: torch.tensor([[3, 5], [7, 0]]) for name in specs}
        if rank == bad_rank:
            ids[table][1, 0] = bad_id
        try:
            tables.lookup({f"hist_{n}": (n, i) for n, i in ids.items()}, where="valid split")
            errors.append("")
        except IdRangeError as e:
            errors.append(str(e))
    return errors


def stitch(results: list[dict]) -> dict[str, torch.Tensor]:
    """Whole tables from the row blocks of every rank's `train_steps` result."""
    out = {}
    for name in results[0]["blocks"]:
        parts = sorted((r["blocks"][name] for r in results), key=lambda b: b[0])
        out[name] = torch.cat([p[2] for p in parts])
    return out


def predict_checkpoint(rank: int, world: int, checkpoint: str, data: str,
                       split: str = "test") -> np.ndarray:
    """Restore `checkpoint` into `world` workers (sharded tables), predict `split` (each rank its
    contiguous share, in one lookup) and gather: probabilities of the whole split, in order."""
    c = ckpt.Checkpoint.open(checkpoint)
    cfg = TrainConfig.from_dict(c.config)
    model = build_model(c.schema, cfg.model_config())
    model.load_state_dict(c.dense_state()["model"])
    tables = ShardedEmbeddingTables(model.table_specs(), rank, world,
                                    replicate_below=cfg.replicate_below, group=embedding_group())
    c.restore_tables(tables)
    model.eval()
    tables.eval()
    rows = PreparedDataset.open(data).read_split(split)
    n = len(rows[c.schema.label])
    lo, hi = row_block(n, rank, world)
    with torch.no_grad():
        probs = torch.sigmoid(forward(model, tables, to_torch({k: v[lo:hi]
                                                               for k, v in rows.items()})))
    parts: list = [None] * world
    dist.all_gather_object(parts, probs.numpy())
    return np.concatenate(parts)


class GlooEnv(WorkerEnv):
    """`train.WorkerEnv` over the spawned gloo group, the collectives as `RayEnv` does them:
    this rank's contiguous share of each global training batch, its contiguous block of each
    evaluation split (both ranks always evaluate rows), DDP, sharded tables, checkpoints of
    every epoch written by all ranks into `out/epoch-NNNN`. Buffers sync through the inherited
    `WorkerEnv.sync_buffers`, which `RayEnv` inherits too."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, out: str) -> None:
        self.cfg, self.rank, self.world_size, self.out = cfg, rank, world, Path(out)
        self.dataset = PreparedDataset.open(cfg.data)

    def train_batches(self, epoch: int):
        rows = self.dataset.read_split("train")
        n, share = len(rows[self.dataset.schema.label]), self.cfg.batch_size
        for lo in range(0, n - share * self.world_size + 1, share * self.world_size):
            yield {k: v[lo + self.rank * share:lo + (self.rank + 1) * share]
                   for k, v in rows.items()}

    def eval_batches(self, split: str):
        rows = self.dataset.read_split(split)
        lo, hi = row_block(len(rows[self.dataset.schema.label]), self.rank, self.world_size)
        yield {k: v[lo:hi] for k, v in rows.items()}

    def make_tables(self, model, cfg):
        return ShardedEmbeddingTables(model.table_specs(), self.rank, self.world_size,
                                      seed=cfg.seed, replicate_below=cfg.replicate_below,
                                      group=embedding_group())

    def wrap_dense(self, model):
        return torch.nn.parallel.DistributedDataParallel(model)

    def gather(self, arrays):
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, arrays)
        return {k: np.concatenate([p[k] for p in parts]) for k in arrays}

    def all_reduce_sum(self, tensor):
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    def report(self, metrics, write_checkpoint) -> None:
        write_checkpoint(self.out / f"epoch-{metrics['epoch']:04d}")
        dist.barrier()


def train_loop_gloo(rank: int, world: int, cfg: dict, out: str) -> dict:
    """`train.train_loop` in this gloo process; returns its summary (the same on every rank)."""
    cfg = TrainConfig.from_dict(cfg)
    return train_loop(cfg, GlooEnv(cfg, rank, world, out))
