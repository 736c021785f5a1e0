"""The helpers every source shares (din_ray.data.common), on hand-built behaviours."""

import numpy as np
import pytest

from din_ray.data.common import (
    SortedBehaviours,
    history_ends,
    order_by_user_time,
    split_users,
    user_runs,
    vocab_entries,
)
from din_ray.schema import PAD_ID


def test_sort_keeps_file_order_among_equal_times_and_finds_user_runs():
    user = np.array([7, 3, 7, 3, 7])
    time = np.array([5, 9, 5, 1, 2])
    order = order_by_user_time(user, time)
    assert order.tolist() == [3, 1, 4, 0, 2]  # user 3 by time; user 7: t=2, then t=5 lines 0, 2
    first, count = user_runs(user[order])
    assert first.tolist() == [0, 2] and count.tolist() == [2, 3]


def test_histories_are_the_most_recent_strictly_earlier_behaviours_oldest_first():
    # One user, behaviours at t = 1, 2, 2, 3 (sorted); items 10..13, categories 20..23.
    user = np.zeros(4, np.int64)
    time = np.array([1, 2, 2, 3])
    rows = SortedBehaviours(user=user, item=np.arange(10, 14, dtype=np.int32),
                            cate=np.arange(20, 24, dtype=np.int32),
                            user_start=np.zeros(4, np.int64),
                            hist_end=history_ends(user, time, "exclude"))
    hist = rows.histories(np.array([0, 2, 3]), max_history=2)
    assert hist["hist_item_id"].tolist() == [[PAD_ID, PAD_ID],  # nothing before t=1
                                             [10, PAD_ID],  # t=2: the other t=2 is not earlier
                                             [11, 12]]  # t=3: the two most recent, oldest first
    assert hist["hist_cate_id"][2].tolist() == [21, 22]
    keep = history_ends(user, time, "keep")
    assert keep.tolist() == [0, 1, 2, 3]  # the earlier line of the same second counts


def test_user_split_rounds_each_share_and_depends_only_on_the_seed():
    a = split_users(10, 0.2, 0.25, np.random.default_rng(3))
    b = split_users(10, 0.2, 0.25, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.dtype == np.int8
    assert np.bincount(a, minlength=3).tolist() == [5, 2, 3]  # round(2.5) = 3 to test


@pytest.mark.parametrize("raw", [["a", "b"], range(2)])
def test_vocab_entries_put_the_reserved_placeholders_first(raw):
    entries = vocab_entries(raw)
    assert entries[:2] == ["<pad>", "<oov>"] and entries[2:] == [str(r) for r in raw]
