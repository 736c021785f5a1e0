"""Synthetic click logs with the two structures DIN is built for (paper §3 and §4.3).

    din-ray prepare synthetic --rows 30000 --output out/synthetic

*Diversity*: every user has a few interest clusters (2-5 categories out of many) and their
behaviour history is drawn from those clusters. *Local activation*: whether the user clicks a
candidate depends only on the part of the history related to the candidate, not on the whole
history:

    frac  = (# history behaviours in the candidate's category) / max(history length, 1)
    hit   = 1 if the candidate item itself is among the history behaviours else 0
    logit = CLICK_BIAS + signal * (CATEGORY_STRENGTH * frac + ITEM_HIT_STRENGTH * hit)
            + item_effect[item]
    label ~ Bernoulli(sigmoid(logit))

with item_effect ~ N(0, ITEM_EFFECT_STD^2) a per-item popularity term that every model can learn.
Half of the candidates come from the user's interests, half from a uniformly random category, so
within one user the candidates differ sharply in `frac` and `hit`, and GAUC rewards a model that
ranks them by those. Target attention reads both off directly (weight on the behaviours that
match the candidate's category or item); sum/mean pooling squeezes 2-5 clusters and tens of items
into one vector narrower than the number of categories and items, from which the
candidate-specific part has to be recovered by the MLP: with `frac` alone it can approximate it
(a bilinear form), with `hit` it cannot, since which of hundreds of items a history holds does not
fit in one embedding-wide sum. `signal=0` makes the label independent of the history.

Items belong to one category each (about the same number per category). Users are generated in
chunks of about `chunk_rows` samples, each chunk from its own seeded generator, so memory does not
grow with `rows` and the same arguments always give byte-identical Parquet data.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from din_ray.data.common import (
    check_max_history,
    check_split_fracs,
    item_category_schema,
    split_users,
    train_rows_per_file,
    vocab_entries,
)
from din_ray.data.format import DatasetWriter
from din_ray.schema import NUM_RESERVED_IDS, PAD_ID

log = logging.getLogger(__name__)

# Planted click model (see the module docstring). At signal 1 an in-interest candidate
# (frac ~ 0.3, hit 40 % of the time) is clicked about 3.5 times as often as a random one
# (frac ~ 0): click rate ~ 0.34 overall, ~ 0.55 vs ~ 0.15; at signal 0 it is ~ 0.15 throughout.
CLICK_BIAS = -1.8
CATEGORY_STRENGTH = 3.0
ITEM_HIT_STRENGTH = 2.0
ITEM_EFFECT_STD = 0.5
# Share of history behaviours drawn from a random category instead of the user's interests.
HISTORY_NOISE = 0.1
# Probability that a candidate comes from the user's interests rather than a random category.
CANDIDATE_FROM_INTERESTS = 0.5
# Average samples per user when `users` is not given: enough for most users to have both labels.
SAMPLES_PER_USER = 16


@dataclass(frozen=True)
class SyntheticConfig:
    """Resolved generator parameters (stored in the manifest)."""

    rows: int
    users: int
    items: int
    categories: int
    interests_per_user: tuple[int, int]
    max_history: int
    signal: float
    seed: int
    valid_frac: float
    test_frac: float
    chunk_rows: int
    embedding_dim: int

    def __post_init__(self) -> None:
        if self.rows <= 0:
            raise ValueError(f"rows must be > 0, got {self.rows}")
        if not 0 < self.users <= self.rows:
            raise ValueError(f"users must be in [1, rows={self.rows}], got {self.users}")
        lo, hi = self.interests_per_user
        if not 1 <= lo <= hi:
            raise ValueError(f"interests_per_user must be (min, max) with 1 <= min <= max, "
                             f"got {self.interests_per_user}")
        if self.categories < hi:
            raise ValueError(f"categories must be >= the max interests per user ({hi}), "
                             f"got {self.categories}")
        if self.items < self.categories:
            raise ValueError(f"items must be >= categories ({self.categories}) so every "
                             f"category has an item, got {self.items}")
        check_max_history(self.max_history)
        if self.signal < 0:
            raise ValueError(f"signal must be >= 0, got {self.signal}")
        if self.chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be > 0, got {self.chunk_rows}")
        check_split_fracs(self.valid_frac, self.test_frac)


def default_sizes(rows: int) -> tuple[int, int, int]:
    """(users, items, categories) for `rows` samples: ~16 samples per user, ~100 samples per
    item (30k rows -> 1875 users, 300 items, 30 categories), ~10 items per category."""
    users = max(1, rows // SAMPLES_PER_USER)
    items = max(200, min(rows // 100, 1_000_000))
    categories = max(20, min(items // 10, 10_000))
    return users, items, categories


def prepare_synthetic(
    output_dir: str | Path,
    *,
    rows: int = 100_000,
    users: int | None = None,
    items: int | None = None,
    categories: int | None = None,
    interests_per_user: tuple[int, int] = (2, 5),
    max_history: int = 50,
    signal: float = 1.0,
    seed: int = 0,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    chunk_rows: int = 200_000,
    embedding_dim: int = 16,
    overwrite: bool = False,
) -> Path:
    """Generate a synthetic prepared dataset with the MovieLens schema (`item_id`, `cate_id`,
    `hist_item_id`, `hist_cate_id`, user column `user`).

    Args:
        output_dir: prepared dataset to create.
        rows: total samples over all splits.
        users, items, categories: world size; None derives them from `rows` (`default_sizes`).
        interests_per_user: (min, max) interest categories per user, drawn uniformly.
        max_history: behaviour sequence length L; each user has a history of 1..L behaviours
            and each sample sees a prefix of it (0..all of it), so lengths vary and some are 0.
        signal: strength of the planted local-activation effect (0: labels ignore history).
        seed: everything is a function of the seed (and `chunk_rows`).
        valid_frac, test_frac: fractions of users in valid/test (split by user).
        chunk_rows: samples generated and held in memory at once.
        embedding_dim: width written into the schema.
        overwrite: replace an existing `output_dir`.

    Returns:
        The prepared dataset directory.
    """
    d_users, d_items, d_cates = default_sizes(rows)
    cfg = SyntheticConfig(
        rows=rows, users=d_users if users is None else users,
        items=d_items if items is None else items,
        categories=d_cates if categories is None else categories,
        interests_per_user=tuple(interests_per_user), max_history=max_history, signal=signal,
        seed=seed, valid_frac=valid_frac, test_frac=test_frac, chunk_rows=chunk_rows,
        embedding_dim=embedding_dim,
    )
    world = _World.build(cfg)
    schema = item_category_schema("synthetic", cfg.items + NUM_RESERVED_IDS,
                                  cfg.categories + NUM_RESERVED_IDS, cfg.max_history,
                                  cfg.embedding_dim)
    params = {**asdict(cfg), "interests_per_user": list(cfg.interests_per_user),
              "planted": {"click_bias": CLICK_BIAS, "category_strength": CATEGORY_STRENGTH,
                          "item_hit_strength": ITEM_HIT_STRENGTH,
                          "item_effect_std": ITEM_EFFECT_STD, "history_noise": HISTORY_NOISE,
                          "candidate_from_interests": CANDIDATE_FROM_INTERESTS}}
    n_train = int(world.samples[world.split == 0].sum())
    rows_per_file = train_rows_per_file(n_train)
    with DatasetWriter(output_dir, schema, source="synthetic", params=params,
                       overwrite=overwrite, rows_per_file=rows_per_file) as writer:
        for index, (u0, u1) in enumerate(world.chunks()):
            rng = np.random.default_rng([cfg.seed, 1, index])
            cols, split = world.generate(rng, u0, u1)
            for code, name in enumerate(("train", "valid", "test")):
                keep = np.flatnonzero(split == code)
                if code == 0:
                    keep = rng.permutation(keep)
                for s in range(0, keep.size, rows_per_file):  # never a single huge train file
                    writer.write(name, {k: v[keep[s:s + rows_per_file]] for k, v in cols.items()})
        writer.add_vocab("item_id", vocab_entries(f"item_{i}" for i in range(cfg.items)))
        writer.add_vocab("cate_id", vocab_entries(f"cate_{c}" for c in range(cfg.categories)))
    return Path(output_dir)


@dataclass
class _World:
    cfg: SyntheticConfig
    item_cate: np.ndarray  # (I,) category of each item
    cate_items: np.ndarray  # (I,) items grouped by category
    cate_start: np.ndarray  # (C,) offset of each category's items in cate_items
    cate_size: np.ndarray  # (C,)
    item_effect: np.ndarray  # (I,) per-item logit offset
    samples: np.ndarray  # (U,) samples per user
    split: np.ndarray  # (U,) 0 train, 1 valid, 2 test

    @classmethod
    def build(cls, cfg: SyntheticConfig) -> _World:
        rng = np.random.default_rng([cfg.seed, 0])
        item_cate = rng.permutation(np.arange(cfg.items) % cfg.categories)
        cate_items = np.argsort(item_cate, kind="stable")
        cate_size = np.bincount(item_cate, minlength=cfg.categories)
        cate_start = np.r_[0, np.cumsum(cate_size)[:-1]]
        item_effect = rng.normal(0.0, ITEM_EFFECT_STD, cfg.items)
        # Every user gets at least one sample; the rest are spread at random.
        samples = 1 + rng.multinomial(cfg.rows - cfg.users, np.full(cfg.users, 1 / cfg.users))
        split = split_users(cfg.users, cfg.valid_frac, cfg.test_frac, rng)
        return cls(cfg, item_cate, cate_items, cate_start, cate_size, item_effect, samples, split)

    def chunks(self) -> list[tuple[int, int]]:
        """Consecutive user ranges of about `chunk_rows` samples (at least one user each)."""
        ends = np.cumsum(self.samples)
        out, u0 = [], 0
        while u0 < self.cfg.users:
            target = (ends[u0 - 1] if u0 else 0) + self.cfg.chunk_rows
            u1 = max(u0 + 1, int(np.searchsorted(ends, target, side="right")))
            out.append((u0, u1))
            u0 = u1
        return out

    def _item_in(self, rng: np.random.Generator, cate: np.ndarray) -> np.ndarray:
        """A uniformly random item of each category in `cate` (any shape)."""
        offset = np.floor(rng.random(cate.shape) * self.cate_size[cate]).astype(np.int64)
        return self.cate_items[self.cate_start[cate] + offset]

    def _interest_cate(self, rng: np.random.Generator, interests: np.ndarray,
                       cum_weight: np.ndarray, owner: np.ndarray) -> np.ndarray:
        """A category drawn from the interests of user `owner` (any shape) by their weights."""
        u = rng.random(owner.shape)[..., None]
        slot = (u > cum_weight[owner]).sum(axis=-1).clip(max=interests.shape[1] - 1)
        return np.take_along_axis(interests[owner], slot[..., None], axis=-1)[..., 0]

    def generate(self, rng: np.random.Generator, u0: int,
                 u1: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Samples of users [u0, u1): prepared columns and the split code of each row."""
        cfg = self.cfg
        n_users, L, C = u1 - u0, cfg.max_history, cfg.categories
        lo, hi = cfg.interests_per_user

        # Interests: `hi` distinct categories per user, the first n_interest of them used.
        interests = rng.integers(0, C, (n_users, hi))  # (U, K)
        while True:
            srt = np.sort(interests, axis=1)
            dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
            if not dup.any():
                break
            interests[dup] = rng.integers(0, C, (int(dup.sum()), hi))
        n_interest = rng.integers(lo, hi + 1, n_users)  # (U,)
        weight = rng.gamma(1.0, size=(n_users, hi)) * (np.arange(hi) < n_interest[:, None])
        cum_weight = np.cumsum(weight / weight.sum(axis=1, keepdims=True), axis=1)  # (U, K)

        # Each user's behaviour sequence (oldest first); samples see prefixes of it.
        seq_len = rng.integers(1, L + 1, n_users)  # (U,)
        owner = np.broadcast_to(np.arange(n_users)[:, None], (n_users, L))
        noise = rng.random((n_users, L)) < HISTORY_NOISE
        seq_cate = np.where(noise, rng.integers(0, C, (n_users, L)),
                            self._interest_cate(rng, interests, cum_weight, owner))  # (U, L)
        seq_cate = seq_cate.astype(np.int32)
        seq_item = self._item_in(rng, seq_cate).astype(np.int32)  # (U, L)

        user = np.repeat(np.arange(n_users), self.samples[u0:u1])  # (B,) local user index
        n = user.size
        hist_len = np.floor(rng.random(n) * (seq_len[user] + 1)).astype(np.int64)  # (B,) 0..len
        real = np.arange(L) < hist_len[:, None]  # (B, L)
        hist_cate = np.where(real, seq_cate[user], -1)  # (B, L), -1 = padding
        hist_item = np.where(real, seq_item[user], -1)

        from_interest = rng.random(n) < CANDIDATE_FROM_INTERESTS
        cand_cate = np.where(from_interest, self._interest_cate(rng, interests, cum_weight, user),
                             rng.integers(0, C, n))  # (B,)
        cand_item = self._item_in(rng, cand_cate)

        frac = (hist_cate == cand_cate[:, None]).sum(axis=1) / np.maximum(hist_len, 1)  # (B,)
        hit = (hist_item == cand_item[:, None]).any(axis=1)  # (B,)
        logit = (CLICK_BIAS + cfg.signal * (CATEGORY_STRENGTH * frac + ITEM_HIT_STRENGTH * hit)
                 + self.item_effect[cand_item])  # (B,)
        label = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))

        cols = {
            "label": label.astype(np.int8),
            "user": (user + u0).astype(np.int64),
            "item_id": (cand_item + NUM_RESERVED_IDS).astype(np.int32),
            "cate_id": (cand_cate + NUM_RESERVED_IDS).astype(np.int32),
            "hist_item_id": np.where(real, hist_item + NUM_RESERVED_IDS, PAD_ID).astype(np.int32),
            "hist_cate_id": np.where(real, hist_cate + NUM_RESERVED_IDS, PAD_ID).astype(np.int32),
        }
        return cols, self.split[u0:u1][user]
