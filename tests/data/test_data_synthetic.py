"""Synthetic generator: determinism, chunked streaming, layout invariants, and the planted
local-activation effect."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from din_ray.data.format import PreparedDataset
from din_ray.data.synthetic import prepare_synthetic

SPLITS = ("train", "valid", "test")


def read_all(out) -> tuple[PreparedDataset, dict[str, dict[str, np.ndarray]]]:
    ds = PreparedDataset.open(out)
    return ds, {s: ds.read_split(s) for s in SPLITS}


def overlap(cols: dict[str, np.ndarray]) -> np.ndarray:
    """History behaviours in the candidate's category, per row."""
    return (cols["hist_cate_id"] == cols["cate_id"][:, None]).sum(axis=1)


def test_deterministic_and_seeded(tmp_path):
    kw = dict(rows=3_000, max_history=10, chunk_rows=1_000)
    a = prepare_synthetic(tmp_path / "a", seed=7, **kw)
    b = prepare_synthetic(tmp_path / "b", seed=7, **kw)
    c = prepare_synthetic(tmp_path / "c", seed=8, **kw)
    for split in SPLITS:
        fa, fb = PreparedDataset.open(a).files(split), PreparedDataset.open(b).files(split)
        assert [f.name for f in fa] == [f.name for f in fb]
        for x, y in zip(fa, fb, strict=True):
            assert pq.read_table(x).equals(pq.read_table(y))
    np.testing.assert_array_equal(PreparedDataset.open(a).counts()["item_id"],
                                  PreparedDataset.open(b).counts()["item_id"])
    ta, tc = read_all(a)[1]["train"], read_all(c)[1]["train"]
    assert ta["label"].shape != tc["label"].shape or not all(
        np.array_equal(ta[k], tc[k]) for k in ta)


def test_chunked_layout_invariants(tmp_path):
    rows, L = 5_000, 8
    out = prepare_synthetic(tmp_path / "s", rows=rows, users=300, items=120, categories=24,
                            max_history=L, chunk_rows=700, seed=1, valid_frac=0.2, test_frac=0.1)
    ds, got = read_all(out)
    assert sum(ds.num_rows(s) for s in SPLITS) == rows
    assert ds.manifest["params"]["chunk_rows"] == 700
    assert ds.schema.name == "synthetic" and ds.schema.max_history == L
    assert [f.name for f in ds.schema.features] == ["item_id", "cate_id", "hist_item_id",
                                                    "hist_cate_id"]
    assert ds.schema.feature("item_id").vocab_size == 120 + 2
    assert ds.schema.feature("cate_id").vocab_size == 24 + 2

    users = {s: set(got[s]["user"].tolist()) for s in SPLITS}
    assert not (users["train"] & users["valid"] or users["train"] & users["test"]
                or users["valid"] & users["test"])
    assert len(users["train"] | users["valid"] | users["test"]) == 300
    assert (len(users["valid"]), len(users["test"])) == (60, 30)

    vocab_item, vocab_cate = ds.vocab("item_id"), ds.vocab("cate_id")
    assert len(vocab_item) == 120 and len(vocab_cate) == 24
    item_cate = {}
    for s in SPLITS:
        cols = got[s]
        hist, hcate = cols["hist_item_id"], cols["hist_cate_id"]
        real = hist != 0
        assert ((hcate != 0) == real).all()
        assert not (~real[:, :-1] & real[:, 1:]).any(), "PAD only after the last behaviour"
        assert (real.sum(1) == 0).any() and (real.sum(1) < L).any() and (real.sum(1) == L).any()
        assert cols["item_id"].min() >= 2 and cols["item_id"].max() < 122
        assert cols["cate_id"].min() >= 2 and cols["cate_id"].max() < 26
        # Every item belongs to exactly one category, in candidates and histories alike.
        for i, c in zip(np.r_[cols["item_id"], hist[real]], np.r_[cols["cate_id"], hcate[real]],
                        strict=True):
            assert item_cate.setdefault(int(i), int(c)) == int(c)
        # Several samples per user and many users with both labels (GAUC needs them).
        _, per_user = np.unique(cols["user"], return_counts=True)
        assert per_user.mean() > 10
    # Counts are n_j over train samples, PAD excluded.
    tr = got["train"]
    want = np.zeros(122, np.int64)
    for i in range(len(tr["label"])):
        for j in {int(tr["item_id"][i]), *tr["hist_item_id"][i].tolist()} - {0}:
            want[j] += 1
    np.testing.assert_array_equal(ds.counts()["item_id"], want)
    assert len(ds.files("train")) >= 1


def test_train_split_spread_over_files(tmp_path):
    out = prepare_synthetic(tmp_path / "s", rows=40_000, max_history=5, chunk_rows=15_000)
    ds = PreparedDataset.open(out)
    assert len(ds.files("train")) >= 3
    assert sum(ds.num_rows(s) for s in SPLITS) == 40_000


def test_planted_signal(tmp_path):
    rates = {}
    for signal in (0.0, 1.0):
        out = prepare_synthetic(tmp_path / f"s{signal}", rows=20_000, max_history=20,
                                signal=signal, seed=3)
        cols = read_all(out)[1]["train"]
        hit = overlap(cols) > 0
        rates[signal] = (cols["label"][hit].mean(), cols["label"][~hit].mean(), hit.mean())
    in0, out0, share = rates[0.0]
    assert 0.3 < share < 0.7  # both kinds of candidates are common
    assert abs(in0 - out0) < 0.03  # no signal: clicks ignore the history
    in1, out1, _ = rates[1.0]
    assert in1 - out1 > 0.2  # strong signal: in-interest candidates clicked far more
    # The history's share of the candidate's category matters, not just any overlap.
    out = tmp_path / "s1.0"
    cols = read_all(out)[1]["train"]
    n = (cols["hist_cate_id"] != 0).sum(1)
    frac = overlap(cols) / np.maximum(n, 1)
    lo, hi = cols["label"][(frac > 0) & (frac < 0.2)].mean(), cols["label"][frac > 0.4].mean()
    assert hi - lo > 0.15


@pytest.mark.parametrize("kwargs", [
    {"rows": 0}, {"rows": 100, "users": 200}, {"rows": 100, "categories": 3},
    {"rows": 100, "items": 10, "categories": 20}, {"rows": 100, "signal": -1.0},
    {"rows": 100, "interests_per_user": (3, 2)}, {"rows": 100, "valid_frac": 0.6,
                                                  "test_frac": 0.4},
])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        prepare_synthetic(tmp_path / "s", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_prepare_synthetic(tmp_path, capsys):
    import argparse

    from din_ray.cli import prepare as commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "syn"
    args = parser.parse_args(["prepare", "synthetic", "--rows", "2000", "--output", str(out),
                              "--signal", "2", "--seed", "5", "--max-history", "7",
                              "--interests", "1", "3", "--chunk-rows", "600"])
    assert args.func(args) == 0
    assert str(out) in capsys.readouterr().out
    ds = PreparedDataset.open(out)
    params = ds.manifest["params"]
    assert (params["rows"], params["signal"], params["seed"]) == (2000, 2.0, 5)
    assert params["interests_per_user"] == [1, 3] and ds.schema.max_history == 7
