"""The in-memory delivery of small splits: each worker's rows, and batches equal to the Parquet
reader's (no Ray; the Ray path runs them in tests/train/test_distributed.py)."""

from __future__ import annotations

import numpy as np
import pytest
from builders import write_tiny_dataset

from din_ray.data import in_memory
from din_ray.data.format import PreparedDataset


@pytest.mark.parametrize("rows,world", [(256, 1), (256, 2), (103, 2), (103, 4)])
def test_training_shares_cover_each_row_at_most_once_with_equal_step_counts(rows, world):
    shares = [in_memory.train_rows(rows, r, world, seed=7) for r in range(world)]
    assert all(len(s) == rows // world for s in shares)
    seen = np.concatenate(shares)
    assert len(np.unique(seen)) == len(seen) >= rows - (world - 1)
    # The shares differ from epoch to epoch and are the same for the same seed.
    assert not np.array_equal(shares[0], in_memory.train_rows(rows, 0, world, seed=8))
    assert np.array_equal(shares[0], in_memory.train_rows(rows, 0, world, seed=7))


def test_without_shuffle_the_workers_deal_the_rows_in_split_order():
    shares = [in_memory.train_rows(10, r, 2, seed=7, shuffle=False) for r in range(2)]
    assert [s.tolist() for s in shares] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


def test_the_workers_steps_together_are_the_global_batches_of_one_worker():
    rows, world, batch = 96, 3, 8
    one = in_memory.train_rows(rows, 0, 1, seed=3)
    shares = [in_memory.train_rows(rows, r, world, seed=3) for r in range(world)]
    for step in range(rows // (batch * world)):
        together = np.concatenate([s[step * batch:(step + 1) * batch] for s in shares])
        expected = one[step * batch * world:(step + 1) * batch * world]
        assert sorted(together) == sorted(expected)


@pytest.mark.parametrize("rows,world", [(64, 2), (67, 4), (3, 4)])
def test_evaluation_blocks_cover_every_row_once(rows, world):
    blocks = [in_memory.eval_rows(rows, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(blocks), np.arange(rows))


def test_batches_match_the_parquet_reader(tmp_path):
    dataset = PreparedDataset.open(write_tiny_dataset(tmp_path / "d", rows=200))
    columns = in_memory.read_columns(dataset, "train")
    whole = dataset.read_split("train")
    assert columns["hist_item_id"].dtype == np.int32  # stored width, not int64
    rows = in_memory.train_rows(200, 1, 2, seed=0)
    batches = list(in_memory.iter_batches(dataset.schema, columns, rows, batch_size=32))
    assert [len(b["label"]) for b in batches] == [32, 32, 32, 4]
    for key, value in whole.items():
        got = np.concatenate([b[key] for b in batches])
        assert got.dtype == value.dtype, key
        assert np.array_equal(got, value[rows]), key
