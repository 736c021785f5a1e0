"""What every in-memory source (MovieLens, Amazon, synthetic) shares: the item/category schema,
the checks of the options they all take, sorting behaviours by (user, time), where a history
ends and which positions fill its (B, L) slots, the random split by user, train file sizes and
the vocabulary files' placeholders of the reserved ids.

Each source module (`din_ray.data.movielens`, `amazon`, `synthetic`) holds only its own format
and protocol and takes these from here; the log pipeline (`din_ray.data.logs`) shares the
history slots and the vocabulary entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from din_ray.schema import PAD_ID, Feature, Schema

# Rows gathered at once when building (rows, max_history) history matrices: bounds memory to
# about CHUNK_ROWS * max_history * 4 bytes per feature whatever the dataset size.
CHUNK_ROWS = 250_000

# Placeholders stored for the reserved dense ids in the vocab files (format.add_vocab skips them).
RESERVED_RAW = ("<pad>", "<oov>")

# What a history does with behaviours at the sample's own timestamp: "exclude" (strictly earlier
# only, as the log pipeline and a live request, which cannot see what happens in the same
# second) or "keep" (in file order, the older behaviour of the MovieLens and Amazon sources).
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


def check_max_history(max_history: int) -> None:
    if max_history <= 0:
        raise ValueError(f"max_history must be > 0, got {max_history}")


def check_split_fracs(valid_frac: float, test_frac: float) -> None:
    for name, v in (("valid_frac", valid_frac), ("test_frac", test_frac)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if valid_frac + test_frac >= 1.0:
        raise ValueError(f"valid_frac + test_frac must be < 1 to leave training data, got "
                         f"{valid_frac} + {test_frac}")


def check_history_ties(history_ties: str) -> None:
    if history_ties not in HISTORY_TIES:
        raise ValueError(f"history_ties must be one of {HISTORY_TIES}, got {history_ties!r}")


def order_by_user_time(user: np.ndarray, time: np.ndarray) -> np.ndarray:
    """(N,) positions that sort behaviours by (user, time, file line)."""
    # lexsort is stable and its last key is the primary one; the explicit line index makes
    # the file-order tie-break independent of that guarantee.
    return np.lexsort((np.arange(len(user)), time, user))


def user_runs(user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of one user in (N,) ids sorted by user -> first position (U,), length (U,)."""
    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])  # (U,) run starts
    return first, np.diff(np.r_[first, len(user)])


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


def history_slots(end: np.ndarray, length: np.ndarray,
                  max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the histories of B samples come from: the `length` (B,) behaviours before sorted
    position `end` (B,), oldest first; length <= max_history.

    Returns:
        src (B, L) int64 positions in the sorted behaviours (0 in padding slots) and the mask of
        real slots (B, L), L = max_history.
    """
    slot = np.arange(max_history)  # (L,)
    real = slot < length[:, None]  # (B, L)
    src = np.where(real, end[:, None] - length[:, None] + slot, 0)  # (B, L) oldest first
    return src, real


def gather_history(values: np.ndarray, src: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Sorted behaviour `values` (M,) at `src` (B, L) -> int32 (B, L), PAD where not real."""
    if values.size == 0:
        return np.zeros(src.shape, np.int32)
    return np.where(real, values[src], PAD_ID).astype(np.int32)


@dataclass
class SortedBehaviours:
    """A source's behaviours sorted by (user, time, file line) with dense item and category ids;
    a user's behaviours are contiguous, so the history of a sample predicting position p is the
    slice [max(user_start[p], hist_end[p] - L), hist_end[p]): gathered by index arithmetic."""

    user: np.ndarray  # (N,) int64 user column (raw or dense user id, for GAUC grouping)
    item: np.ndarray  # (N,) int32 dense item id
    cate: np.ndarray  # (N,) int32 dense category id
    user_start: np.ndarray  # (N,) int64 sorted position of the user's first behaviour
    hist_end: np.ndarray  # (N,) int64 position the history ends before (`history_ends`)

    def histories(self, pos: np.ndarray, max_history: int) -> dict[str, np.ndarray]:
        """`hist_item_id`, `hist_cate_id` (B, L) of samples at sorted positions `pos` (B,): the
        user's `max_history` most recent behaviours before each, oldest first, PAD-padded."""
        end = self.hist_end[pos]  # (B,)
        k = np.minimum(end - self.user_start[pos], max_history)  # (B,) history lengths
        src, real = history_slots(end, k, max_history)  # (B, L), (B, L)
        return {"hist_item_id": gather_history(self.item, src, real),
                "hist_cate_id": gather_history(self.cate, src, real)}


def split_users(n_users: int, valid_frac: float, test_frac: float,
                rng: np.random.Generator) -> np.ndarray:
    """The paper's split: users shuffled with `rng`, round(n * test_frac) of them to test and
    round(n * valid_frac) to valid. -> (U,) int8 codes: 0 train, 1 valid, 2 test."""
    perm = rng.permutation(n_users)
    n_test = math.floor(n_users * test_frac + 0.5)
    n_valid = math.floor(n_users * valid_frac + 0.5)
    code = np.zeros(n_users, np.int8)
    code[perm[:n_test]] = 2
    code[perm[n_test:n_test + n_valid]] = 1
    return code


def train_rows_per_file(n_train: int) -> int:
    """Rows per train Parquet file: at least 8 files so Ray Data can shard them evenly, none
    tiny, none huge."""
    return max(10_000, min(math.ceil(n_train / 8), 1_000_000))


def vocab_entries(raw_ids) -> list[str]:
    """The raw ids of dense ids 2.. as `DatasetWriter.add_vocab` takes them: the reserved ids'
    placeholders first."""
    return list(RESERVED_RAW) + [str(r) for r in raw_ids]
