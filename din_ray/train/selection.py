"""THE best-epoch rule, used by training, tuning, reproduce and the checkpoints kept: the epoch
with the highest validation GAUC, NaN counting as the lowest, and of tied epochs the earliest (a
later epoch must improve to replace it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from din_ray import checkpoint as ckpt

SELECTION_METRIC = "valid_gauc"


def best_index(history: list[dict], metric: str = SELECTION_METRIC, mode: str = "max") -> int:
    """Index of the best epoch in `history` (non-empty): the highest `metric` (the lowest for
    mode="min"), a missing or NaN value counting as the worst, and of tied epochs the earliest
    (a later epoch must improve to replace it)."""
    if not history:
        raise ValueError("no epoch to choose from")
    sign = 1.0 if mode == "max" else -1.0
    scores = [-math.inf if not _scored(h, metric) else sign * h[metric] for h in history]
    return int(np.argmax(scores))


def best_scored(history: list[dict], metric: str = SELECTION_METRIC, mode: str = "max"
                ) -> dict | None:
    """The best epoch's row (`best_index`), or None when no epoch has a `metric` yet."""
    if not any(_scored(h, metric) for h in history):
        return None
    return history[best_index(history, metric, mode)]


def _scored(row: dict, metric: str) -> bool:
    value = row.get(metric)
    return value is not None and not math.isnan(value)


def epochs_since_best(history: list[dict]) -> int:
    """Epochs reported after the best one (what `patience` counts); 0 for no history."""
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


def best_epoch_dir(root: Path) -> str | None:
    """Name of the complete epoch checkpoint under `root` that `best_index` picks (so the one
    kept is the one metrics.json names, ties and NaN included)."""
    done = sorted(p for p in root.glob("epoch-*") if (p / ckpt.MANIFEST).exists())
    if not done:
        return None
    metrics = [json.loads((p / "metrics.json").read_text()) for p in done]
    return done[best_index(metrics)].name
