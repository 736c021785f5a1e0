"""Deterministic id hashes shared by data preparation and serving.

A table prepared with `hash_buckets` stores `hash(raw) % buckets + NUM_RESERVED_IDS`; serving must
compute the very same function on a request's raw ids, so both import it from here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread, deterministic uint64 hash of int64 ids."""
    with np.errstate(over="ignore"):
        z = x.astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_strings(values: np.ndarray) -> np.ndarray:
    """Deterministic uint64 hash of strings (pandas' fixed-key SipHash)."""
    return pd.util.hash_array(np.asarray(values, dtype=object), categorize=False)
