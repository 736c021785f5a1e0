"""Impression + behaviour logs prepared with Ray Data (din_ray.data.logs.pipeline) on a real
local Ray: no future (or same-instant) behaviour in any history, histories equal to a brute-force
reference over several buckets and units, vocabularies from the training period only, time
splits, malformed rows counted and reported with file/line/field/value, the threshold failing the
job with nothing written, spec errors naming the key, and DIN training on the output with 1 and 2
workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from builders import tiny_config

from din_ray.data.format import DataError, PreparedDataset
from din_ray.data.ids import RawIdError, load_encoders
from din_ray.data.logs.pipeline import prepare_logs
from din_ray.data.logs.spec import SpecError, load_spec, parse_spec
from din_ray.data.logs.split import TimeHistogram
from din_ray.data.logs.synthetic import write_synthetic_logs
from din_ray.schema import OOV_ID, PAD_ID


def write(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


# --- hand-made CSV log: leakage, joins, type filter, malformed rows under the limit ---------------
IMPRESSIONS = """
user,time_stamp,adgroup_id,pid,clk
1,100,10,p1,1
1,200,11,p2,0
2,150,10,p1,0
2,400,12,p1,1
1,450,10,p2,0
x,500,11,p2,1
3,abc,11,p2,1
3,460,11,p2,2
3,470,11,p2
"""
# User 1: cate 21 at 50 (past), 22 at exactly 100 (same instant as the first impression),
# 23 at 150, 24 at 600 (after every impression of user 1). User 2 has cate 24 early, so 24 is in
# the vocabulary and its id could appear if the future leaked. Type "zz" is filtered out.
BEHAVIORS = """
user,time_stamp,btag,cate,brand
1,50,pv,21,b1
1,100,pv,22,b2
1,150,cart,23,NULL
1,600,buy,24,b4
2,10,pv,24,b4
2,20,zz,25,b5
2,160,pv,21,b1
"""
ADS = """
adgroup_id,cate_id,brand
10,21,b1
11,22,NULL
12,23,b3
"""
SPEC = {
    "name": "handmade",
    "max_history": 2,
    "impressions": {"path": "imp.csv", "user": "user", "timestamp": "time_stamp",
                    "label": {"column": "clk", "positive": [1], "negative": [0]}},
    "behaviors": {"path": "beh.csv", "user": "user", "timestamp": "time_stamp",
                  "type": {"column": "btag", "keep": ["pv", "cart", "fav", "buy"]}},
    "joins": {"ad": {"path": "ads.csv", "key": "adgroup_id", "column": "adgroup_id"}},
    "features": {
        "adgroup_id": {"group": "ad", "column": "adgroup_id"},
        "cate_id": {"group": "ad", "from": "ad", "column": "cate_id"},
        "brand": {"group": "ad", "from": "ad", "column": "brand", "type": "str"},
        "pid": {"group": "context", "column": "pid", "type": "str"},
        "hist_cate_id": {"group": "behavior", "column": "cate", "aligned_with": "cate_id"},
        "hist_brand": {"group": "behavior", "column": "brand", "aligned_with": "brand"},
    },
    "split": {"valid_start": 300, "test_start": 420},
    "malformed": {"max_count": 4, "show": 10},
}


def handmade(root: Path, spec: dict = SPEC) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write(root / "imp.csv", IMPRESSIONS)
    write(root / "beh.csv", BEHAVIORS)
    write(root / "ads.csv", ADS)
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


def rows_by_split(ds: PreparedDataset) -> dict[str, list[dict]]:
    out = {}
    for split in ("train", "valid", "test"):
        cols = ds.read_split(split) if ds.files(split) else {}
        n = len(cols.get("label", []))
        out[split] = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    return out


@pytest.fixture(scope="module")
def handmade_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("handmade")
    report = prepare_logs(handmade(root), root / "out")
    return root, report, PreparedDataset.open(root / "out")


def test_history_holds_only_strictly_earlier_behaviours(handmade_run):
    _, _, ds = handmade_run
    cate = ds.vocab("cate_id")
    brand = ds.vocab("brand")
    rows = rows_by_split(ds)
    by_key = {}
    for split, items in rows.items():
        for r in items:
            by_key[(int(r["user"]), split, int(r["adgroup_id"]), int(r["pid"]))] = r
    ad, pid = ds.vocab("adgroup_id"), ds.vocab("pid")

    def row(user, split, adgroup, p):
        return by_key[(user, split, ad.get(adgroup, OOV_ID), pid[p])]

    # User 1 at t=100: only cate 21 (t=50); cate 22 has the SAME timestamp and is excluded.
    r = row(1, "train", "10", "p1")
    assert list(r["hist_cate_id"]) == [cate["21"], PAD_ID]
    assert list(r["hist_brand"]) == [brand["b1"], PAD_ID]
    # User 1 at t=200: 21, 22, 23 are earlier; the 2 most recent are kept, oldest first. Brand
    # NULL is a missing value: OOV, never PAD (which would mask a real behaviour).
    r = row(1, "train", "11", "p2")
    assert list(r["hist_cate_id"]) == [cate["22"], cate["23"]]
    assert list(r["hist_brand"]) == [brand["b2"], OOV_ID]
    # User 1 at t=450 (test): still 22, 23; the behaviour at t=600 is in the future.
    r = row(1, "test", "10", "p2")
    assert list(r["hist_cate_id"]) == [cate["22"], cate["23"]]
    # The future behaviour's cate (24) is in the vocabulary (user 2 saw it early) but never
    # appears in a history of user 1.
    assert "24" in cate
    for items in rows.values():
        for r in items:
            if r["user"] == 1:
                assert cate["24"] not in r["hist_cate_id"]
                assert brand["b4"] not in r["hist_brand"]
    # User 2 at t=150: 24 (t=10); the "zz" behaviour at t=20 is filtered by type.
    r = row(2, "train", "10", "p1")
    assert list(r["hist_cate_id"]) == [cate["24"], PAD_ID]
    # User 2 at t=400 (valid): 24 and 21 (t=160).
    r = row(2, "valid", "12", "p1")
    assert list(r["hist_cate_id"]) == [cate["24"], cate["21"]]


def test_splits_vocab_and_counts_come_from_the_training_period(handmade_run):
    _, report, ds = handmade_run
    assert report.rows == {"train": 3, "valid": 1, "test": 1}
    assert (report.valid_start, report.test_start) == (300, 420)
    # adgroup 12 is only shown in the validation period: not in the training vocabulary.
    assert set(ds.vocab("adgroup_id")) == {"10", "11"}
    assert ds.read_split("valid")["adgroup_id"].tolist() == [OOV_ID]
    # Behaviours before valid_start count; the t=600 one does not, "zz" is filtered.
    # cate 21: ad 10 x2 + behaviours t=50, t=160; 24: one behaviour (t=10); 22, 23: one each.
    cate = ds.vocab("cate_id")
    assert cate["21"] == 2 and set(cate) == {"21", "22", "23", "24"}
    counts = ds.counts()
    train = ds.read_split("train")
    for j in range(len(counts["cate_id"])):
        expect = sum(1 for i in range(3) if j != PAD_ID and (
            train["cate_id"][i] == j or j in train["hist_cate_id"][i]))
        assert counts["cate_id"][j] == expect
    # Behaviour and ad features share one table.
    schema = ds.schema
    assert schema.feature("hist_cate_id").table == schema.feature("cate_id").table == "cate_id"
    assert schema.feature("hist_brand").table == "brand"


def test_local_executor_writes_the_same_dataset(handmade_run, tmp_path):
    root, report, ds = handmade_run
    local = prepare_logs(root / "spec.yaml", tmp_path / "local", executor="local")
    assert local.rows == report.rows and local.files == report.files
    other = PreparedDataset.open(tmp_path / "local")
    assert other.schema == ds.schema
    for split in ("train", "valid", "test"):
        a, b = ds.read_split(split), other.read_split(split)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(c, other.counts()[t]) for t, c in ds.counts().items())


def test_malformed_rows_are_counted_per_file_with_line_field_value(handmade_run):
    root, report, _ = handmade_run
    files = {Path(f["path"]).name: f for f in report.files}
    imp = files["imp.csv"]
    assert imp["rows"] == 9 and imp["malformed"] == 4
    text = "\n".join(imp["examples"])
    assert "line 7: field 'user': 'x' (user id is not an integer)" in text
    assert "line 8: field 'time_stamp': 'abc' (timestamp is not an integer)" in text
    assert "line 9: field 'clk': '2' (label is not one of ['1', '0'])" in text
    assert "line 10: field '<row>'" in text  # wrong number of fields
    beh = files["beh.csv"]
    assert (beh["malformed"], beh["filtered"], beh["missing"]) == (0, 1, {"hist_brand": 1})
    assert files["ads.csv"]["missing"] == {"brand": 1}
    assert PreparedDataset.open(root / "out").manifest["params"]["report"]["malformed"] == 4


def test_too_many_malformed_rows_fail_and_write_nothing(ray_cluster, tmp_path):
    spec = {**SPEC, "malformed": {"max_count": 3, "show": 2}}
    path = handmade(tmp_path, spec)
    with pytest.raises(DataError) as err:
        prepare_logs(path, tmp_path / "out")
    msg = str(err.value)
    assert "4 of" in msg and "imp.csv: 4 of 9 rows malformed" in msg
    assert "imp.csv line 7: field 'user': 'x'" in msg
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # A column the spec names but the file lacks: the file and the column are named.
    spec = {**SPEC, "behaviors": {**SPEC["behaviors"], "timestamp": "ts"}}
    with pytest.raises(DataError, match=r"beh.csv line 1: column\(s\) \['ts'\] not found"):
        prepare_logs(handmade(tmp_path / "cols", spec), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# --- random Parquet log vs a brute-force reference ---------------------------------------------
def random_log(root: Path, seed: int = 0) -> tuple[Path, dict]:
    rng = np.random.default_rng(seed)
    n_imp, n_beh, users = 400, 1200, 25
    imp = {"user": rng.integers(1, users + 1, n_imp), "ts": rng.integers(0, 60, n_imp),
           "item": rng.integers(0, 40, n_imp), "pid": rng.choice(["a", "b"], n_imp),
           "rowid": np.arange(n_imp), "clk": rng.integers(0, 2, n_imp)}
    beh = {"user": rng.integers(1, users + 2, n_beh), "ts": rng.integers(0, 60, n_beh),
           "cate": rng.integers(0, 12, n_beh), "brand": rng.choice([f"b{k}" for k in range(9)],
                                                                   n_beh)}
    ads = {"item": np.arange(40), "cate": rng.integers(0, 12, 40),
           "brand": rng.choice([f"b{k}" for k in range(9)], 40)}
    profile = {"uid": np.arange(1, users + 1), "age": rng.integers(0, 5, users)}
    (root / "imp").mkdir(parents=True)
    (root / "beh").mkdir()
    # Two files each, small row groups: several units per file.
    for part in range(2):
        sl = slice(part * n_imp // 2, (part + 1) * n_imp // 2)
        pq.write_table(pa.table({k: v[sl] for k, v in imp.items()}),
                       root / "imp" / f"part-{part}.parquet", row_group_size=50)
        sl = slice(part * n_beh // 2, (part + 1) * n_beh // 2)
        pq.write_table(pa.table({k: v[sl] for k, v in beh.items()}),
                       root / "beh" / f"part-{part}.parquet", row_group_size=100)
    pq.write_table(pa.table(ads), root / "ads.parquet")
    pq.write_table(pa.table(profile), root / "profile.parquet")
    spec = {
        "name": "random", "max_history": 5, "rows_per_bucket": 300, "unit_rows": 100,
        "impressions": {"path": "imp", "user": "user", "timestamp": "ts", "label": "clk"},
        "behaviors": {"path": "beh", "user": "user", "timestamp": "ts"},
        "joins": {"ad": {"path": "ads.parquet", "key": "item", "column": "item"},
                  "profile": {"path": "profile.parquet", "key": "uid", "column": "user"}},
        "features": {
            "item": {"group": "ad", "column": "item", "hash_buckets": 7},
            "cate_id": {"group": "ad", "from": "ad", "column": "cate", "min_count": 3},
            "brand": {"group": "ad", "from": "ad", "column": "brand", "type": "str"},
            "age": {"group": "user", "from": "profile", "column": "age"},
            "pid": {"group": "context", "column": "pid", "type": "str"},
            "rowid": {"group": "context", "column": "rowid"},
            "hist_cate_id": {"group": "behavior", "column": "cate", "aligned_with": "cate_id"},
            "hist_brand": {"group": "behavior", "column": "brand", "aligned_with": "brand"},
        },
        "split": {"valid": 0.2, "test": 0.2},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml", {"imp": imp, "beh": beh, "ads": ads, "profile": profile}


@pytest.fixture(scope="module")
def random_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("random")
    spec, raw = random_log(root)
    report = prepare_logs(spec, root / "out")
    return root, report, raw, PreparedDataset.open(root / "out")


def test_histories_match_a_brute_force_reference(random_run):
    _, report, raw, ds = random_run
    assert report.buckets > 1 and report.units >= 6  # the shuffle really partitions
    imp, beh = raw["imp"], raw["beh"]
    L = ds.schema.max_history
    cate, brand, rowid = ds.vocab("cate_id"), ds.vocab("brand"), ds.vocab("rowid")
    id_to_row = {v: int(k) for k, v in rowid.items()}
    # Behaviours in file order, stably sorted by time: equal timestamps keep file order.
    order = np.argsort(beh["ts"], kind="stable")
    seen = 0
    for split in ("train", "valid", "test"):
        cols = ds.read_split(split)
        for i in range(len(cols["label"])):
            if split != "train":
                continue  # rowid is OOV outside training; valid/test checked below by count
            r = id_to_row[int(cols["rowid"][i])]
            u, t = imp["user"][r], imp["ts"][r]
            past = [j for j in order if beh["user"][j] == u and beh["ts"][j] < t][-L:]
            want_c = [cate.get(str(beh["cate"][j]), OOV_ID) for j in past]
            want_b = [brand.get(beh["brand"][j], OOV_ID) for j in past]
            pad = [PAD_ID] * (L - len(past))
            assert list(cols["hist_cate_id"][i]) == want_c + pad, (r, u, t)
            assert list(cols["hist_brand"][i]) == want_b + pad
            assert cols["label"][i] == imp["clk"][r] and cols["user"][i] == u
            assert cols["cate_id"][i] == cate.get(str(raw["ads"]["cate"][imp["item"][r]]),
                                                  OOV_ID)
            assert 2 <= cols["item"][i] < 9  # hashed into 7 buckets after PAD/OOV
            seen += 1
    assert seen == report.rows["train"]
    # Time split: every impression lands in the split its timestamp says, none is lost.
    ts = imp["ts"]
    want = {"train": int((ts < report.valid_start).sum()),
            "valid": int(((ts >= report.valid_start) & (ts < report.test_start)).sum()),
            "test": int((ts >= report.test_start).sum())}
    assert report.rows == want
    assert 0.5 < want["train"] / len(ts) < 0.7  # fractions 0.6/0.2/0.2, up to timestamp ties
    # Histories of valid/test rows: same multiset of lengths as the reference.
    for split in ("valid", "test"):
        lo, hi = ((report.valid_start, report.test_start) if split == "valid"
                  else (report.test_start, 10**9))
        ref = sorted(min(L, int(((beh["user"] == u) & (beh["ts"] < t)).sum()))
                     for u, t in zip(imp["user"], ts, strict=True) if lo <= t < hi)
        got = sorted(int((row != PAD_ID).sum()) for row in ds.read_split(split)["hist_cate_id"])
        assert got == ref


def test_vocabulary_min_count_over_the_training_period(random_run):
    _, report, raw, ds = random_run
    imp, beh, ads = raw["imp"], raw["beh"], raw["ads"]
    vs = report.valid_start
    counts: dict[str, int] = {}
    for c in ads["cate"][imp["item"][imp["ts"] < vs]]:
        counts[str(c)] = counts.get(str(c), 0) + 1
    for c in beh["cate"][beh["ts"] < vs]:
        counts[str(c)] = counts.get(str(c), 0) + 1
    assert set(ds.vocab("cate_id")) == {c for c, n in counts.items() if n >= 3}
    # Most frequent first.
    by_id = sorted(ds.vocab("cate_id").items(), key=lambda kv: kv[1])
    assert [counts[c] for c, _ in by_id] == sorted((counts[c] for c, _ in by_id), reverse=True)
    # Hashed table: vocabulary of buckets, no vocab file; recorded in the schema.
    assert ds.schema.feature("item").vocab_size == 9 and ds.vocab("item") == {}
    assert ds.schema.extra["hashed"] == {"item": 7}
    assert ds.schema.extra["hash_types"] == {"item": "int"}


def test_serving_encodes_raw_ids_as_preparation_did(random_run):
    # Serving maps a request's raw ids with the prepared data's vocabularies and the hashing the
    # schema records: every training row's prepared ids must come back from its raw values.
    _, _, raw, ds = random_run
    encoders = load_encoders(ds.root, ds.schema)
    rowid = {v: int(k) for k, v in ds.vocab("rowid").items()}
    cols = ds.read_split("train")
    for i in range(len(cols["label"])):
        r = rowid[int(cols["rowid"][i])]
        item = int(raw["imp"]["item"][r])
        assert encoders["item"].encode(item) == cols["item"][i]
        assert encoders["item"].encode(str(item)) == cols["item"][i]  # "296" == 296
        assert encoders["brand"].encode(str(raw["ads"]["brand"][item])) == \
            cols["brand"][i]
    with pytest.raises(RawIdError, match="hashes integer ids"):
        encoders["item"].encode("not-a-number")


def test_training_on_prepared_logs_with_one_and_two_workers(random_run, tmp_path):
    from din_ray.train.distributed import run_ray
    from din_ray.train.local import run_local

    root = random_run[0]
    common = dict(batch_size=32, threads=1)
    one = run_local(tiny_config(root / "out", tmp_path / "one", **common))
    two = run_ray(tiny_config(root / "out", tmp_path / "two", workers=2, replicate_below=20,
                              **common))
    for result in (one, two):
        assert np.isfinite(result["history"][0]["train_loss"])
        assert 0.0 <= result["auc"] <= 1.0
    assert (tmp_path / "two" / "checkpoint").is_dir()


# --- pieces without Ray -------------------------------------------------------------------------
@pytest.mark.parametrize("patch, key", [
    ({"features": {"a": {"group": "ad", "column": "a", "min_count": 0},
                   "h": {"group": "behavior", "column": "a", "aligned_with": "a"}}},
     "features.a.min_count"),
    ({"features": {"a": {"group": "ad", "column": "a"},
                   "h": {"group": "behavior", "column": "a", "aligned_with": "nope"}}},
     "features.h.aligned_with"),
    ({"features": {"a": {"group": "ad", "column": "a"}}}, "features: DIN needs"),
    ({"features": {"a": {"group": "ad", "column": "a", "from": "x"},
                   "h": {"group": "behavior", "column": "a", "aligned_with": "a"}}},
     "features.a.from"),
    ({"split": {"valid": 0.6, "test": 0.5}}, "split: valid + test"),
    ({"split": {"valid": 0.1, "test_start": 5}}, "split: give either"),
    ({"joins": {"ad": {"path": "x", "key": "k"}}}, "joins.ad.column"),
    ({"impressions": {"path": "x", "user": "u", "timestamp": "t"}}, "impressions.label"),
    ({"malformed": {"max_fraction": 2}}, "malformed.max_fraction"),
    ({"typo": 1}, "unknown key(s) ['typo']"),
])
def test_spec_errors_name_the_key(patch, key):
    base = {"impressions": {"path": "i.csv", "user": "u", "timestamp": "t", "label": "y"},
            "behaviors": {"path": "b.csv", "user": "u", "timestamp": "t"},
            "features": {"a": {"group": "ad", "column": "a"},
                         "h": {"group": "behavior", "column": "a", "aligned_with": "a"}}}
    with pytest.raises(SpecError) as err:
        parse_spec({**base, **patch})
    assert key in str(err.value)


def test_example_spec_loads():
    spec = load_spec(Path(__file__).parents[2] / "examples" / "log_spec.yaml")
    assert spec.feature("hist_cate_id").aligned_with == "cate_id"


def test_time_histogram_coarsens_but_keeps_quantiles():
    ts = np.random.default_rng(0).integers(0, 10**9, 300_000)
    h = TimeHistogram.of(ts[:150_000]).merge(TimeHistogram.of(ts[150_000:]))
    assert h.total == len(ts) and len(h.keys) <= 1 << 18
    cut = h.cut(0.8)
    assert abs((ts < cut).mean() - 0.8) < 0.01


def test_synthetic_logs_are_deterministic_and_sized(tmp_path):
    a = write_synthetic_logs(tmp_path / "a", 3000, chunk_users=40)
    b = write_synthetic_logs(tmp_path / "b", 3000, chunk_users=40)
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*.parquet"))
    assert files and all((a.parent / f).read_bytes() == (b.parent / f).read_bytes()
                         for f in files)
    imp = pq.read_table(a.parent / "impressions")
    beh = pq.read_table(a.parent / "behaviors")
    assert imp.num_rows == 3000 and beh.num_rows == 6000
    assert set(imp.column("clk").to_pylist()) == {0, 1}
    load_spec(a)  # the written spec is valid
