"""Regularizers of Table 4: gradient terms (MBA, DiFacto, L2 over whole tables) and data-level
ones (dropout, frequency filter), alone and inside the training loop."""

import numpy as np
import pytest
import torch
from builders import random_columns, tiny_schema, write_tiny_dataset

from din_ray.config import TrainConfig
from din_ray.data.format import PreparedDataset
from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.regularization import (
    LAMBDA_BATCH,
    DiFacto,
    IdDropout,
    IdFilter,
    MiniBatchAware,
    WholeTableL2,
    build_regularizer,
)
from din_ray.embeddings.tables import EmbeddingTables, TableSpec
from din_ray.model import ModelConfig, build_model
from din_ray.schema import OOV_ID, PAD_ID
from din_ray.train.counts import bias_prior, table_counts, tables_without_counts
from din_ray.train.evaluate import evaluate_checkpoint
from din_ray.train.local import LocalEnv, run_local
from din_ray.train.regularizers import BatchRegularizer, embedding_regularizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("reg") / "data", rows=400)


def sgd_step(reg, counts_rows=(0, 0, 4, 1, 2, 8)):
    """One SGD step (lr 1) on a 6-row table touching rows 2 and 3 with gradient 1."""
    tables = EmbeddingTables({"t": TableSpec("t", 6, 2)}, init_std=1.0)
    before = tables.weight("t").clone()
    opt = RowWiseOptimizer(tables, "sgd", lr=1.0)
    grads = {"t": (torch.tensor([2, 3]), torch.ones(2, 2))}
    if getattr(reg, "whole_tables", False):
        grads = reg.expand(tables, grads)
    opt.step(grads, reg)
    return before, tables.weight("t").clone()


def test_difacto_penalises_in_proportion_to_frequency():
    counts = {"t": np.array([0, 0, 4, 1, 2, 8])}
    before, after = sgd_step(DiFacto(0.5, counts))
    torch.testing.assert_close(after[2], before[2] - (1 + 0.5 * 4 * before[2]))
    torch.testing.assert_close(after[3], before[3] - (1 + 0.5 * 1 * before[3]))
    assert torch.equal(after[[0, 1, 4, 5]], before[[0, 1, 4, 5]])  # touched rows only
    # The opposite weighting of MBA, from the same counts.
    mba = MiniBatchAware(0.5, counts)
    assert float(mba._inv("t")[5]) == pytest.approx(1 / 8)
    assert float(DiFacto(0.5, counts)._inv("t")[5]) == pytest.approx(8)
    with pytest.raises(KeyError, match="no id counts for table 't.bias'"):
        mba._inv("t.bias")  # derived tables are counted on their own, never borrowed


def test_whole_table_l2_updates_every_row_but_pad():
    before, after = sgd_step(WholeTableL2(0.5, steps_per_epoch=5))
    coef = 0.5 / 5
    torch.testing.assert_close(after[2], before[2] - (1 + coef * before[2]))
    for row in (1, 4, 5):  # untouched: only the L2 term
        torch.testing.assert_close(after[row], before[row] * (1 - coef))
    assert torch.equal(after[PAD_ID], torch.zeros(2))


def test_build_regularizer_names_and_validation():
    counts = {"t": np.ones(6, np.int64)}
    assert isinstance(build_regularizer("mba", 0.01, counts), MiniBatchAware)
    assert isinstance(build_regularizer("difacto", 0.01, counts), DiFacto)
    assert isinstance(build_regularizer("l2", 0.01, counts, 10), WholeTableL2)
    for data_level in ("none", "dropout", "filter"):
        assert build_regularizer(data_level, 0.01, counts) is None
    with pytest.raises(ValueError, match="reg must be one of"):
        build_regularizer("l1", 0.01, counts)
    with pytest.raises(ValueError, match="reg must be one of"):
        TrainConfig.create(data="x", reg="bogus")
    with pytest.raises(ValueError, match="filter_top_k"):
        TrainConfig.create(data="x", reg="filter")
    # Dense Adam touches every row every step, so MBA's "rows of this mini-batch" is every row.
    with pytest.raises(ValueError, match="sparse_adam='dense'"):
        TrainConfig.create(data="x", sparse_adam="dense")
    assert TrainConfig.create(data="x", sparse_adam="dense", reg="none").optim.sparse_adam == \
        "dense"
    with pytest.raises(ValueError, match="sparse_adam"):
        TrainConfig.create(data="x", sparse_adam="eager")


def test_filter_keeps_the_most_frequent_ids_in_every_feature_of_a_table():
    schema = tiny_schema(items=8, cates=4, max_len=3)
    counts = {"item_id": np.array([0, 0, 5, 9, 1, 5, 0, 2]), "cate_id": np.array([0, 0, 3, 1])}
    f = IdFilter(schema, counts, top_k=2)
    assert f.kept("item_id") == 2 and f.kept("cate_id") is None  # cate has only 2 real ids
    batch = {"item_id": np.array([2, 3, 5, 7]), "cate_id": np.array([2, 3, 2, 3]),
             "hist_item_id": np.array([[3, 5, 0], [2, 4, 1], [0, 0, 0], [7, 3, 2]]),
             "hist_cate_id": np.array([[2, 3, 0], [2, 2, 1], [0, 0, 0], [3, 2, 2]])}
    out = f(batch)
    # Kept: 3 (n=9) and 2 (n=5, tie with 5 broken towards the smaller id).
    assert out["item_id"].tolist() == [2, 3, OOV_ID, OOV_ID]
    assert out["hist_item_id"].tolist() == [[3, OOV_ID, 0], [2, OOV_ID, 1], [0, 0, 0],
                                            [OOV_ID, 3, 2]]
    assert out["cate_id"].tolist() == batch["cate_id"].tolist()


def test_dropout_discards_half_the_ids_and_whole_behaviours():
    schema = tiny_schema(items=50, cates=8, max_len=20)
    cols = random_columns(schema, 2000, seed=3)
    cols["hist_item_id"] = np.random.default_rng(0).integers(2, 50, size=(2000, 20))
    cols["hist_cate_id"] = cols["hist_item_id"] % 6 + 2
    drop = IdDropout(schema, 0.5)
    out = drop(cols, np.random.default_rng(1))
    dropped = out["hist_item_id"] == PAD_ID
    assert 0.45 < dropped.mean() < 0.55
    assert np.array_equal(dropped, out["hist_cate_id"] == PAD_ID)  # aligned ids go together
    assert 0.45 < (out["item_id"] == PAD_ID).mean() < 0.55
    assert not np.array_equal(out["item_id"] == PAD_ID, out["cate_id"] == PAD_ID)
    again = drop(cols, np.random.default_rng(1))
    assert all(np.array_equal(out[k], again[k]) for k in out)
    assert np.array_equal(cols["hist_item_id"] % 6 + 2, cols["hist_cate_id"])  # input untouched


def test_batch_regularizer_drops_in_training_only_and_filters_everywhere(data):
    ds = PreparedDataset.open(data)
    batch = ds.read_split("valid")
    dropout = BatchRegularizer(TrainConfig.create(data=str(data), reg="dropout"), ds)
    assert next(dropout.eval(iter([batch])))["item_id"] is batch["item_id"]
    trained = next(dropout.train(iter([batch]), epoch=0))
    assert (trained["item_id"] == PAD_ID).any()
    filt = BatchRegularizer(TrainConfig.create(data=str(data), reg="filter", filter_top_k=3), ds)
    for out in (next(filt.eval(iter([batch]))), next(filt.train(iter([batch]), 0))):
        assert len(set(out["item_id"].tolist()) - {OOV_ID}) <= 3


def test_cross_tables_get_counted_for_mba(data):
    ds = PreparedDataset.open(data)
    model = build_model(ds.schema, ModelConfig(model="wide_deep", ad_bias=True))
    counts = ds.counts()
    missing = tables_without_counts(model, counts)
    assert missing == ["item_id.bias", "cate_id.bias", "wide_hist_item_id", "wide_hist_cate_id"]
    batch = ds.read_split("train")
    got = table_counts(model, missing, iter([batch]))
    ids = model.sparse_inputs({k: torch.from_numpy(v) for k, v in batch.items()})
    cross = ids["wide.hist_item_id"][1].numpy()
    j = int(cross[0][cross[0] != PAD_ID][0])
    assert got["wide_hist_item_id"][j] == int((cross == j).any(1).sum())
    assert got["wide_hist_item_id"][PAD_ID] == 0


@pytest.mark.parametrize("reg", ["mba", "l2", "difacto", "dropout", "filter", "none"])
def test_each_regularizer_trains_and_its_checkpoint_evaluates_identically(data, tmp_path, reg):
    cfg = TrainConfig.create(data=str(data), output=str(tmp_path / reg), model="base", reg=reg,
                      filter_top_k=5, epochs=1, batch_size=64, embedding_dim=4,
                      mlp_hidden=(8, 4), patience=0, lam=0.5)
    result = run_local(cfg)
    assert np.isfinite(result["logloss"]) and 0 <= result["gauc"] <= 1
    again = evaluate_checkpoint(tmp_path / reg / "checkpoint", data)
    assert again["gauc"] == pytest.approx(result["gauc"], abs=1e-12)


def test_regularizers_change_the_trained_weights(data, tmp_path):
    def item_table(reg):
        cfg = TrainConfig.create(data=str(data), output=str(tmp_path / reg), model="base", reg=reg,
                          epochs=1, batch_size=64, embedding_dim=4, mlp_hidden=(8, 4),
                          patience=0, lam=1.0, optimizer="sgd", lr=0.05)
        run_local(cfg)
        from din_ray.checkpoint import load_model

        _, tables, _ = load_model(tmp_path / reg / "checkpoint")
        return tables.weight("item_id").clone()

    none, mba, l2 = item_table("none"), item_table("mba"), item_table("l2")
    assert not torch.allclose(none, mba) and not torch.allclose(none, l2)
    # Shrinkage: both pull the embedding norms below the unregularized ones.
    assert mba.norm() < none.norm() and l2.norm() < none.norm()


# --- MBA as Eq. (7) defines it (issue 12, items 5-7) --------------------------------------------
def one_row_after_touches(lam, reg_form, kind="adam", lr=1e-3, touches=20, w0=0.05):
    """Row 2 of a dim-1 table (n_2 = 1) starting at w0, touched `touches` times with a zero
    data gradient, so only the MBA term moves it. -> its final value"""
    tables = EmbeddingTables({"t": TableSpec("t", 4, 1, zero_init=True)})
    tables.weight("t")[2] = w0
    opt = RowWiseOptimizer(tables, kind, lr=lr, reg_form=reg_form)
    reg = MiniBatchAware(lam, {"t": np.array([0, 0, 1, 1])})
    for _ in range(touches):
        opt.step({"t": (torch.tensor([2]), torch.zeros(1, 1))}, reg)
    return float(tables.weight("t")[2, 0])


def test_decoupled_adam_shrinks_in_proportion_to_lambda_where_coupled_ignores_it():
    lams = (0.01, 0.1, 1.0)
    decoupled = [one_row_after_touches(lam, "decoupled") for lam in lams]
    coupled = [one_row_after_touches(lam, "coupled") for lam in lams]
    sgd = [one_row_after_touches(lam, "coupled", "sgd", lr=0.2) for lam in lams]
    print("decoupled adam", decoupled, "\ncoupled adam", coupled, "\nsgd", sgd)
    # Decoupled: w <- w (1 - lr λ / n_j) per touch, as SGD would shrink it.
    for lam, w in zip(lams, decoupled):
        assert w == pytest.approx(0.05 * (1 - 1e-3 * lam) ** 20, rel=1e-5)
    assert decoupled[0] > decoupled[1] > decoupled[2]
    # Coupled: Adam normalises the penalty away; about lr per touch whatever λ is (the issue).
    assert max(coupled) - min(coupled) < 1e-4 and coupled[0] == pytest.approx(0.03, abs=1e-3)
    # Under SGD the two forms are the same update.
    assert sgd == [one_row_after_touches(lam, "decoupled", "sgd", lr=0.2) for lam in lams]
    assert TrainConfig.create(data="x").regularization.reg_form == "decoupled"
    with pytest.raises(ValueError, match="reg_form must be one of"):
        TrainConfig.create(data="x", reg_form="adamw")


def penalty_against_data(batch_size, world_size, lam=0.5):
    """One SGD step over a global batch of batch_size x world_size samples (what N workers
    with per-worker batches apply: `tests/embeddings/test_sharding.py` shows N workers equal one
    on the same global batch) touching rare row 2 (n_2 = 1) once, with the regularizer the training
    loop builds for that world size. -> the row's move from MBA / its move from the data"""
    counts = {"t": np.array([0, 0, 1, 1])}
    global_batch = batch_size * world_size
    moves = []
    for lam_ in (0.0, lam):
        tables = EmbeddingTables({"t": TableSpec("t", 4, 1, zero_init=True)})
        tables.weight("t")[2] = 0.3
        opt = RowWiseOptimizer(tables, "sgd", lr=1.0)
        reg = build_regularizer("mba", lam_, counts, global_batch=global_batch)
        data_grad = torch.full((1, 1), 1.0 / global_batch)  # one sample of the batch's mean loss
        opt.step({"t": (torch.tensor([2]), data_grad)}, reg)
        moves.append(0.3 - float(tables.weight("t")[2, 0]))
    return (moves[1] - moves[0]) / moves[0]


def test_lambda_weighs_the_same_against_the_data_at_one_and_two_workers():
    one, two = penalty_against_data(64, 1), penalty_against_data(64, 2)
    print(f"penalty / data move: 1 worker {one:.6f}, 2 workers {two:.6f}")
    assert two == pytest.approx(one, rel=1e-3)  # float32 rows; unscaled, two would be 2x one
    # λ is defined for a global batch of LAMBDA_BATCH: there it is Eq. (7) unscaled.
    assert penalty_against_data(LAMBDA_BATCH, 1) == pytest.approx(
        0.5 * 0.3 / (1.0 / LAMBDA_BATCH), rel=1e-3)


class _TwoWorkerEnv(LocalEnv):
    """The local environment claiming two workers (counts are already global here)."""

    world_size = 2


def test_training_loop_counts_bias_rows_per_candidate_and_centres_them_on_the_prior(data):
    ds = PreparedDataset.open(data)
    cfg = TrainConfig.create(data=str(data), model="din", batch_size=32, lam=0.1, ad_bias=True)
    model = build_model(ds.schema, cfg.model)
    env = LocalEnv(cfg, ds)
    prior = bias_prior(model, env, cfg)
    reg = embedding_regularizer(cfg, model, ds, env, BatchRegularizer(cfg, ds), prior)
    train = ds.read_split("train")
    # n_j of the bias table: samples whose candidate is j, not the history occurrences too.
    n = np.bincount(train["item_id"], minlength=len(ds.counts()["item_id"]))
    assert not np.array_equal(n, ds.counts()["item_id"])
    torch.testing.assert_close(reg._inv("item_id.bias"),
                               torch.from_numpy(1.0 / np.maximum(n, 1)).float())
    # The bias rows are pulled towards their warm start, the prior click rate.
    assert set(reg.centers) == {"item_id.bias"}
    assert torch.equal(reg.centers["item_id.bias"], prior["item_id.bias"])
    j = int(np.argmax(n))
    at_prior = prior["item_id.bias"][[j]]
    assert torch.equal(reg.penalty("item_id.bias", torch.tensor([j]), at_prior),
                       torch.zeros(1, 1))
    # λ for the global batch: two workers of 32 are one step of 64.
    two = embedding_regularizer(cfg, model, ds, _TwoWorkerEnv(cfg, ds), BatchRegularizer(cfg, ds),
                                prior)
    assert reg.strength == pytest.approx(0.1 * LAMBDA_BATCH / 32)
    assert two.strength == pytest.approx(0.1 * LAMBDA_BATCH / 64)


@pytest.mark.parametrize("centred", [True, False], ids=["prior", "zero"])
def test_bias_on_a_5_percent_log_settles_at_the_true_rate_when_pulled_to_its_prior(centred):
    # One item seen n_j = 200 times an epoch at 5 % CTR, one sample per global batch of 256,
    # λ = 0.01. Pulled towards logit 0 the bias settles where n_j (p - 0.05) / 256 = -λ w,
    # about 0.01 · 256 · 2.9 / n_j = 7.5 / n_j above the true rate.
    n_j, rate = 200, 0.05
    prior = torch.logit(torch.tensor([[0.0], [0.0], [rate]]))
    centers = {"item_id.bias": prior} if centred else None
    reg = build_regularizer("mba", 0.01, {"item_id.bias": np.array([0, 0, n_j])},
                            global_batch=256, centers=centers)
    tables = EmbeddingTables({"item_id.bias": TableSpec("item_id.bias", 3, 1, zero_init=True)})
    tables.weight("item_id.bias")[2] = prior[2]
    opt = RowWiseOptimizer(tables, "sgd", lr=20.0)
    labels = (np.arange(n_j) % 20 == 0).astype(np.float32)  # 10 clicks in 200
    rates = []
    for epoch in range(30):
        for y in labels:
            w = tables.weight("item_id.bias")[2]
            grad = (torch.sigmoid(w) - float(y)).reshape(1, 1) / 256  # d mean loss / d w
            opt.step({"item_id.bias": (torch.tensor([2]), grad)}, reg)
            if epoch == 29:
                rates.append(float(torch.sigmoid(tables.weight("item_id.bias")[2, 0])))
    settled = float(np.mean(rates))
    print(f"{'prior' if centred else 'zero'}-centred bias settles at CTR {settled:.4f}")
    if centred:
        assert settled == pytest.approx(rate, abs=0.003)
    else:
        assert settled - rate == pytest.approx(7.5 / n_j, rel=0.3)
