"""Counting over the training split: n_j per table (MBA's frequencies for tables the prepared
data does not count), clicks and impressions per candidate id, and the popularity prior built from
them (the popularity baseline's table and the ad bias rows' warm start)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from din_ray.config import TrainConfig
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import CTRModel, Popularity
from din_ray.schema import PAD_ID
from din_ray.train.env import WorkerEnv
from din_ray.train.forward import to_torch


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


def fit_from_counts(model: CTRModel, tables: EmbeddingTables, env: WorkerEnv) -> float:
    """Fill the one table of a `closed_form` model (the popularity baseline) from the
    candidate's click and impression counts over the training split. -> the training log loss
    of the fitted rates, from the counts alone."""
    logits, clicks, shows = candidate_popularity(model.schema.ad_features[0], model.schema.label,
                                                 env, model.config.smoothing)  # (V, 1), (V,), (V,)
    (table,) = model.table_specs()
    tables.set_rows(table, logits.float())
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
    logits, _, _ = candidate_popularity(candidate, model.schema.label, env, cfg.model.smoothing)
    return {name: logits.float()}
