"""The training loop, written once and run by every worker.

`train_loop(cfg, env)` is the per-worker function: it builds the model and its embedding tables,
trains for `cfg.optim.epochs` epochs with per-epoch exponential learning-rate decay, evaluates the
validation and test splits after every epoch (`EpochReporter`: predictions gathered from all
workers, so metrics equal the single-process values), reports each epoch with a checkpoint,
stops early when the validation GAUC has not improved for `cfg.optim.patience` epochs, and
resumes from the environment's latest checkpoint if there is one. A `closed_form` model (the
popularity baseline) is fitted from counts by `fit_closed_form` instead.

The environment (`din_ray.train.env.WorkerEnv`) is what differs between one process
(`din_ray.train.local`) and Ray Train (`din_ray.train.distributed`): where batches come from,
how tables are sharded, how dense gradients are synchronised and where checkpoints go.

    din-ray train --data runs/ml --model din --epochs 5 --output runs/din
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from din_ray import checkpoint as ckpt
from din_ray.allocator import keep_freed_memory
from din_ray.config import TrainConfig
from din_ray.data.format import PreparedDataset
from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.regularization import (
    GRADIENT_REGULARIZERS,
)
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import CTRModel, build_model
from din_ray.schema import Schema
from din_ray.train.counts import bias_prior, fit_from_counts
from din_ray.train.dense_adam import DenseAdam
from din_ray.train.env import WorkerEnv
from din_ray.train.evaluate import evaluate_split
from din_ray.train.forward import enable_tf32, forward, steps_per_epoch, to_torch
from din_ray.train.regularizers import BatchRegularizer, embedding_regularizer
from din_ray.train.selection import best_index, epochs_since_best, summarize

log = logging.getLogger(__name__)

# Benchmark instrumentation: cfg.extra[STEP_LOSSES_KEY] = a file path makes rank 0 append each
# epoch's per-step losses there as one JSON line (benchmarks/gpu_check.py compares GPU and CPU).
STEP_LOSSES_KEY = "step_losses_file"


class EpochReporter:
    """A worker's record of its run: evaluates each finished epoch on valid and test, keeps the
    history, and reports it to the environment with a checkpoint. Shared by the gradient loop
    (`train_loop`) and the closed-form fit (`fit_closed_form`)."""

    def __init__(self, cfg: TrainConfig, env: WorkerEnv, dataset: PreparedDataset,
                 schema: Schema, model: CTRModel, tables: EmbeddingTables,
                 dense_opt: torch.optim.Optimizer | DenseAdam | None, sparse_opt: RowWiseOptimizer,
                 data_reg: BatchRegularizer) -> None:
        self.cfg, self.env, self.dataset, self.schema = cfg, env, dataset, schema
        self.model, self.tables, self.dense_opt, self.sparse_opt = (model, tables, dense_opt,
                                                                     sparse_opt)
        self.data_reg = data_reg
        self.history: list[dict] = []

    def restore(self, path: Path) -> int:
        """Load a checkpoint of this run; returns its epoch (the history comes with it)."""
        c = ckpt.Checkpoint.open(path)
        state = c.dense_state()
        self.model.load_state_dict(state["model"])
        if self.dense_opt and state["optimizer"]:
            self.dense_opt.load_state_dict(state["optimizer"])
        self.sparse_opt.step_count = int(state["sparse_step"])
        c.restore_tables(self.tables, self.sparse_opt)
        self.history = json.loads(state["history"])
        return int(state["epoch"])

    def write_checkpoint(self, directory: Path, metrics: dict) -> None:
        env, tables, sparse_opt = self.env, self.tables, self.sparse_opt
        digests = ckpt.gather_shard_digests(ckpt.write_worker_files(directory, tables, sparse_opt),
                                            tables.specs, env.world_size, env.all_reduce_sum)
        if env.rank == 0:
            # Host copies: a checkpoint written on GPUs loads anywhere.
            dense = {"model": _on_cpu(self.model.state_dict()),
                     "optimizer": _on_cpu(self.dense_opt.state_dict()) if self.dense_opt else {},
                     "sparse_step": sparse_opt.step_count, "epoch": metrics["epoch"],
                     "history": json.dumps(self.history)}
            remap = self.data_reg.filter.remap if self.data_reg.filter else None
            ckpt.write_manifest(directory, schema=self.schema, config=self.cfg.to_dict(),
                                metrics=metrics, dense=dense, specs=tables.specs,
                                world_size=env.world_size, vocab_dir=self.dataset.root / "vocab",
                                id_remap=remap, shard_digests=digests)

    def close_epoch(self, epoch: int, lr: float, train_loss: float | None, seconds: float,
                    samples: int, data_seconds: float = 0.0) -> None:
        """Evaluate valid and test, append to the history, report with a checkpoint."""
        env, history = self.env, self.history
        # Under DDP each worker's last batch moved its own copy of the running statistics
        # (DDP copies rank 0's buffers only at the next training forward): every worker
        # evaluates with, and the checkpoint holds, rank 0's.
        env.sync_buffers(self.model)
        metrics = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
                   "train_samples": samples, "train_seconds": seconds,
                   "samples_per_s": samples / max(seconds, 1e-9),
                   "data_wait_seconds": data_seconds}
        for split in ("valid", "test"):
            batches = self.data_reg.eval(env.eval_batches(split))
            for k, v in evaluate_split(self.model, self.tables, batches, self.schema, env, split,
                                       self.cfg.execution.precision).items():
                metrics[f"{split}_{k}"] = v
        # 1 when this epoch is now the best (`best_index`), else 0: among the 1s the latest is
        # the current best, which is how Ray's checkpoint retention breaks ties (later wins).
        metrics["new_best"] = float(best_index([*history, metrics]) == len(history))
        history.append(metrics)
        if env.rank == 0:
            log.info("epoch %d: loss %s  valid gauc %.4f  test gauc %.4f  (%.0f samples/s)",
                     epoch, "-" if train_loss is None else f"{train_loss:.4f}",
                     metrics["valid_gauc"], metrics["test_gauc"], metrics["samples_per_s"])
        env.report(metrics, lambda d, m=metrics: self.write_checkpoint(d, m))


def dense_adam(params: list[nn.Parameter], lr: float) -> DenseAdam:
    """Adam over the dense parameters, with torch's fused kernel where the device has one.

    The same update as torch.optim.Adam up to float rounding, and the same state (checkpoints
    load either way). At batch 256 the default (foreach) torch Adam cost 0.5-0.8 ms a step on
    this machine's CPU (per-parameter bias corrections read on the host), the fused kernel
    0.1 ms (benchmarks/train_default.py). `DenseAdam` rather than torch.optim.Adam(fused=True):
    torch.optim's wrappers import torch._dynamo, 2-3 s of every training process's start."""
    return DenseAdam(params, lr=lr)


def train_loop(cfg: TrainConfig, env: WorkerEnv) -> dict:
    """Train on this worker; returns the final metrics (identical on every worker).

    A model that declares `closed_form` (its tables are computed from training-split counts,
    e.g. the popularity baseline) is fitted by `fit_closed_form` instead of gradient steps."""
    if cfg.execution.threads:
        torch.set_num_threads(cfg.execution.threads)
    keep_freed_memory()  # each step's activations reuse the last step's pages
    torch.manual_seed(cfg.optim.seed)
    if env.device.type == "cuda":
        enable_tf32()
    dataset = PreparedDataset.open(cfg.data)
    schema = cfg.training_schema(dataset.schema)
    model = build_model(schema, cfg.model).to(env.device)
    tables = env.make_tables(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    dense_opt = None
    if params:
        dense_opt = (dense_adam(params, cfg.optim.lr) if cfg.optim.optimizer == "adam"
                     else torch.optim.SGD(params, lr=cfg.optim.lr))
    sparse_opt = RowWiseOptimizer(tables, cfg.optim.optimizer, lr=cfg.optim.sparse_rate(),
                                  reg_form=cfg.regularization.reg_form,
                                  lazy=cfg.optim.sparse_adam == "lazy")
    data_reg = BatchRegularizer(cfg, dataset, env.rank)
    run = EpochReporter(cfg, env, dataset, schema, model, tables, dense_opt, sparse_opt,
                        data_reg)
    resume = env.latest_checkpoint()
    if model.closed_form:
        return fit_closed_form(run, resume)
    regularized = cfg.regularization.reg in GRADIENT_REGULARIZERS and cfg.regularization.lam > 0
    prior = {}
    if cfg.optim.bias_init == "popularity" and (resume is None or regularized):
        prior = bias_prior(model, env, cfg)  # the warm start, and the penalty's centre
    regularizer = embedding_regularizer(cfg, model, dataset, env, data_reg, prior)
    if regularizer is not None:
        regularizer = regularizer.to(env.device)
    dense_model = env.wrap_dense(model) if params else model

    start_epoch = 0
    if resume is not None:
        start_epoch = run.restore(resume)
        log.info("resuming from %s at epoch %d", resume, start_epoch)
    else:
        for name, rows in prior.items():
            tables.set_rows(name, rows)  # rows new to init_from keep it
        if cfg.init_from:
            from din_ray.train.warm_start import init_from_checkpoint

            init_from_checkpoint(cfg.init_from, model, tables, dense_opt, sparse_opt,
                                 cfg.model, schema)

    if cfg.optim.eval_at_start and not run.history:
        # "Epoch 0": the model before any update (with bias_init="popularity" it ranks exactly
        # as the popularity baseline), so validation-based selection keeps it when training
        # does not improve on it.
        run.close_epoch(0, 0.0, None, 0.0, 0)
    for epoch in range(start_epoch, cfg.optim.epochs):
        if cfg.optim.patience and epochs_since_best(run.history) >= cfg.optim.patience:
            break
        decay = cfg.optim.lr_decay ** epoch
        lr = cfg.optim.lr * decay
        sparse_opt.lr = cfg.optim.sparse_rate() * decay
        if dense_opt:
            for group in dense_opt.param_groups:
                group["lr"] = lr
        t0 = time.perf_counter()
        train_loss, samples, data_seconds = _train_epoch(
            dense_model, model, tables, dense_opt, sparse_opt, regularizer, env, epoch, cfg,
            dataset, data_reg)
        run.close_epoch(epoch + 1, lr, train_loss, time.perf_counter() - t0, samples,
                        data_seconds)
    return summarize(run.history)


def fit_closed_form(run: EpochReporter, resume: Path | None) -> dict:
    """The training path of a `closed_form` model: one pass counting clicks and impressions of
    the candidate over the training split (summed over workers), its table set from them
    (`model.table_from_counts`), reported as epoch 1. A finished fit resumes as itself."""
    if resume is not None:
        run.restore(resume)
        return summarize(run.history)
    t0 = time.perf_counter()
    train_loss = fit_from_counts(run.model, run.tables, run.env)
    run.close_epoch(1, 0.0, train_loss, time.perf_counter() - t0,
                    run.dataset.num_rows("train"))
    return summarize(run.history)


def _train_epoch(dense_model, model, tables, dense_opt, sparse_opt, regularizer, env, epoch,
                 cfg, dataset, data_reg: BatchRegularizer) -> tuple[float, int, float]:
    """One pass over this worker's training batches. -> (mean loss over all workers, samples
    over all workers, seconds this worker waited for its next batch: the data path's share)."""
    dense_model.train()
    tables.train()
    # The loss is summed on the device and read only at the logging interval: a per-step
    # .item() would make the host wait for every step to finish.
    total_loss = torch.zeros((), dtype=torch.float64, device=env.device)
    seen, steps = 0, 0
    expected = steps_per_epoch(dataset.num_rows("train"), cfg.optim.batch_size, env.world_size)
    t0 = time.perf_counter()
    batches = iter(data_reg.train(env.train_batches(epoch), epoch))
    waited = 0.0
    step_losses: list[Tensor] | None = [] if cfg.extra.get(STEP_LOSSES_KEY) else None
    while True:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - t_wait
        if batch is None:
            break
        t = to_torch(batch, env.device)
        loss = train_step(dense_model, tables, t, dataset.schema.label, dense_opt, sparse_opt,
                          regularizer, cfg.execution.precision, f"train split, epoch {epoch + 1}")
        n = len(batch[dataset.schema.label])
        total_loss += loss.detach().double() * n
        if step_losses is not None:
            step_losses.append(loss.detach())
        seen += n
        steps += 1
        if env.rank == 0 and steps % max(1, expected // 10) == 0:
            elapsed = time.perf_counter() - t0
            log.info("epoch %d: %3.0f%% (%d steps, loss %.4f, %.0f samples/s/worker, %.0f%% of "
                     "the time waiting for data)", epoch + 1, min(100.0, 100.0 * steps / expected),
                     steps, float(total_loss) / seen, seen / elapsed, 100.0 * waited / elapsed)
    if step_losses is not None and env.rank == 0:
        with open(cfg.extra[STEP_LOSSES_KEY], "a") as f:
            f.write(json.dumps(torch.stack(step_losses).cpu().tolist() if step_losses else [])
                    + "\n")
    stats = env.all_reduce_sum(torch.stack([total_loss.cpu(),
                                            torch.tensor(float(seen), dtype=torch.float64)]))
    return float(stats[0] / max(stats[1], 1)), int(stats[1]), waited


def train_step(dense_model: nn.Module, tables: EmbeddingTables, batch: dict[str, Tensor],
               label: str, dense_opt: torch.optim.Optimizer | DenseAdam | None,
               sparse_opt: RowWiseOptimizer, regularizer=None, precision: str = "fp32",
               where: str = "") -> Tensor:
    """One optimisation step on a batch already on the tables' device: forward, backward, the
    dense update, the row-wise update of the touched rows (with `regularizer`, e.g. MBA).

    Nothing here waits for the device except the all-to-all split sizes of sharded tables.
    Returns: the batch's mean loss, a 0-dim tensor on the device.
    """
    logits = forward(dense_model, tables, batch, where, precision)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, batch[label].float())
    if dense_opt:
        dense_opt.zero_grad(set_to_none=True)
    loss.backward()
    if dense_opt:
        dense_opt.step()
    gradients = tables.touched_gradients()
    if getattr(regularizer, "whole_tables", False):  # l2: every row, every step
        gradients = regularizer.expand(tables, gradients)
    sparse_opt.step(gradients, regularizer)
    return loss


def _on_cpu(state):
    """`state` (a state_dict, nested containers of tensors) with every tensor on the host."""
    return torch.utils._pytree.tree_map(
        lambda x: x.detach().cpu() if isinstance(x, Tensor) else x, state)
