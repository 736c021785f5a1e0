"""Start a training run from an earlier checkpoint whose tables may be smaller (`--init-from`).

    din-ray train --data out/day2 --init-from runs/day1/checkpoint --output runs/day2

What is loaded: the dense model weights, the dense optimizer's state, every embedding table's rows
and their row-wise optimizer moments (Adam's first and second moments) and the sparse step count
(Adam's bias correction continues where it stopped). A table that grew because the new dataset's
vocabulary was extended (`prepare --vocab-from`) keeps its earlier rows at the same dense ids;
its new rows stay as a fresh run initialises them (N(0, init_std²), or the candidate's smoothed
click rate for the ad-bias table) with zero optimizer moments. Each worker reads only the rows of
its own block, stitched from whichever blocks the checkpoint holds, so any worker count continues
any other. The epoch count and history start afresh: this is a new run, not a resume.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from din_ray.checkpoint import (
    ID_FILTER,
    MANIFEST,
    Checkpoint,
    CheckpointError,
    resolve_checkpoint,
)
from din_ray.data.vocab_extend import schema_differences
from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import CTRModel, ModelConfig
from din_ray.schema import Schema
from din_ray.train.dense_adam import DenseAdam

log = logging.getLogger(__name__)

# Model fields that change how the weights are trained, not what they are.
TRAINING_ONLY = ("dropout", "smoothing", "dice_momentum")


def check_architecture(c: Checkpoint, schema: Schema, model_config: ModelConfig,
                       tables: dict) -> None:
    """Raise CheckpointError naming everything that keeps `c` from initialising this model:
    model fields, schema structure, table widths, tables larger than the new vocabulary."""
    diffs = []
    saved = asdict(c.model_config())
    for key, value in asdict(model_config).items():
        if key not in TRAINING_ONLY and saved.get(key) != value:
            diffs.append(f"model {key}: {saved.get(key)!r} in the checkpoint, {value!r} now")
    diffs += schema_differences(c.schema, schema)
    saved_tables = c.table_specs()
    for name, spec in tables.items():
        old = saved_tables.get(name)
        if old is None:
            diffs.append(f"table {name!r}: not in the checkpoint")
        elif old.dim != spec.dim:
            diffs.append(f"table {name!r}: width {old.dim} in the checkpoint, {spec.dim} now")
        elif old.num_rows > spec.num_rows:
            diffs.append(f"table {name!r}: {old.num_rows} rows in the checkpoint, larger than "
                         f"the new vocabulary's {spec.num_rows} (prepare the new data with "
                         "--vocab-from the checkpoint's dataset)")
    for name in saved_tables.keys() - tables.keys():
        diffs.append(f"table {name!r}: in the checkpoint only")
    if diffs:
        raise CheckpointError(f"--init-from {c.path}: does not fit this run: " + "; ".join(diffs))


def init_from_checkpoint(path: str | Path, model: CTRModel, tables: EmbeddingTables,
                         dense_opt: torch.optim.Optimizer | DenseAdam | None,
                         sparse_opt: RowWiseOptimizer, model_config: ModelConfig,
                         schema: Schema) -> Checkpoint:
    """Load `path` into this worker's model, optimizer state and table blocks (see the module
    docstring). Rows beyond the checkpoint's tables are left as they are. `path` is a checkpoint
    or a train output directory holding one under checkpoint/."""
    path = Path(path)
    if not (path / MANIFEST).exists() and (path / "checkpoint" / MANIFEST).exists():
        path = path / "checkpoint"
    c = Checkpoint.open(resolve_checkpoint(path))
    if (c.path / ID_FILTER).exists():
        raise CheckpointError(f"--init-from {c.path}: trained with reg='filter', whose ids are "
                              "remapped; continue from a checkpoint without the id filter")
    check_architecture(c, schema, model_config, tables.specs)
    state = c.dense_state()
    model.load_state_dict(state["model"])
    if dense_opt is not None and state["optimizer"]:
        dense_opt.load_state_dict(state["optimizer"])
    sparse_opt.step_count = int(state["sparse_step"])
    saved = c.table_specs()
    for name in tables.specs:
        start, end = tables.blocks[name]
        hi = min(end, saved[name].num_rows)
        if start >= hi:
            continue  # this worker's block lies wholly in the new rows
        rows = c.table_rows(name, start, hi)
        weight = tables.weight(name)
        weight[:hi - start].copy_(rows["weight"])
        for key, value in sparse_opt.state_rows(name).items():
            if key in rows:
                value[:hi - start].copy_(rows[key])
    grown = {n: f"{saved[n].num_rows} -> {s.num_rows}" for n, s in tables.specs.items()
             if s.num_rows > saved[n].num_rows}
    log.info("initialised from %s (tables grown: %s)", c.path, grown or "none")
    return c
