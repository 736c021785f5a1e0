"""Tiny prepared datasets built in-process for unit tests (no dependence on a data source)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from din_ray.data.format import DatasetWriter
from din_ray.schema import Feature, Schema


def tiny_schema(items: int = 30, cates: int = 6, max_len: int = 5, dim: int = 4) -> Schema:
    return Schema((
        Feature("item_id", "ad", "item_id", items, dim),
        Feature("cate_id", "ad", "cate_id", cates, dim),
        Feature("hist_item_id", "behavior", "item_id", items, dim, max_len, "item_id"),
        Feature("hist_cate_id", "behavior", "cate_id", cates, dim, max_len, "cate_id"),
    ), name="tiny")


def random_columns(schema: Schema, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Random ids with variable-length padded histories; label = candidate's cate in history."""
    rng = np.random.default_rng(seed)
    items, cates = schema.tables["item_id"][0], schema.tables["cate_id"][0]
    L = schema.max_history
    item_cate = rng.integers(2, cates, size=items)
    cand = rng.integers(2, items, size=rows)
    hist = rng.integers(2, items, size=(rows, L))
    lengths = rng.integers(0, L + 1, size=rows)
    hist[np.arange(L)[None, :] >= lengths[:, None]] = 0
    hist_cate = np.where(hist > 0, item_cate[hist], 0)
    in_hist = (hist_cate == item_cate[cand][:, None]).any(1)
    label = (rng.random(rows) < np.where(in_hist, 0.8, 0.2)).astype(np.int8)
    return {"label": label, "user": rng.integers(0, max(rows // 8, 2), size=rows),
            "item_id": cand, "cate_id": item_cate[cand], "hist_item_id": hist,
            "hist_cate_id": hist_cate}


def write_tiny_dataset(path: Path, rows: int = 600, seed: int = 0, **schema_args) -> Path:
    schema = tiny_schema(**schema_args)
    with DatasetWriter(path, schema, source="tiny", rows_per_file=max(rows // 4, 1)) as w:
        for split, n, s in (("train", rows, seed), ("valid", rows // 4, seed + 1),
                            ("test", rows // 4, seed + 2)):
            cols = random_columns(schema, n, s)
            for lo in range(0, n, max(n // 4, 1)):
                w.write(split, {k: v[lo:lo + max(n // 4, 1)] for k, v in cols.items()})
        w.add_vocab("item_id", [f"i{k}" for k in range(schema.tables["item_id"][0])])
    return path


# The small network every training test uses: 4-wide embeddings, attention 8-4, MLP 16-8,
# batch 64, one epoch, no early stopping. A test states only what it changes.
TINY_TRAINING = dict(epochs=1, batch_size=64, embedding_dim=4, attention_hidden=(8, 4),
                     mlp_hidden=(16, 8), patience=0)


def tiny_config(data: str | Path, output: str | Path | None = None, **overrides):
    """A TrainConfig of the tiny network on `data` (writing to `output`), `overrides` on top
    (flat knob names, as `din-ray train`'s flags)."""
    from din_ray.config import TrainConfig

    paths = {"data": str(data), **({"output": str(output)} if output is not None else {})}
    return TrainConfig.create(**{**TINY_TRAINING, **paths, **overrides})

