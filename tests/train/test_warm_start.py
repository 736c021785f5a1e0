"""`train --init-from`: a checkpoint of smaller tables initialises a run on grown vocabularies,
at any worker count; another architecture or a table larger than the vocabulary is refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from builders import random_columns, tiny_schema

from din_ray.checkpoint import Checkpoint, CheckpointError
from din_ray.data.format import DatasetWriter, PreparedDataset
from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.tables import EmbeddingTables, init_rows
from din_ray.model import build_model
from din_ray.train.loop import TrainConfig, run_local
from din_ray.train.warm_start import init_from_checkpoint

SMALL = dict(epochs=1, batch_size=64, embedding_dim=8, attention_hidden=(16, 8),
             mlp_hidden=(16, 8), threads=1, seed=1, sparse_lr=0.05)


def _data(path: Path, items: int, seed: int) -> Path:
    """Tiny data whose item vocabulary is i2.. i<items-1>: a larger `items` extends a smaller."""
    schema = tiny_schema(items=items)
    with DatasetWriter(path, schema, source="tiny") as w:
        for split, s in (("train", seed), ("valid", seed + 1), ("test", seed + 2)):
            w.write(split, random_columns(schema, 300, s))
        w.add_vocab("item_id", [f"i{k}" for k in range(items)])
    return path


@pytest.fixture(scope="module")
def day1(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("warm")
    data = _data(root / "data1", 30, 0)
    run_local(TrainConfig(data=str(data), output=str(root / "run1"), **SMALL))
    return root, root / "run1" / "checkpoint"


def _fresh(data: Path, cfg: TrainConfig, rank: int = 0, world: int = 1):
    schema = PreparedDataset.open(data).schema.with_embedding_dim(cfg.embedding_dim)
    model = build_model(schema, cfg.model_config())
    tables = EmbeddingTables(model.table_specs(), rank=rank, world_size=world, seed=cfg.seed,
                             init_std=cfg.init_std)
    dense_opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return schema, model, tables, dense_opt, RowWiseOptimizer(tables, "adam", lr=cfg.lr)


@pytest.mark.parametrize("world", [1, 2])
def test_grown_tables_keep_old_rows_and_state_new_rows_fresh(day1, world):
    root, ckpt = day1
    data2 = _data(root / f"data2-{world}", 40, 5)
    cfg = TrainConfig(data=str(data2), **SMALL)
    saved = Checkpoint.open(ckpt)
    for rank in range(world):
        schema, model, tables, dense_opt, sparse_opt = _fresh(data2, cfg, rank, world)
        init_from_checkpoint(ckpt, model, tables, dense_opt, sparse_opt, cfg.model_config(),
                             schema)
        state = saved.dense_state()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, state["model"][k], rtol=0, atol=0)
        assert sparse_opt.step_count == state["sparse_step"] > 0
        start, end = tables.blocks["item_id"]
        old = saved.table_rows("item_id", start, min(end, 30))
        n = len(old["weight"])
        w = tables.weight("item_id")
        torch.testing.assert_close(w[:n], old["weight"], rtol=0, atol=0)
        moments = sparse_opt.state_rows("item_id")
        torch.testing.assert_close(moments["exp_avg_sq"][:n], old["exp_avg_sq"], rtol=0, atol=0)
        assert old["exp_avg_sq"].abs().sum() > 0  # the moments really were trained
        # Rows 30.. are new: exactly what a fresh run starts them at, with zero moments.
        spec = tables.specs["item_id"]
        lo = max(start, 30)
        if lo < end:
            torch.testing.assert_close(w[lo - start:], init_rows(spec, lo, end, cfg.seed,
                                                                 cfg.init_std), rtol=0, atol=0)
            assert moments["exp_avg"][lo - start:].abs().sum() == 0


def test_run_continues_from_checkpoint(day1):
    root, ckpt = day1
    data2 = _data(root / "data2-run", 40, 5)
    result = run_local(TrainConfig(data=str(data2), output=str(root / "run2"),
                                   init_from=str(ckpt.parent), **SMALL))
    assert math.isfinite(result["gauc"]) and math.isfinite(result["logloss"])
    assert Checkpoint.open(root / "run2" / "checkpoint").table_specs()["item_id"].num_rows == 40


def test_other_architecture_or_larger_table_is_refused(day1):
    root, ckpt = day1
    data2 = _data(root / "data2-bad", 40, 5)
    cfg = TrainConfig(data=str(data2), **{**SMALL, "mlp_hidden": (32, 8)})
    with pytest.raises(CheckpointError, match=r"model mlp_hidden: \[16, 8\].*\(32, 8\)|"
                                              r"model mlp_hidden: \(16, 8\).*\(32, 8\)"):
        init_from_checkpoint(ckpt, *_fresh(data2, cfg)[1:], cfg.model_config(),
                             _fresh(data2, cfg)[0])
    small = _data(root / "data-small", 20, 5)
    cfg = TrainConfig(data=str(small), **SMALL)
    with pytest.raises(CheckpointError, match="'item_id': 30 rows in the checkpoint, larger "
                                              "than the new vocabulary's 20"):
        init_from_checkpoint(ckpt, *_fresh(small, cfg)[1:], cfg.model_config(),
                             _fresh(small, cfg)[0])
