"""The training loop, written once and run by every worker.

`train_loop(cfg, env)` is the per-worker function: it builds the model and its embedding tables,
trains for `cfg.epochs` epochs with per-epoch exponential learning-rate decay, evaluates the
validation and test splits after every epoch (predictions gathered from all workers, so metrics
equal the single-process values), reports each epoch with a checkpoint, stops early when the
validation GAUC has not improved for `cfg.patience` epochs, and resumes from the environment's
latest checkpoint if there is one.

The environment (`WorkerEnv`) is what differs between running here in one process
(`LocalEnv`, `run_local`) and under Ray Train (`din_ray.train.distributed`): where batches come from,
how tables are sharded, how dense gradients are synchronised and where checkpoints go.

    din-ray train --data runs/ml --model din --epochs 5 --output runs/din
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from din_ray import checkpoint as ckpt
from din_ray import io as atomic
from din_ray.allocator import keep_freed_memory
from din_ray.data.format import PreparedDataset, iter_numpy_batches
from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.regularization import (
    GRADIENT_REGULARIZERS,
    REG_FORMS,
    REGULARIZERS,
    IdDropout,
    IdFilter,
    RowPenalty,
    build_regularizer,
)
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.metrics import evaluate_predictions
from din_ray.model import CTRModel, ModelConfig, Popularity, build_model
from din_ray.schema import PAD_ID, Schema

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
# Benchmark instrumentation: cfg.extra[STEP_LOSSES_KEY] = a file path makes rank 0 append each
# epoch's per-step losses there as one JSON line (benchmarks/gpu_check.py compares GPU and CPU).
STEP_LOSSES_KEY = "step_losses_file"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; crosses the Ray boundary as `asdict(cfg)`.

    Defaults: Adam at 1e-3 with 0.9 decay per epoch follows the paper's Alibaba setup (§6.1);
    embedding 16 per table and batch 256 suit the public datasets on a CPU.
    """

    data: str
    output: str = "runs/train"
    # model
    model: str = "din"
    activation: str = "dice"
    embedding_dim: int = 16
    attention_hidden: tuple[int, ...] = (80, 40)
    mlp_hidden: tuple[int, ...] = (200, 80)
    attention_softmax: bool = False
    pooling: str = "sum"
    ad_bias: bool = True
    dropout: float = 0.0
    smoothing: float = 20.0
    # The attention unit's activation ("" = activation); PReLU: see ModelConfig.
    attention_activation: str = "prelu"
    dice_momentum: float = 0.01
    zero_logit: bool = True  # the MLP's logit layer starts at zero: the logit is the ad bias
    # "popularity": ad bias rows start at the candidate's smoothed training click rate; "zero".
    bias_init: str = "popularity"
    # Evaluate (and checkpoint) the model before training as epoch 0, a candidate for the best.
    eval_at_start: bool = False
    # 0.01, not the reference DIN's 0.05: with PReLU in the attention unit 0.05 gained only
    # 0.0005 validation GAUC on the planted synthetic set and cost 0.009 on ml-latest-small,
    # whose DIN then overfits after one epoch (docs/results.md, "Defaults vs a plain DIN").
    init_std: float = 0.01
    # A checkpoint to start from (din_ray.train.warm_start): weights, rows and optimizer state; tables
    # may have grown since (prepare --vocab-from). "" = a fresh start.
    init_from: str = ""
    # optimisation
    reg: str = "mba"  # one of din_ray.embeddings.regularization.REGULARIZERS
    lam: float = 0.01  # for a global batch of regularization.LAMBDA_BATCH (256) samples
    # How the embedding optimizer applies mba/difacto/l2: "decoupled" (after the update, as
    # AdamW; under Adam λ keeps its meaning) or "coupled" (added to the gradient, Eq. 7 as
    # written). Identical under SGD.
    reg_form: str = "decoupled"
    filter_top_k: int = 0  # reg="filter": ids kept per table (the most frequent)
    id_dropout: float = 0.5  # reg="dropout": share of a sample's ids discarded (paper: 50 %)
    optimizer: str = "adam"
    lr: float = 1e-3
    # Embedding rows: a row moves about lr per touch under Adam and rare ids are touched a few
    # times an epoch, so tables usually need a larger rate than dense layers. 0 = same as lr.
    sparse_lr: float = 0.0
    lr_decay: float = 0.9
    batch_size: int = 256  # per worker: a step's global batch is batch_size * workers
    eval_batch_size: int = 8192
    # False: training reads the split in file order every epoch, so runs at different worker
    # counts can be given the same global batches (the distributed equivalence test does).
    shuffle: bool = True
    epochs: int = 5
    patience: int = 2  # stop after this many epochs without a better validation GAUC; 0 = never
    seed: int = 0
    # execution
    workers: int = 1
    threads: int = 0  # torch intra-op threads per worker; 0 keeps torch's default
    # distributed (Ray Train; see din_ray.train.distributed)
    storage_path: str = ""  # Ray Train storage: local dir or s3:// / gs:// URI; "" = OUTPUT/ray
    run_name: str = "train"  # same storage_path + run_name resumes the run
    address: str = ""  # Ray cluster to join; "" = $RAY_ADDRESS, else start a local Ray
    max_failures: int = 1  # worker-group restarts (from the latest checkpoint) before giving up
    use_gpu: bool = False  # one GPU per worker, NCCL for the embedding exchanges
    device: str = ""  # run_local only: a torch device ("cuda:0"); "" = the CPU
    # "bf16": the dense part (attention unit, MLP) under bf16 autocast; weights, optimizer state
    # and embedding rows stay fp32. "fp32": everything fp32 (TF32 matmuls on CUDA either way).
    precision: str = "fp32"
    # Oversubscribed on small machines on purpose: Ray Data needs CPUs of its own to read.
    cpus_per_worker: float = 1.0
    replicate_below: int = 1024  # tables with fewer rows are replicated, larger ones row-sharded
    # Splits whose Parquet files total less are read once by the driver into Ray's object store
    # and sliced there by every worker, epoch (and Tune trial): a Ray Data pass costs seconds of
    # start-up before its first batch. Larger splits stream through Ray Data (0 = always).
    cache_below_mb: float = 256.0
    extra: dict = field(default_factory=dict)  # free-form, recorded in the checkpoint

    def __post_init__(self) -> None:
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
                  "eval_batch_size": self.eval_batch_size >= 1, "lr": self.lr > 0,
                  "sparse_lr": self.sparse_lr >= 0,
                  "lr_decay": 0 < self.lr_decay <= 1, "workers": self.workers >= 1,
                  "embedding_dim": self.embedding_dim >= 1, "lam": self.lam >= 0,
                  "patience": self.patience >= 0, "filter_top_k": self.filter_top_k >= 0,
                  "id_dropout": 0 <= self.id_dropout < 1,
                  "max_failures": self.max_failures >= -1,
                  "cpus_per_worker": self.cpus_per_worker > 0,
                  "replicate_below": self.replicate_below >= 0,
                  "cache_below_mb": self.cache_below_mb >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} is out of range: {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device and self.use_gpu:
            raise ValueError(f"device={self.device!r} is for local runs; with use_gpu Ray "
                             "places each worker on its own GPU")
        if self.device:
            torch.device(self.device)  # raises on a malformed name, e.g. "gpu"
        if self.bias_init not in ("popularity", "zero"):
            raise ValueError(f"bias_init must be 'popularity' or 'zero', got {self.bias_init!r}")
        if self.reg not in REGULARIZERS:
            raise ValueError(f"reg must be one of {REGULARIZERS}, got {self.reg!r}")
        if self.reg_form not in REG_FORMS:
            raise ValueError(f"reg_form must be one of {REG_FORMS}, got {self.reg_form!r}")
        if self.reg == "filter" and self.filter_top_k < 1:
            raise ValueError("reg='filter' needs filter_top_k >= 1 (ids kept per table), got "
                             f"{self.filter_top_k}")
        self.model_config()  # validates model fields

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(asdict(self))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(known)}")
        raw = dict(raw)
        for key in ("attention_hidden", "mlp_hidden"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)


# --- worker environment -------------------------------------------------------------------------
class WorkerEnv:
    """Where a worker's batches, tables, synchronisation and checkpoints come from."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where the model, tables and batches live

    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def make_tables(self, model: CTRModel, cfg: TrainConfig) -> EmbeddingTables:
        tables = EmbeddingTables(model.table_specs(), seed=cfg.seed, init_std=cfg.init_std)
        return tables.to(self.device)

    def wrap_dense(self, model: nn.Module) -> nn.Module:
        return model

    def gather(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Concatenate each array over all workers (every worker gets the result)."""
        return arrays

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every worker rank 0's copy of the model's buffers (Dice's running statistics),
        the copy the checkpoint holds. A no-op in one process."""
        if self.world_size == 1 or not dist.is_initialized():
            return
        for buffer in model.buffers():
            out = buffer.to(self.device)
            dist.broadcast(out, src=0)
            buffer.copy_(out)

    def latest_checkpoint(self) -> Path | None:
        return None

    def report(self, metrics: dict, write_checkpoint: Callable[[Path], None]) -> None:
        raise NotImplementedError


class LocalEnv(WorkerEnv):
    """One process, batches streamed from the Parquet files, checkpoints under OUTPUT/checkpoints.

    Keeps the latest and the best epoch's checkpoints; rerunning the same command resumes from
    the latest.
    """

    def __init__(self, cfg: TrainConfig, dataset: PreparedDataset) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.root = Path(cfg.output) / "checkpoints"
        self.device = torch.device(cfg.device or "cpu")

    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        return iter_numpy_batches(self.dataset.files("train"), self.dataset.schema,
                                  self.cfg.batch_size, shuffle=self.cfg.shuffle,
                                  seed=self.cfg.seed * 10_007 + epoch)

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        return iter_numpy_batches(self.dataset.files(split), self.dataset.schema,
                                  self.cfg.eval_batch_size)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.root.glob("epoch-*") if (p / ckpt.MANIFEST).exists())
        return done[-1] if done else None

    def report(self, metrics: dict, write_checkpoint: Callable[[Path], None]) -> None:
        final = self.root / f"epoch-{metrics['epoch']:04d}"
        with atomic.staged_dir(final) as tmp:
            write_checkpoint(tmp)
        # Retain only the latest and the best epoch (the one `summarize` names).
        keep = {final.name, best_epoch_dir(self.root)}
        for p in self.root.glob("epoch-*"):
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def best_epoch_dir(root: Path) -> str | None:
    """Name of the complete epoch checkpoint under `root` that `best_index` picks (so the one
    kept is the one metrics.json names, ties and NaN included)."""
    done = sorted(p for p in root.glob("epoch-*") if (p / ckpt.MANIFEST).exists())
    if not done:
        return None
    metrics = [json.loads((p / "metrics.json").read_text()) for p in done]
    return done[best_index(metrics)].name


def best_index(history: list[dict]) -> int:
    """Index of the best epoch in `history`: the highest validation GAUC, NaN counting as the
    lowest, and of tied epochs the earliest (a later epoch must improve to replace it)."""
    gaucs = [-math.inf if h.get("valid_gauc") is None or math.isnan(h["valid_gauc"])
             else h["valid_gauc"] for h in history]
    return int(np.argmax(gaucs))


# --- the loop -----------------------------------------------------------------------------------
def to_torch(batch: dict[str, np.ndarray], device: torch.device | None = None
             ) -> dict[str, Tensor]:
    """A numpy batch as tensors on `device` (None: the CPU, sharing the arrays' memory).

    To a GPU the columns go through pinned host memory and asynchronous copies, so the copy
    overlaps the work already queued on the device."""
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    if device is None or device.type == "cpu":
        return out
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin)
            for k, v in out.items()}


def dense_autocast(device: torch.device, precision: str):
    """The autocast context of the dense part: bf16 for precision="bf16", else none."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def enable_tf32() -> None:
    """TF32 tensor-core matmuls for fp32 work on CUDA (Ampere and later; no effect on CPU)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def forward(model: nn.Module, tables: EmbeddingTables, batch: dict[str, Tensor],
            where: str = "", precision: str = "fp32") -> Tensor:
    """Logits (B,) fp32 of `batch`: sparse lookups (fp32 rows), then the dense part (under
    bf16 autocast for precision="bf16"). `where` names the batch's origin in the error for an
    out-of-range id."""
    dense = model.module if hasattr(model, "module") else model  # unwrap DDP for its methods
    embedded = tables.lookup(dense.sparse_inputs(batch), where)
    device = next(iter(batch.values())).device
    with dense_autocast(device, precision):
        logits = model(embedded, batch)
    return logits.float()


@torch.no_grad()
def predict_split(model: nn.Module, tables: EmbeddingTables, batches, schema: Schema,
                  env: WorkerEnv, split: str = "", precision: str = "fp32"
                  ) -> dict[str, np.ndarray]:
    """Probabilities for one split, gathered from every worker: label, prob, user arrays.

    The probabilities stay on the device until the split is done: one copy to the host per
    split, not one per batch."""
    model.eval()
    tables.eval()
    labels, probs, users = [], [], []
    where = f"{split} split" if split else ""
    for batch in batches:
        t = to_torch(batch, env.device)
        probs.append(torch.sigmoid(forward(model, tables, t, where, precision)))
        labels.append(batch[schema.label])
        users.append(batch[schema.user_column])
    prob = torch.cat(probs).cpu().numpy() if probs else np.zeros(0, np.float32)
    local = {"label": _cat(labels, np.float32), "prob": prob.astype(np.float32),
             "user": _cat(users, np.int64)}
    return env.gather(local)


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def evaluate_split(model, tables, batches, schema, env, split: str = "",
                   precision: str = "fp32") -> dict:
    p = predict_split(model, tables, batches, schema, env, split, precision)
    return evaluate_predictions(p["label"], p["prob"], p["user"])


class BatchRegularizer:
    """The data-level regularizers of `cfg.reg` applied to batches as they are loaded.

    `filter` remaps ids in every split (training and evaluation see the same ids); `dropout`
    discards ids of training batches only, from a generator seeded by (seed, epoch, rank) so a
    resumed run draws the same drops.
    """

    def __init__(self, cfg: TrainConfig, dataset: PreparedDataset, rank: int = 0) -> None:
        self.cfg, self.rank = cfg, rank
        schema = dataset.schema
        self.filter = (IdFilter(schema, dataset.counts(), cfg.filter_top_k)
                       if cfg.reg == "filter" else None)
        self.dropout = IdDropout(schema, cfg.id_dropout) if cfg.reg == "dropout" else None

    def train(self, batches: Iterator[dict[str, np.ndarray]], epoch: int
              ) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank])
        for batch in batches:
            if self.filter is not None:
                batch = self.filter(batch)
            if self.dropout is not None:
                batch = self.dropout(batch, rng)
            yield batch

    def eval(self, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for batch in batches:
            yield self.filter(batch) if self.filter is not None else batch


def tables_without_counts(model: CTRModel, counts: dict[str, np.ndarray]) -> list[str]:
    """Tables of `model` with no n_j of their own in `counts`. A derived table (`item_id.bias`,
    `item_id.w_hist_item_id`) is looked up by fewer keys than its base table, whose n_j also
    counts the history occurrences, so it is counted on its own (`table_counts`)."""
    return [t for t in model.table_specs() if t not in counts]


def table_counts(model: CTRModel, tables: list[str], batches) -> dict[str, np.ndarray]:
    """n_j for `tables` (e.g. Wide&Deep's hashed cross ids, which no prepared data counts):
    the number of samples in `batches` whose lookups include id j. -> table -> (rows,) int64"""
    specs = model.table_specs()
    missing = list(tables)
    out = {t: np.zeros(specs[t].num_rows, np.int64) for t in missing}
    with torch.no_grad():
        for batch in batches:
            n = len(batch[model.schema.label])
            per_table: dict[str, list[np.ndarray]] = {t: [] for t in missing}
            for table, ids in model.sparse_inputs(to_torch(batch)).values():
                if table in per_table:
                    per_table[table].append(ids.reshape(n, -1).numpy())
            for table, parts in per_table.items():
                ids = np.sort(np.concatenate(parts, axis=1), axis=1)  # (B, slots)
                first = np.ones_like(ids, dtype=bool)
                first[:, 1:] = ids[:, 1:] != ids[:, :-1]  # count an id once per sample
                keep = ids[first & (ids != PAD_ID)]
                out[table] += np.bincount(keep, minlength=len(out[table]))
    return out


def click_counts(feature: str, label: str, batches, env: WorkerEnv,
                 rows: int) -> tuple[Tensor, Tensor]:
    """Clicks and impressions per id of `feature` over `batches`, summed over workers.

    Returns: clicks (rows,), impressions (rows,) float64.
    """
    clicks = torch.zeros(rows, dtype=torch.float64)
    shows = torch.zeros(rows, dtype=torch.float64)
    for batch in batches:
        ids = torch.from_numpy(batch[feature])
        clicks.index_add_(0, ids, torch.from_numpy(batch[label]).double())
        shows.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    return env.all_reduce_sum(clicks), env.all_reduce_sum(shows)


def candidate_popularity(candidate, label: str, env: WorkerEnv, smoothing: float
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """The smoothed training click rate of every id of the `candidate` feature, as a logit,
    from one pass over the training split (summed over workers): the popularity baseline's
    table and the ad bias rows' warm start.

    Returns: logits (rows, 1), clicks (rows,), impressions (rows,).
    """
    clicks, shows = click_counts(candidate.name, label, env.train_batches(0), env,
                                 candidate.vocab_size)
    return Popularity.table_from_counts(clicks, shows, smoothing), clicks, shows


def _fit_popularity(model: Popularity, tables: EmbeddingTables, env: WorkerEnv) -> float:
    """Fill the popularity table from click/impression counts over the training split."""
    logits, clicks, shows = candidate_popularity(model.candidate, model.schema.label, env,
                                                 model.config.smoothing)  # (V, 1)
    tables.set_rows(next(iter(model.table_specs())), logits.float())
    # Training log loss of the fitted rates, from the counts alone.
    p = torch.sigmoid(logits.squeeze(-1).double())
    nll = -(clicks * p.log() + (shows - clicks) * (1 - p).log()).sum()
    return float(nll / shows.sum().clamp(min=1))


def bias_prior(model: CTRModel, env: WorkerEnv, cfg: TrainConfig) -> dict[str, Tensor]:
    """The candidate's bias rows at its smoothed training click rate (as a logit), which
    `bias_init="popularity"` starts them at. -> {"<table>.bias": (vocab, 1)}, {} without one.

    The model then starts where the popularity baseline ends, and early stopping on validation
    keeps only what the history adds on top. Without it a rare item's bias moves about one
    learning rate per touch and the model never learns item quality on small data. The
    regularizers pull these rows towards the prior rather than towards logit 0.
    """
    candidate = model.schema.ad_features[0]
    name = f"{candidate.table}.bias"
    if name not in model.table_specs():
        return {}
    logits, _, _ = candidate_popularity(candidate, model.schema.label, env, cfg.smoothing)
    return {name: logits.float()}


def embedding_regularizer(cfg: TrainConfig, model: CTRModel, dataset: PreparedDataset,
                          env: WorkerEnv, data_reg: BatchRegularizer,
                          centers: dict[str, Tensor]) -> RowPenalty | None:
    """The gradient regularizer of `cfg.reg` for this run (None when there is none).

    n_j per table: the prepared `counts.npz` for the feature tables, counted from the training
    split (summed over workers) for the others: bias and first-order tables (n_j = samples
    whose lookups of that table hold j, e.g. whose candidate is j), hashed crosses. λ is scaled
    for the global batch, `cfg.batch_size` × workers (`din_ray.embeddings.regularization.LAMBDA_BATCH`).
    """
    if cfg.reg not in GRADIENT_REGULARIZERS or cfg.lam == 0:
        return None
    counts = dataset.counts()
    missing = tables_without_counts(model, counts)
    if cfg.reg in ("mba", "difacto") and missing:
        local = table_counts(model, missing, data_reg.eval(env.train_batches(0)))
        counts = {**counts, **{t: env.all_reduce_sum(torch.from_numpy(c)).numpy()
                               for t, c in local.items()}}
    global_batch = cfg.batch_size * env.world_size
    steps_per_epoch = math.ceil(dataset.num_rows("train") / global_batch)
    return build_regularizer(cfg.reg, cfg.lam, counts, max(steps_per_epoch, 1),
                             global_batch=global_batch, centers=centers)


def dense_adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam over the dense parameters, with torch's fused kernel where the device has one.

    The same update as the default (foreach) Adam up to float rounding, and the same state
    (checkpoints load either way). At batch 256 the default one cost 0.5-0.8 ms a step on this
    machine's CPU (per-parameter bias corrections read on the host), the fused one 0.1 ms
    (benchmarks/train_default.py)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # no fused Adam for these parameters' device or dtype
        return torch.optim.Adam(params, lr=lr)


def train_loop(cfg: TrainConfig, env: WorkerEnv) -> dict:
    """Train on this worker; returns the final metrics (identical on every worker)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # each step's activations reuse the last step's pages
    torch.manual_seed(cfg.seed)
    if env.device.type == "cuda":
        enable_tf32()
    dataset = PreparedDataset.open(cfg.data)
    schema = dataset.schema.with_embedding_dim(cfg.embedding_dim)
    model = build_model(schema, cfg.model_config()).to(env.device)
    tables = env.make_tables(model, cfg)
    counting = isinstance(model, Popularity)
    params = [p for p in model.parameters() if p.requires_grad]
    dense_opt = None
    if params:
        dense_opt = (dense_adam(params, cfg.lr) if cfg.optimizer == "adam"
                     else torch.optim.SGD(params, lr=cfg.lr))
    sparse_opt = RowWiseOptimizer(tables, cfg.optimizer, lr=cfg.sparse_lr or cfg.lr,
                                  reg_form=cfg.reg_form)
    data_reg = BatchRegularizer(cfg, dataset, env.rank)
    resume = env.latest_checkpoint()
    regularized = cfg.reg in GRADIENT_REGULARIZERS and cfg.lam > 0
    prior = {}
    if cfg.bias_init == "popularity" and not counting and (resume is None or regularized):
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
                                 cfg.model_config(), schema)

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
                                       schema, env, split, cfg.precision).items():
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

    if cfg.eval_at_start and not history and not counting:
        # "Epoch 0": the model before any update (with bias_init="popularity" it ranks exactly
        # as the popularity baseline), so validation-based selection keeps it when training
        # does not improve on it.
        close_epoch(0, 0.0, None, 0.0, 0)
    bad_epochs = _epochs_since_best(history)
    epochs = 1 if counting else cfg.epochs
    for epoch in range(start_epoch, epochs):
        if cfg.patience and bad_epochs >= cfg.patience:
            break
        lr = cfg.lr * cfg.lr_decay ** epoch
        sparse_opt.lr = (cfg.sparse_lr or cfg.lr) * cfg.lr_decay ** epoch
        if dense_opt:
            for group in dense_opt.param_groups:
                group["lr"] = lr
        t0 = time.perf_counter()
        data_seconds = 0.0
        if counting:
            train_loss, samples = _fit_popularity(model, tables, env), dataset.num_rows("train")
        else:
            train_loss, samples, data_seconds = _train_epoch(
                dense_model, model, tables, dense_opt, sparse_opt, regularizer, env, epoch, cfg,
                dataset, data_reg)
        seconds = time.perf_counter() - t0
        close_epoch(epoch + 1, lr, train_loss, seconds, samples, data_seconds)
        bad_epochs = _epochs_since_best(history)
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
    expected = max(1, dataset.num_rows("train") // max(cfg.batch_size * env.world_size, 1))
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
                          regularizer, cfg.precision, f"train split, epoch {epoch + 1}")
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


def _epochs_since_best(history: list[dict]) -> int:
    return len(history) - 1 - best_index(history) if history else 0


def summarize(history: list[dict]) -> dict:
    """Final metrics: the test metrics of the epoch with the best validation GAUC."""
    if not history:
        raise ValueError("no epoch was trained")
    best = history[best_index(history)]
    return {"best_epoch": best["epoch"], "gauc": best["test_gauc"], "auc": best["test_auc"],
            "logloss": best["test_logloss"], "valid_gauc": best["valid_gauc"],
            "valid_auc": best["valid_auc"], "valid_logloss": best["valid_logloss"],
            "epochs_run": len(history), "history": history}


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


# --- drivers ------------------------------------------------------------------------------------
def finalize_output(cfg: TrainConfig, result: dict, best_checkpoint: Path | None) -> Path:
    """Copy the best epoch's checkpoint to OUTPUT/checkpoint and write OUTPUT/metrics.json."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if best_checkpoint is not None:
        final = out / "checkpoint"
        with atomic.staged_dir(final) as tmp:
            shutil.copytree(best_checkpoint, tmp, dirs_exist_ok=True)
        result = {**result, "checkpoint": str(final)}
    result = {**result, "model": cfg.model, "config": cfg.to_dict()}
    atomic.write_json(out / "metrics.json", result)
    return out / "metrics.json"


def run_local(cfg: TrainConfig) -> dict:
    """Train in this process (one worker, no Ray) and write OUTPUT/{metrics.json,checkpoint}."""
    dataset = PreparedDataset.open(cfg.data)
    env = LocalEnv(cfg, dataset)
    result = train_loop(cfg, env)
    best = best_epoch_dir(env.root)
    finalize_output(cfg, result, env.root / best if best else None)
    return result


def evaluate_checkpoint(path: str | Path, data: str | Path, batch_size: int = 8192) -> dict:
    """Recompute valid/test metrics of a checkpoint on a prepared dataset."""
    model, tables, c = ckpt.load_model(path)
    dataset = PreparedDataset.open(data)
    if dataset.schema.with_embedding_dim(c.schema.features[0].embedding_dim) != c.schema:
        raise ValueError(f"{data}: its schema does not match the checkpoint's ({path})")
    out = {}
    # A filter run is evaluated on the same filtered ids it was trained and validated on.
    data_reg = BatchRegularizer(TrainConfig.from_dict(c.config), dataset)
    for split in ("valid", "test"):
        batches = data_reg.eval(iter_numpy_batches(dataset.files(split), dataset.schema,
                                                   batch_size))
        for k, v in evaluate_split(model, tables, batches, c.schema, WorkerEnv(), split).items():
            out[f"{split}_{k}"] = v
    out.update(gauc=out["test_gauc"], auc=out["test_auc"], logloss=out["test_logloss"])
    return out

