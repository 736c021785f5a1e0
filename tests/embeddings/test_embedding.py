"""Row-wise embedding tables, the sparse optimizer and MBA."""

import numpy as np
import pytest
import torch

from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.regularization import MiniBatchAware, build_regularizer
from din_ray.embeddings.tables import (
    EmbeddingTables,
    IdRangeError,
    TableSpec,
    chunk_seed,
    init_rows,
    row_block,
)
from din_ray.schema import PAD_ID

SPEC = TableSpec("item_id", 10, 3)


def test_row_blocks_cover_the_table_and_init_ignores_world_size():
    for n, w in [(10, 1), (10, 3), (7, 7), (100, 6)]:
        blocks = [row_block(n, r, w) for r in range(w)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert max(e - s for s, e in blocks) - min(e - s for s, e in blocks) <= 1
    whole = init_rows(SPEC, 0, 10, seed=3, std=0.1)
    parts = torch.cat([init_rows(SPEC, *row_block(10, r, 3), seed=3, std=0.1) for r in range(3)])
    torch.testing.assert_close(parts, whole)
    assert (whole[PAD_ID] == 0).all()


def test_tables_whose_names_share_a_prefix_start_different():
    # Seeded from the first bytes of the name, these pairs started with identical rows.
    for a, b in [("cms_segid", "cms_group_id"), ("wide_hist_item_id", "wide_hist_cate_id"),
                 ("item_id.w_item_id", "item_id.w_hist_item_id")]:
        rows_a = init_rows(TableSpec(a, 50, 4), 0, 50, seed=0, std=0.1)
        rows_b = init_rows(TableSpec(b, 50, 4), 0, 50, seed=0, std=0.1)
        assert not torch.allclose(rows_a[1:], rows_b[1:]), (a, b)
    assert chunk_seed(0, "item_id", 0) != chunk_seed(1, "item_id", 0) != chunk_seed(0, "item_id", 1)


def test_initial_rows_are_the_same_in_every_process():
    # Fixed values: the seed is a hash of its own (blake2b), not Python's hash() of the name,
    # which is salted per process (PYTHONHASHSEED), so these would differ from run to run.
    assert chunk_seed(0, "item_id", 0) == 2717994942743715953
    row = init_rows(TableSpec("cms_segid", 20, 3), 0, 20, seed=7, std=0.1)[1]
    torch.testing.assert_close(row, torch.tensor([0.1144145131, -0.1686009914, 0.0518352650]))


def test_lookup_dedups_and_gradients_sum_per_row():
    tables = EmbeddingTables({"item_id": SPEC}).train()
    ids = torch.tensor([[2, 3, 2], [3, 0, 0]])
    out = tables.lookup({"a": ("item_id", ids), "b": ("item_id", torch.tensor([5, 2]))})
    assert out["a"].shape == (2, 3, 3) and out["b"].shape == (2, 3)
    torch.testing.assert_close(out["a"][0, 0], tables.weight("item_id")[2])
    assert (out["a"][1, 1] == 0).all()  # PAD row is zero
    (out["a"].sum() + 2 * out["b"].sum()).backward()
    got_ids, grads = tables.touched_gradients()["item_id"]
    assert got_ids.tolist() == [2, 3, 5]  # unique, PAD dropped
    # id 2: twice in a (1 each) + once in b (2) = 4; id 3: twice in a = 2; id 5: once in b = 2.
    torch.testing.assert_close(grads[:, 0], torch.tensor([4.0, 2.0, 2.0]))


def fit_side_by_side(tables, opt, ref, ref_opt, steps) -> None:
    """One squared-error step per id batch in `steps` (B, L) on the row-wise tables and on the
    torch reference embedding `ref`, with the same random targets (B, L, 3)."""
    for ids in steps:
        target = torch.randn(*ids.shape, 3)
        ((tables.lookup({"x": ("item_id", ids)})["x"] - target) ** 2).sum().backward()
        opt.step(tables.touched_gradients())
        ref_opt.zero_grad()
        ((ref(ids) - target) ** 2).sum().backward()
        ref_opt.step()


def test_rowwise_adam_matches_torch_sparse_adam_on_touched_rows():
    torch.manual_seed(0)
    tables = EmbeddingTables({"item_id": SPEC}, init_std=1.0).train()
    ref = torch.nn.Embedding(10, 3, sparse=True)
    ref.weight.data.copy_(tables.weight("item_id"))
    opt = RowWiseOptimizer(tables, "adam", lr=0.1)
    ref_opt = torch.optim.SparseAdam(ref.parameters(), lr=0.1)
    steps = [torch.tensor([[1, 4, 4], [7, 1, 2 + step]]) for step in range(4)]
    fit_side_by_side(tables, opt, ref, ref_opt, steps)
    torch.testing.assert_close(tables.weight("item_id"), ref.weight.data)
    assert (tables.weight("item_id")[[0, 8, 9]] == ref.weight.data[[0, 8, 9]]).all()


def test_rowwise_adam_not_lazy_matches_dense_torch_adam_on_every_row():
    """lazy=False: rows keep moving on their decaying moments while untouched, as under dense
    Adam (the reference DIN's optimizer): rows 4 and 7 in the last two steps, where only row 1
    is looked up."""
    torch.manual_seed(0)
    tables = EmbeddingTables({"item_id": SPEC}, init_std=1.0).train()
    ref = torch.nn.Embedding(10, 3)
    ref.weight.data.copy_(tables.weight("item_id"))
    opt = RowWiseOptimizer(tables, "adam", lr=0.1, lazy=False)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.1)
    steps = [torch.tensor([[1, 4, 4], [7, 1, 2 + step]]) if step < 3 else torch.tensor([[1]])
             for step in range(5)]
    fit_side_by_side(tables, opt, ref, ref_opt, steps)
    torch.testing.assert_close(tables.weight("item_id"), ref.weight.data)
    assert (tables.weight("item_id")[PAD_ID] == 0).all()


def test_mba_adds_lambda_over_count_times_weight_for_touched_rows_only():
    counts = {"item_id": np.array([0, 0, 4, 1, 0, 10, 0, 0, 0, 0])}
    reg = MiniBatchAware(0.5, counts)
    tables = EmbeddingTables({"item_id": SPEC}, init_std=1.0).train()
    before = tables.weight("item_id").clone()
    opt = RowWiseOptimizer(tables, "sgd", lr=1.0)
    tables.lookup({"x": ("item_id", torch.tensor([2, 3]))})["x"].sum().backward()
    opt.step(tables.touched_gradients(), reg)
    after = tables.weight("item_id")
    # w_j <- w_j - lr * (grad + lam * w_j / n_j), grad = 1 (Eq. 7)
    torch.testing.assert_close(after[2], before[2] - (1 + 0.5 * before[2] / 4))
    torch.testing.assert_close(after[3], before[3] - (1 + 0.5 * before[3] / 1))
    untouched = [0, 1, 4, 5, 6, 7, 8, 9]
    assert torch.equal(after[untouched], before[untouched])


def test_build_regularizer_validation():
    assert build_regularizer("none", 0.01, {}) is None
    assert build_regularizer("mba", 0.0, {}) is None
    with pytest.raises(ValueError, match="reg must be one of"):
        build_regularizer("bogus", 0.01, {})
    with pytest.raises(ValueError, match="more|fewer"):
        EmbeddingTables({"t": TableSpec("t", 2, 1)}, rank=0, world_size=3)


@pytest.mark.parametrize("rows", [10, 100_000], ids=["bitmap-dedup", "sort-dedup"])
@pytest.mark.parametrize("bad", [-1, "rows"])
def test_lookup_rejects_ids_outside_the_table_naming_table_input_and_value(rows, bad):
    # -1 used to read the last row silently (negative indexing), on large tables at least.
    tables = EmbeddingTables({"item_id": TableSpec("item_id", rows, 3)})
    value = rows if bad == "rows" else bad
    ids = torch.tensor([[2, 3], [value, 0]])
    with pytest.raises(IdRangeError, match=rf"^test split: embedding table 'item_id' \(inputs "
                       rf"hist_item_id, item_id\) got id {value}, outside its rows \[0, {rows}\)"):
        tables.lookup({"hist_item_id": ("item_id", ids), "item_id": ("item_id", ids[:, 0])},
                      where="test split")
    ok = tables.lookup({"x": ("item_id", torch.tensor([0, rows - 1]))})["x"]
    assert ok.shape == (2, 3)
