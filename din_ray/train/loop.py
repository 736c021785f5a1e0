"""The training loop, written once and run by every worker.

`train_loop(cfg, env)` is the per-worker function: it builds the model and its embedding tables,
trains for `cfg.optim.epochs` epochs with per-epoch exponential learning-rate decay, evaluates the
validation and test splits after every epoch (predictions gathered from all workers, so metrics
equal the single-process values), reports each epoch with a checkpoint, stops early when the
validation GAUC has not improved for `cfg.optim.patience` epochs, and resumes from the environment's
latest checkpoint if there is one.

The environment (`WorkerEnv`, din_ray.train.env) is what differs between running here in one process
(`din_ray.train.local`) and under Ray Train (`din_ray.train.distributed`): where batches come from,
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
from din_ray.embeddings.regularization import (
    GRADIENT_REGULARIZERS,
)
from din_ray.embeddings.tables import EmbeddingTables, RowWiseOptimizer
from din_ray.model.din import Popularity, build_model
from din_ray.train.counts import bias_prior, fit_popularity
from din_ray.train.env import WorkerEnv
from din_ray.train.evaluate import evaluate_split
from din_ray.train.forward import enable_tf32, forward, steps_per_epoch, to_torch
from din_ray.train.regularizers import BatchRegularizer, embedding_regularizer
from din_ray.train.selection import best_index, epochs_since_best, summarize

log = logging.getLogger(__name__)

# Benchmark instrumentation: cfg.extra[STEP_LOSSES_KEY] = a file path makes rank 0 append each
# epoch's per-step losses there as one JSON line (benchmarks/gpu_check.py compares GPU and CPU).
STEP_LOSSES_KEY = "step_losses_file"


def train_loop(cfg: TrainConfig, env: WorkerEnv) -> dict:
    """Train on this worker; returns the final metrics (identical on every worker)."""
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
    counting = isinstance(model, Popularity)
    params = [p for p in model.parameters() if p.requires_grad]
    dense_opt = None
    if params:
        dense_opt = (torch.optim.Adam(params, lr=cfg.optim.lr) if cfg.optim.optimizer == "adam"
                     else torch.optim.SGD(params, lr=cfg.optim.lr))
    sparse_opt = RowWiseOptimizer(tables, cfg.optim.optimizer, lr=cfg.optim.sparse_rate(),
                                  reg_form=cfg.regularization.reg_form)
    data_reg = BatchRegularizer(cfg, dataset, env.rank)
    resume = env.latest_checkpoint()
    regularized = cfg.regularization.reg in GRADIENT_REGULARIZERS and cfg.regularization.lam > 0
    prior = {}
    if cfg.optim.bias_init == "popularity" and not counting and (resume is None or regularized):
        prior = bias_prior(model, env, cfg)  # the warm start, and the penalty's centre
    regularizer = embedding_regularizer(cfg, model, dataset, env, data_reg, prior)
    if regularizer is not None:
        regularizer = regularizer.to(env.device)
    dense_model = env.wrap_dense(model) if params else model

    history: list[dict] = []
    start_epoch = 0
    if resume is not None:
        start_epoch, history = _restore(resume, model, tables, dense_opt, sparse_opt)
        log.info("resuming from %s at epoch %d", resume, start_epoch)
    else:
        for name, rows in prior.items():
            tables.set_rows(name, rows)  # rows new to init_from keep it
        if cfg.init_from:
            from din_ray.train.warm_start import init_from_checkpoint

            init_from_checkpoint(cfg.init_from, model, tables, dense_opt, sparse_opt,
                                 cfg.model, schema)

    def write_checkpoint(directory: Path, metrics: dict) -> None:
        digests = ckpt.gather_shard_digests(ckpt.write_worker_files(directory, tables, sparse_opt),
                                            tables.specs, env.world_size, env.all_reduce_sum)
        if env.rank == 0:
            # Host copies: a checkpoint written on GPUs loads anywhere.
            dense = {"model": _on_cpu(model.state_dict()),
                     "optimizer": _on_cpu(dense_opt.state_dict()) if dense_opt else {},
                     "sparse_step": sparse_opt.step_count, "epoch": metrics["epoch"],
                     "history": json.dumps(history)}
            ckpt.write_manifest(directory, schema=schema, config=cfg.to_dict(), metrics=metrics,
                                dense=dense, specs=tables.specs, world_size=env.world_size,
                                vocab_dir=dataset.root / "vocab",
                                id_remap=data_reg.filter.remap if data_reg.filter else None,
                                shard_digests=digests)

    def close_epoch(epoch: int, lr: float, train_loss: float | None, seconds: float,
                    samples: int, data_seconds: float = 0.0) -> None:
        """Evaluate valid and test, append to the history, report with a checkpoint."""
        # Under DDP each worker's last batch moved its own copy of the running statistics
        # (DDP copies rank 0's buffers only at the next training forward): every worker
        # evaluates with, and the checkpoint holds, rank 0's.
        env.sync_buffers(model)
        metrics = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
                   "train_samples": samples, "train_seconds": seconds,
                   "samples_per_s": samples / max(seconds, 1e-9),
                   "data_wait_seconds": data_seconds}
        for split in ("valid", "test"):
            for k, v in evaluate_split(model, tables, data_reg.eval(env.eval_batches(split)),
                                       schema, env, split, cfg.execution.precision).items():
                metrics[f"{split}_{k}"] = v
        # 1 when this epoch is now the best (`best_index`), else 0: among the 1s the latest is
        # the current best, which is how Ray's checkpoint retention breaks ties (later wins).
        metrics["new_best"] = float(best_index([*history, metrics]) == len(history))
        history.append(metrics)
        if env.rank == 0:
            log.info("epoch %d: loss %s  valid gauc %.4f  test gauc %.4f  (%.0f samples/s)",
                     epoch, "-" if train_loss is None else f"{train_loss:.4f}",
                     metrics["valid_gauc"], metrics["test_gauc"], metrics["samples_per_s"])
        env.report(metrics, lambda d, m=metrics: write_checkpoint(d, m))

    if cfg.optim.eval_at_start and not history and not counting:
        # "Epoch 0": the model before any update (with bias_init="popularity" it ranks exactly
        # as the popularity baseline), so validation-based selection keeps it when training
        # does not improve on it.
        close_epoch(0, 0.0, None, 0.0, 0)
    bad_epochs = epochs_since_best(history)
    epochs = 1 if counting else cfg.optim.epochs
    for epoch in range(start_epoch, epochs):
        if cfg.optim.patience and bad_epochs >= cfg.optim.patience:
            break
        lr = cfg.optim.lr * cfg.optim.lr_decay ** epoch
        sparse_opt.lr = (cfg.optim.sparse_lr or cfg.optim.lr) * cfg.optim.lr_decay ** epoch
        if dense_opt:
            for group in dense_opt.param_groups:
                group["lr"] = lr
        t0 = time.perf_counter()
        data_seconds = 0.0
        if counting:
            train_loss, samples = fit_popularity(model, tables, env), dataset.num_rows("train")
        else:
            train_loss, samples, data_seconds = _train_epoch(
                dense_model, model, tables, dense_opt, sparse_opt, regularizer, env, epoch, cfg,
                dataset, data_reg)
        seconds = time.perf_counter() - t0
        close_epoch(epoch + 1, lr, train_loss, seconds, samples, data_seconds)
        bad_epochs = epochs_since_best(history)
    return summarize(history)


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
               label: str, dense_opt: torch.optim.Optimizer | None, sparse_opt: RowWiseOptimizer,
               regularizer=None, precision: str = "fp32", where: str = "") -> Tensor:
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


def _restore(path: Path, model, tables, dense_opt, sparse_opt) -> tuple[int, list[dict]]:
    c = ckpt.Checkpoint.open(path)
    state = c.dense_state()
    model.load_state_dict(state["model"])
    if dense_opt and state["optimizer"]:
        dense_opt.load_state_dict(state["optimizer"])
    sparse_opt.step_count = int(state["sparse_step"])
    c.restore_tables(tables, sparse_opt)
    return int(state["epoch"]), json.loads(state["history"])
