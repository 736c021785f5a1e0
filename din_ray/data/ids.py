"""Raw ids -> dense ids without a vocabulary: hashing and binning, shared by data preparation
and serving.

A table prepared with `hash_buckets` stores `hash(raw) % buckets + NUM_RESERVED_IDS`, a binned
numeric feature the index of its bin; serving must compute the very same functions on a
request's raw values, so both call them from here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from din_ray.schema import NUM_RESERVED_IDS


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


def hashed_ids(values: np.ndarray, buckets: int, id_type: str) -> np.ndarray:
    """(N,) raw ids (int64 when `id_type` is "int", else strings) -> (N,) int64 dense ids in
    [NUM_RESERVED_IDS, NUM_RESERVED_IDS + buckets)."""
    h = mix64(values) if id_type == "int" else hash_strings(values)
    return (h % np.uint64(buckets)).astype(np.int64) + NUM_RESERVED_IDS


def bin_index(values: np.ndarray, edges) -> np.ndarray:
    """(N,) numbers -> (N,) int64 bin index: i where edges[i-1] <= x < edges[i] (0 below the
    first edge, len(edges) from the last one on). The dense id is index + NUM_RESERVED_IDS."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values,
                           side="right").astype(np.int64)
