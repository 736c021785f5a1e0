"""Raw ids -> dense ids in the log pipeline: vocabularies, encoders and the prepared schema.

Each embedding table (a feature and the behaviour features aligned with it) gets one `Encoder`:
a vocabulary of the raw ids counted at least `min_count` times in the training period (most
frequent first, ties by raw value, so ids are stable across runs), hashing into `hash_buckets`
buckets, or the bins of a numeric feature. `vocab_sources` says which staged columns the vocab
stage counts for each table; `build_encoders` turns the merged counts into encoders;
`log_schema` is the prepared schema they give (serving repeats the hashing and binning it
records).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from din_ray.data.ids import hashed_ids
from din_ray.data.logs.files import BEHAVIORS, IMPRESSIONS
from din_ray.data.logs.parse import as_array
from din_ray.data.logs.spec import LogSpec
from din_ray.schema import NUM_RESERVED_IDS, OOV_ID, Feature, Schema


def vocab_sources(spec: LogSpec) -> dict[str, list[tuple[str, str]]]:
    """Vocabulary tables -> the (log, staged column) pairs whose values they count."""
    out: dict[str, list[tuple[str, str]]] = {}
    for f in spec.features:
        owner = spec.feature(f.table)
        if owner.hash_buckets is not None or owner.bins is not None:
            continue
        out.setdefault(f.table, []).append((BEHAVIORS if f.group == "behavior" else IMPRESSIONS,
                                            f.name))
    return out


@dataclass
class Encoder:
    """Raw ids of one table -> dense ids: a vocabulary (raw value at position i of `index` has
    id i + NUM_RESERVED_IDS, unknown -> OOV), hashing into `buckets` buckets, or `bins` bin
    indices (0 .. bins - 1, the id space fixed by the edges). Missing -> OOV.
    """

    table: str
    type: str
    index: pd.Index | None = None
    buckets: int = 0
    bins: int = 0

    @property
    def vocab_size(self) -> int:
        if self.index is not None:
            return NUM_RESERVED_IDS + len(self.index)
        return NUM_RESERVED_IDS + (self.bins or self.buckets)

    def encode(self, arr) -> np.ndarray:
        """-> int32 (N,) dense ids."""
        arr = as_array(arr)
        missing = arr.is_null().to_numpy(zero_copy_only=False)
        if self.type == "int":
            v = arr.fill_null(0).to_numpy()
        else:
            v = arr.fill_null("").to_numpy(zero_copy_only=False)
        if self.index is not None:
            pos = self.index.get_indexer(v)
            ids = np.where(pos >= 0, pos + NUM_RESERVED_IDS, OOV_ID)
        elif self.bins:
            ids = v.astype(np.int64) + NUM_RESERVED_IDS
        else:
            ids = hashed_ids(v, self.buckets, self.type)
        ids[missing] = OOV_ID
        return ids.astype(np.int32)


def merge_counts(parts: list[pd.Series]) -> pd.Series:
    """Sum per raw id of count Series (raw id -> count), in first-seen order."""
    s = pd.concat(parts)
    return s.groupby(level=0, sort=False).sum()


def build_encoders(spec: LogSpec, counts: dict[str, pd.Series]) -> dict[str, Encoder]:
    """One encoder per table: vocabularies keep raw ids counted >= min_count in the training
    period, most frequent first (ties by raw value), so ids are stable across runs."""
    out = {}
    for name, owner in spec.table_owners.items():
        if owner.bins is not None:  # bin i of len(bins) + 1 bins -> id i + 2
            out[name] = Encoder(name, "int", bins=len(owner.bins) + 1)
        elif owner.hash_buckets is not None:
            out[name] = Encoder(name, owner.type, buckets=owner.hash_buckets)
        else:
            c = counts.get(name, pd.Series(dtype=np.int64))
            c = c[c >= owner.min_count].sort_index(kind="stable")
            c = c.sort_values(ascending=False, kind="stable")
            out[name] = Encoder(name, owner.type, pd.Index(c.index))
    return out


def log_schema(spec: LogSpec, encoders: dict[str, Encoder]) -> Schema:
    """Prepared schema: behaviour features share their aligned ad feature's table."""
    feats = []
    for f in spec.features:
        size = encoders[f.table].vocab_size
        if f.group == "behavior":
            feats.append(Feature(f.name, "behavior", f.table, size, spec.embedding_dim,
                                 spec.max_history, f.aligned_with))
        else:
            feats.append(Feature(f.name, f.group, f.name, size, spec.embedding_dim))
    # How raw ids of tables without a vocabulary file become dense ids: serving repeats it.
    hashed = {t: e.buckets for t, e in encoders.items() if e.buckets}
    hash_types = {t: e.type for t, e in encoders.items() if e.buckets}
    bins = {f.name: list(f.bins) for f in spec.features if f.bins is not None}
    return Schema(tuple(feats), name=spec.name,
                  extra={"source": "logs", "hashed": hashed, "hash_types": hash_types,
                         "bins": bins})
