"""Row-wise sharded embeddings in real gloo processes: N workers equal 1 worker on the same
global batches; memory per worker is 1/N; checkpoints restore at other worker counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import write_tiny_dataset
from dist_helpers import lookup_bad_ids, predict_checkpoint, spawn, stitch, train_steps

from din_ray.checkpoint import load_model
from din_ray.data.format import PreparedDataset
from din_ray.embeddings.sharding import REPLICATED, SHARDED, ShardedEmbeddingTables, plan_tables
from din_ray.embeddings.tables import EmbeddingTables, TableSpec
from din_ray.train.loop import forward as model_forward
from din_ray.train.loop import to_torch

STEPS, GLOBAL_BATCH = 6, 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 200 items and 12 categories: with replicate_below=50 the category tables are replicated
    # and the item tables sharded.
    return write_tiny_dataset(tmp_path_factory.mktemp("shard") / "data", rows=STEPS * GLOBAL_BATCH,
                              items=200, cates=12)


@pytest.fixture(scope="module")
def single(data):
    return train_steps(0, 1, str(data), 0, STEPS, GLOBAL_BATCH)


@pytest.fixture(scope="module", params=[0, 50], ids=["all-sharded", "mixed"])
def two_workers(request, data, tmp_path_factory):
    """2 gloo workers trained on the same global batches; they also write a checkpoint."""
    tmp = tmp_path_factory.mktemp(f"two-{request.param}")
    results = spawn(train_steps, 2, tmp, str(data), request.param, STEPS, GLOBAL_BATCH,
                    str(tmp / "ckpt"))
    return results, tmp / "ckpt"


def test_two_workers_equal_one_on_the_same_global_batches(single, two_workers):
    results, _ = two_workers
    print("losses 1 worker ", np.round(single["losses"], 6))
    print("losses 2 workers", np.round(results[0]["losses"], 6))
    np.testing.assert_allclose(results[0]["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    assert results[0]["losses"] == results[1]["losses"]
    assert single["losses"][0] != single["losses"][-1]  # it trained
    for key, value in single["dense"].items():
        for r in results:
            torch.testing.assert_close(r["dense"][key], value, rtol=1e-4, atol=1e-6)
    whole, sharded = stitch([single]), stitch(results)
    for name, table in whole.items():
        torch.testing.assert_close(sharded[name], table, rtol=1e-4, atol=1e-6)
    init = EmbeddingTables(dict((n, TableSpec(n, *t.shape)) for n, t in whole.items()))
    assert not torch.equal(init.weight("item_id"), whole["item_id"])  # the rows moved


def test_checkpoint_from_two_workers_restores_into_one_and_three(data, two_workers, tmp_path):
    _, checkpoint = two_workers
    model, tables, c = load_model(checkpoint)
    assert c.manifest["world_size"] == 2
    test = PreparedDataset.open(data).read_split("test")
    with torch.no_grad():
        one = torch.sigmoid(model_forward(model, tables, to_torch(test))).numpy()
    three = spawn(predict_checkpoint, 3, tmp_path, str(checkpoint), str(data))
    print("max |3 workers - 1 worker| =", np.abs(three[0] - one).max())
    np.testing.assert_allclose(three[0], one, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(three[0], three[2])


@pytest.mark.parametrize("world", [2, 4])
def test_each_worker_holds_one_nth_of_a_sharded_table(world):
    specs = {"item_id": TableSpec("item_id", 100_003, 16), "cate_id": TableSpec("cate_id", 20, 16)}
    whole = EmbeddingTables(specs).memory_bytes()
    small = 20 * 16 * 4  # the replicated category table, held whole by every worker
    per_worker = [ShardedEmbeddingTables(specs, r, world).memory_bytes() for r in range(world)]
    print(f"embedding bytes: 1 worker {whole}, {world} workers {per_worker}")
    for held in per_worker:
        assert abs((held - small) / (whole - small) - 1 / world) < 1e-4
    full = [ShardedEmbeddingTables(specs, r, world).weight("item_id") for r in range(world)]
    torch.testing.assert_close(torch.cat(full), EmbeddingTables(specs).weight("item_id"))


def test_plan_replicates_small_tables_and_rejects_more_workers_than_rows():
    specs = {"big": TableSpec("big", 5000, 4), "small": TableSpec("small", 10, 4)}
    assert plan_tables(specs, 4) == {"big": SHARDED, "small": REPLICATED}
    assert plan_tables(specs, 4, replicate_below=0) == {"big": SHARDED, "small": SHARDED}
    with pytest.raises(ValueError, match="'small' has 10 rows, fewer than the 11 workers"):
        plan_tables(specs, 11, replicate_below=0)


def test_an_out_of_range_id_on_one_rank_fails_every_rank_with_its_name(tmp_path):
    # Rank 1 alone sends a bad id; without a check before the exchange it crashed alone (sharded
    # table: in the owner bucketing) or read the last row (replicated: -1) while rank 0 waited.
    cases = [(1, "item_id", -1), (0, "cate_id", 12), (1, "cate_id", -1)]
    errors = spawn(lookup_bad_ids, 2, tmp_path, cases)
    print(errors)
    assert errors[0] == errors[1]
    for (rank, table, value), e in zip(cases, errors[0]):
        assert e.startswith(f"valid split: embedding table {table!r} (inputs hist_{table}) got "
                            f"id {value} on rank {rank}, outside its rows")
