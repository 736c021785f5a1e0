"""What every in-memory source (MovieLens, Amazon, synthetic) shares: the item/category schema,
the split and history-tie options and their checks, where a history ends, train file sizes and
the placeholders of the reserved ids in vocabulary files.

Each source module (`din_ray.data.movielens`, `amazon`, `synthetic`) holds only its own format
and protocol and takes these from here.
"""

from __future__ import annotations

import math

import numpy as np

from din_ray.schema import Feature, Schema

# Placeholders stored for the reserved dense ids in the vocab files (format.add_vocab skips them).
RESERVED_RAW = ("<pad>", "<oov>")

# What a history does with behaviours at the sample's own timestamp: "exclude" (strictly earlier
# only, as the log pipeline and a live request, which cannot see what happens in the same
# second) or "keep" (in file order, the older behaviour of this module).
HISTORY_TIES = ("exclude", "keep")


def item_category_schema(name: str, item_vocab_size: int, cate_vocab_size: int, max_history: int,
                         embedding_dim: int) -> Schema:
    """The paper's public-dataset features: candidate item and category, and the user's behaviour
    sequences of items and categories (sharing the candidate's embedding tables)."""
    return Schema(
        (
            Feature("item_id", "ad", "item_id", item_vocab_size, embedding_dim),
            Feature("cate_id", "ad", "cate_id", cate_vocab_size, embedding_dim),
            Feature("hist_item_id", "behavior", "item_id", item_vocab_size, embedding_dim,
                    max_len=max_history, aligned_with="item_id"),
            Feature("hist_cate_id", "behavior", "cate_id", cate_vocab_size, embedding_dim,
                    max_len=max_history, aligned_with="cate_id"),
        ),
        label="label",
        user_column="user",
        name=name,
    )


def train_rows_per_file(n_train: int) -> int:
    """Rows per train Parquet file: at least 8 files so Ray Data can shard them evenly, none
    tiny, none huge."""
    return max(10_000, min(math.ceil(n_train / 8), 1_000_000))


def check_history_ties(history_ties: str) -> None:
    if history_ties not in HISTORY_TIES:
        raise ValueError(f"history_ties must be one of {HISTORY_TIES}, got {history_ties!r}")


def history_ends(user: np.ndarray, time: np.ndarray, history_ties: str) -> np.ndarray:
    """Per behaviour sorted by (user, time, line), the position its history ends before.

    Args:
        user, time: (N,) sorted by (user, time), ties in file order.
        history_ties: "exclude": the first position of its (user, time) run, so the history is
            strictly earlier; "keep": its own position (earlier lines of the same second count).
    Returns:
        (N,) int64 end positions; the history of p is [user_start[p], end[p]).
    """
    n = len(user)
    if history_ties == "keep":
        return np.arange(n, dtype=np.int64)
    run = np.flatnonzero(np.r_[True, (user[1:] != user[:-1]) | (time[1:] != time[:-1])])
    return np.repeat(run, np.diff(np.r_[run, n])).astype(np.int64)


def check_split_fracs(valid_frac: float, test_frac: float) -> None:
    for name, v in (("valid_frac", valid_frac), ("test_frac", test_frac)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if valid_frac + test_frac >= 1.0:
        raise ValueError(f"valid_frac + test_frac must be < 1 to leave training data, got "
                         f"{valid_frac} + {test_frac}")
