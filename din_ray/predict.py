"""Offline scoring: the predicted CTR of every sample of a prepared split, written as Parquet.

    din-ray predict --checkpoint runs/din --data runs/ml --split test --output runs/din/pred-test

OUTPUT/ is a directory of Parquet files holding every input column unchanged (the label, the user
and each feature's dense ids, exactly as in the prepared split) plus `ctr` (float32), one row per
sample. It is written to a temporary sibling and renamed into place, so a reader never sees a
half-written prediction.

Two engines give the same predictions (the model outputs `din-ray evaluate` scores, with the
same id filter a `reg="filter"` run applies):
  * "local": this process, one Parquet row group at a time, rows in file order;
  * "ray": Ray Data reads the split, `map_batches` scores it on a pool of `actors` actors (each
    loads the checkpoint once; `gpus_per_actor` > 0 puts them on GPUs) and writes the files.
"auto" picks "ray" when the split's Parquet files hold at least `ray_above_mb`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from din_ray import checkpoint as ckpt
from din_ray import io as atomic
from din_ray.data.format import SPLITS, DataError, PreparedDataset, to_numpy
from din_ray.train.loop import BatchRegularizer, TrainConfig, forward, to_torch

log = logging.getLogger(__name__)

CTR = "ctr"
ENGINES = ("auto", "local", "ray")


@dataclass(frozen=True)
class PredictConfig:
    """One `din-ray predict` run. Defaults: scoring batches as large as evaluation's; splits
    under 256 MB of Parquet score faster here than after starting a Ray actor pool."""

    checkpoint: str
    data: str
    output: str
    split: str = "test"
    engine: str = "auto"
    batch_size: int = 8192
    ray_above_mb: float = 256.0
    actors: int = 2
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    address: str = ""  # Ray cluster to join; "" = $RAY_ADDRESS, else start a local Ray
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ray_above_mb", "gpus_per_actor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")


class Scorer:
    """A checkpoint loaded once, scoring prepared Arrow batches (also the Ray Data actor).

    Args:
        checkpoint: checkpoint directory (`checkpoint.load_model`).
        data: the prepared dataset the batches come from (for a filter run's id remapping).
        device: "cpu" or "cuda".
    """

    def __init__(self, checkpoint: str, data: str, device: str = "cpu") -> None:
        self.model, self.tables, c = ckpt.load_model(checkpoint)
        dataset = PreparedDataset.open(data)
        dim = c.schema.features[0].embedding_dim
        if dataset.schema.with_embedding_dim(dim) != c.schema:
            raise ValueError(f"{data}: its schema does not match the checkpoint's ({checkpoint})")
        self.schema = c.schema
        self.regularizer = BatchRegularizer(TrainConfig.from_dict(c.config), dataset)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.tables.to(self.device)

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        """(B rows) prepared columns -> the same columns plus `ctr` (B,) float32."""
        arrays = next(self.regularizer.eval(iter([to_numpy(self.schema, batch)])))
        inputs = {k: v.to(self.device) for k, v in to_torch(arrays).items()}
        ctr = torch.sigmoid(forward(self.model, self.tables, inputs)).float().cpu().numpy()
        return batch.append_column(CTR, pa.array(ctr, pa.float32()))


def predict(cfg: PredictConfig) -> dict:
    """Score `cfg.split` of `cfg.data` with `cfg.checkpoint`; write OUTPUT. Returns a summary
    (output, rows, engine)."""
    dataset = PreparedDataset.open(cfg.data)
    files = dataset.files(cfg.split)
    if not files:
        raise DataError(f"{dataset.root / cfg.split}: no Parquet files")
    for path in files:
        dataset.check_file(path)
    checkpoint = str(_resolve(cfg.checkpoint))
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite)")
    engine = cfg.engine
    if engine == "auto":
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        engine = "ray" if size_mb >= cfg.ray_above_mb else "local"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}")
    try:
        if engine == "local":
            rows = _predict_local(cfg, checkpoint, files, tmp)
        else:
            rows = _predict_ray(cfg, checkpoint, files, tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d predictions of %s/%s to %s (%s)", rows, cfg.data, cfg.split, out, engine)
    return {"output": str(out), "rows": rows, "engine": engine, "split": cfg.split}


def _resolve(path: str) -> Path:
    """A checkpoint, or a train output directory holding one (as `din-ray evaluate` takes)."""
    path = Path(path)
    if not (path / ckpt.MANIFEST).exists() and (path / "checkpoint" / ckpt.MANIFEST).exists():
        return path / "checkpoint"
    return path


def _publish(tmp: Path, out: Path) -> None:
    atomic.publish(tmp, out)  # an existing output is swapped out, then deleted


def _predict_local(cfg: PredictConfig, checkpoint: str, files: list[Path], tmp: Path) -> int:
    """One output file per input file, row groups scored in `cfg.batch_size` slices."""
    scorer = Scorer(checkpoint, cfg.data)
    tmp.mkdir()
    rows = 0
    for i, path in enumerate(files):
        source = pq.ParquetFile(path)
        writer = None
        try:
            for g in range(source.num_row_groups):
                group = source.read_row_group(g)
                for lo in range(0, group.num_rows, cfg.batch_size):
                    scored = scorer(group.slice(lo, cfg.batch_size))
                    if writer is None:
                        writer = pq.ParquetWriter(tmp / f"part-{i:05d}.parquet", scored.schema)
                    writer.write_table(scored)
                    rows += scored.num_rows
        finally:
            if writer is not None:
                writer.close()
    return rows


def _predict_ray(cfg: PredictConfig, checkpoint: str, files: list[Path], tmp: Path) -> int:
    """Ray Data: read, score on an actor pool, write (OUTPUT must be on storage every node
    sees, like the data)."""
    import ray

    from din_ray.ray_session import connect

    connected = connect(cfg.address, num_cpus=max(4, int(cfg.actors * cfg.cpus_per_actor) + 2))
    try:
        ds = ray.data.read_parquet([str(f) for f in files])
        ds.context.enable_progress_bars = False
        scored = ds.map_batches(
            Scorer, batch_size=cfg.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"checkpoint": checkpoint, "data": str(Path(cfg.data)),
                                   "device": "cuda" if cfg.gpus_per_actor > 0 else "cpu"},
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
            udf_modifying_row_count=False)
        scored.write_parquet(str(tmp))
        return sum(pq.ParquetFile(f).metadata.num_rows for f in tmp.glob("*.parquet"))
    finally:
        if connected:
            ray.shutdown()


def read_predictions(path: str | Path) -> pa.Table:
    """All rows of a `predict` output directory."""
    files = sorted(Path(path).glob("*.parquet"))
    if not files:
        raise DataError(f"{path}: no prediction Parquet files")
    return pq.read_table(files)


def to_arrays(table: pa.Table, schema) -> dict[str, np.ndarray]:
    """A predictions table as numpy: the prepared columns (`to_numpy`) plus `ctr` (N,)."""
    out = to_numpy(schema, table.drop_columns([CTR]))
    out[CTR] = table.column(CTR).to_numpy()
    return out
