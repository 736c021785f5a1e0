"""Amazon reviews -> prepared data: the original DIN protocol, the processed text layout, and the
vendored samples (including the truncated gzip)."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from din_ray.data.amazon import (
    LineReader,
    prepare_amazon,
    prepare_amazon_processed,
    read_categories,
    read_reviews,
)
from din_ray.data.format import DataError, PreparedDataset
from din_ray.schema import OOV_ID, PAD_ID

SAMPLES = Path("/work/shared/data/amazon-electronics")
if not SAMPLES.exists():  # the shared samples may live beside the repository instead
    SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon-electronics"
REVIEWS_GZ = SAMPLES / "paddlerec-din" / "reviews_Electronics_5.json.gz"
PROCESSED = SAMPLES / "paddlerec-din" / "sample_data.txt"

# user -> [(asin, time)] in a scrambled file order; times decide the sequence.
USERS = {
    "U1": [("A3", 30), ("A1", 10), ("A2", 20), ("A5", 40)],
    "U2": [("A2", 5), ("A4", 7), ("A6", 6)],
    "U3": [("A1", 1), ("A7", 2)],  # two reviews: a test pair only
    "U4": [("A8", 3)],  # one review: no sample
}
# Python literals, as the 2014 meta file writes them (single quotes: not JSON).
META = [
    {"asin": "A1", "categories": [["Electronics", "Audio"], ["Electronics", "Headphones"]]},
    {"asin": "A2", "categories": [["Electronics", "Cameras"]], "title": "It's a camera"},
    {"asin": "A3", "categories": [["Electronics", "Headphones"]]},
    {"asin": "A4", "categories": [["Electronics", "Cameras"]], "price": 9.5},
    {"asin": "A5", "categories": [["Electronics", "Audio"]]},
    {"asin": "A6", "categories": []},  # no category path: OOV category
    {"asin": "A7", "categories": [["Electronics", "Audio"]]},
    {"asin": "A8", "categories": [["Electronics", "Cameras"]]},
    {"asin": "Z9", "categories": [["Books"]]},  # never reviewed: ignored
]


def write_reviews(path: Path) -> Path:
    lines = []
    for user, reviews in USERS.items():
        for asin, t in reviews:
            lines.append(json.dumps({"reviewerID": user, "asin": asin, "reviewerName": "x",
                                     "helpful": [0, 0], "overall": 5.0, "unixReviewTime": t}))
    data = ("\n".join(lines) + "\n").encode()
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def write_meta(path: Path, extra: str = "") -> Path:
    text = "\n".join(repr(m) for m in META) + "\n" + extra
    path.write_text(text)
    return path


def rows_by_user(ds: PreparedDataset, split: str) -> list[dict]:
    cols = ds.read_split(split)
    inv_item = {i: raw for raw, i in ds.vocab("item_id").items()}
    out = []
    for k in range(len(cols["label"])):
        hist = [inv_item[int(i)] for i in cols["hist_item_id"][k] if i != PAD_ID]
        out.append({"user": int(cols["user"][k]), "label": int(cols["label"][k]),
                    "item": inv_item[int(cols["item_id"][k])], "cate": int(cols["cate_id"][k]),
                    "hist": hist, "hist_cate": cols["hist_cate_id"][k].tolist()})
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("amazon")
    out = prepare_amazon(write_reviews(d / "reviews.json.gz"), write_meta(d / "meta.json"),
                         d / "out", max_history=3, valid_frac=0.0, seed=1)
    return PreparedDataset.open(out)


def test_protocol_prefixes_predict_the_next_review_with_one_negative(prepared):
    ds = prepared
    assert ds.schema.name == "amazon"
    assert [f.name for f in ds.schema.features] == ["item_id", "cate_id", "hist_item_id",
                                                    "hist_cate_id"]
    train, test = rows_by_user(ds, "train"), rows_by_user(ds, "test")
    # U1 (4 reviews): 2 training pairs and 1 test pair; U2 (3): 1 + 1; U3 (2): 0 + 1; U4: none.
    assert len(train) == 2 * 3 and len(test) == 2 * 3 and ds.num_rows("valid") == 0
    reviewed = {u: {a for a, _ in r} for u, r in USERS.items()}
    user_keys = sorted(USERS)
    positives = sorted((user_keys[r["user"]], tuple(r["hist"]), r["item"])
                       for r in train if r["label"] == 1)
    assert positives == [("U1", ("A1",), "A2"), ("U1", ("A1", "A2"), "A3"),
                         ("U2", ("A2",), "A6")]
    tests = sorted((user_keys[r["user"]], tuple(r["hist"]), r["item"])
                   for r in test if r["label"] == 1)
    # max_history 3 keeps U1's three most recent earlier reviews, oldest first.
    assert tests == [("U1", ("A1", "A2", "A3"), "A5"), ("U2", ("A2", "A6"), "A4"),
                     ("U3", ("A1",), "A7")]
    # Every positive has a negative with the same history that the user never reviewed.
    for rows in (train, test):
        for pos in (r for r in rows if r["label"] == 1):
            negs = [r for r in rows if r["label"] == 0 and r["user"] == pos["user"]
                    and r["hist"] == pos["hist"]]
            assert len(negs) == 1
            assert negs[0]["item"] not in reviewed[user_keys[pos["user"]]]


def test_category_is_the_last_level_of_the_last_path(prepared):
    cates = {i: raw for raw, i in prepared.vocab("cate_id").items()}
    assert sorted(cates.values()) == ["Audio", "Cameras", "Headphones"]
    rows = rows_by_user(prepared, "train") + rows_by_user(prepared, "test")
    by_item = {r["item"]: r["cate"] for r in rows}
    assert cates[by_item["A5"]] == "Audio"
    assert cates[by_item["A2"]] == "Cameras"
    assert cates[by_item["A3"]] == "Headphones"
    if "A6" in by_item:  # A6 has no category path
        assert by_item["A6"] == OOV_ID
    assert prepared.manifest["params"]["items_without_category"] == 1


def test_validation_takes_the_last_training_pair_of_chosen_users(tmp_path):
    out = prepare_amazon(write_reviews(tmp_path / "r.json.gz"), write_meta(tmp_path / "m.json"),
                         tmp_path / "out", valid_frac=0.999, seed=0)
    ds = PreparedDataset.open(out)
    # Users with >= 3 reviews (U1, U2) give their last training pair to validation.
    assert ds.num_rows("valid") == 4 and ds.num_rows("train") == 2 and ds.num_rows("test") == 6
    valid = rows_by_user(ds, "valid")
    assert sorted(r["item"] for r in valid if r["label"] == 1) == ["A3", "A6"]


def test_truncated_gzip_skips_the_partial_last_line_and_counts_it(tmp_path):
    full = write_reviews(tmp_path / "full.json.gz").read_bytes()
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(full[:len(full) - 30])  # drop the gzip trailer and some compressed data
    reader = LineReader(cut)
    lines = list(reader)
    assert reader.truncated
    for _, text in lines:
        json.loads(text)  # every yielded line is complete
    assert reader.truncated_lines in (0, 1)
    out = prepare_amazon(cut, write_meta(tmp_path / "m.json"), tmp_path / "out", valid_frac=0)
    ds = PreparedDataset.open(out)
    assert ds.manifest["params"]["truncated_lines_skipped"] == reader.truncated_lines


@pytest.mark.skipif(not REVIEWS_GZ.exists(), reason="shared Amazon samples absent")
def test_the_vendored_truncated_sample_reads_and_fails_clearly(tmp_path):
    r = read_reviews(REVIEWS_GZ)
    assert len(r.user) == 290 and r.truncated_lines == 1  # SOURCE.md: 290 complete + 1 partial
    assert (r.user[0], r.asin[0]) == ("AO94DHGC771SJ", "0528881469")
    assert len(set(r.asin)) == 6 and len(set(r.user)) == 289
    # No meta sample exists: one for its six asins, as the 2014 file writes them.
    meta = tmp_path / "meta.json"
    meta.write_text("".join(repr({"asin": a, "categories": [["Electronics", f"C{i % 2}"]]})
                            + "\n" for i, a in enumerate(sorted(set(r.asin)))))
    assert len(read_categories(meta, set(r.asin))[0]) == 6
    # Its reviewers have at most 2 reviews: the protocol has no training pair, said plainly.
    with pytest.raises(DataError, match="no training pair.*fewer than 3 reviews"):
        prepare_amazon(REVIEWS_GZ, meta, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_meta_lines_are_literals_never_code(tmp_path):
    reviews = write_reviews(tmp_path / "r.json.gz")
    marker = tmp_path / "pwned"
    evil = f"{{'asin': 'A1', 'categories': [[open({str(marker)!r}, 'w').name]]}}\n"
    with pytest.raises(DataError, match=r"m\.json:10: neither JSON nor a Python literal"):
        prepare_amazon(reviews, write_meta(tmp_path / "m.json", extra=evil), tmp_path / "out")
    assert not marker.exists()
    # The same line for an asin nobody reviewed is not even parsed.
    harmless = evil.replace("'A1'", "'Q0'")
    cats, _ = read_categories(write_meta(tmp_path / "m2.json", extra=harmless), {"A1"})
    assert cats == {"A1": "Headphones"} and not marker.exists()


def test_malformed_reviews_name_the_line_and_field(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text('{"reviewerID": "U1", "asin": "A1", "unixReviewTime": 1}\n'
                   '{"reviewerID": "U1", "unixReviewTime": 2}\n')
    with pytest.raises(DataError, match=r"r\.json:2: field 'asin' missing"):
        read_reviews(bad)
    with pytest.raises(DataError, match="file not found"):
        read_reviews(tmp_path / "missing.json.gz")


@pytest.mark.skipif(not PROCESSED.exists(), reason="shared Amazon samples absent")
def test_processed_layout_of_the_vendored_sample(tmp_path):
    out = prepare_amazon_processed(PROCESSED, tmp_path / "out", valid_frac=0.2, test_frac=0.2,
                                   max_history=4)
    ds = PreparedDataset.open(out)
    rows = {s: ds.read_split(s) for s in ("train", "valid", "test")}
    assert sum(len(r["label"]) for r in rows.values()) == 100
    assert sum(int(r["label"].sum()) for r in rows.values()) == 48
    assert all(len(r["label"]) > 0 for r in rows.values())
    first = PROCESSED.read_text().splitlines()[0].split(";")  # "3737 19450;288 196;18486;674;1"
    hist = [int(x) + 2 for x in first[0].split()]
    everything = {k: np.concatenate([r[k] for r in rows.values()]) for k in rows["train"]}
    match = np.flatnonzero(everything["item_id"] == int(first[2]) + 2)
    assert match.size >= 1
    k = match[0]
    assert everything["hist_item_id"][k][:len(hist)].tolist() == hist
    assert everything["cate_id"][k] == int(first[3]) + 2
    # Samples with the same history (a positive and its negative) share one GAUC group.
    groups = {}
    for u, h in zip(everything["user"], everything["hist_item_id"]):
        groups.setdefault(tuple(h), set()).add(int(u))
    assert all(len(g) == 1 for g in groups.values())


def test_processed_layout_errors_name_the_line(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_text("1 2;3 4;5;6;1\n1 2;3;5;6;0\n")
    with pytest.raises(DataError, match=r"p\.txt:2: 2 history items but 1 history categories"):
        prepare_amazon_processed(bad, tmp_path / "out")
    bad.write_text("1 2;3 4;5;6\n")
    with pytest.raises(DataError, match=r"p\.txt:1: expected 5"):
        prepare_amazon_processed(bad, tmp_path / "out")


def test_cli_prepares_raw_and_processed_and_reports_bad_arguments(tmp_path, capsys):
    from din_ray.cli import main

    reviews = write_reviews(tmp_path / "r.json.gz")
    meta = write_meta(tmp_path / "m.json")
    assert main(["prepare", "amazon", "--reviews", str(reviews), "--meta", str(meta),
                 "--output", str(tmp_path / "raw"), "--valid-frac", "0"]) == 0
    assert PreparedDataset.open(tmp_path / "raw").num_rows("test") == 6
    processed = tmp_path / "p.txt"
    processed.write_text("".join(f"{i} {i + 1};1 2;{i + 5};3;{i % 2}\n" for i in range(40)))
    assert main(["prepare", "amazon", "--processed", str(processed), "--output",
                 str(tmp_path / "proc")]) == 0
    assert PreparedDataset.open(tmp_path / "proc").schema.name == "amazon-processed"
    assert main(["prepare", "amazon", "--reviews", str(reviews), "--output",
                 str(tmp_path / "x")]) == 2
    assert "needs --reviews and --meta" in capsys.readouterr().err


def write_user_chains(path: Path, users: int = 300, seed: int = 0) -> dict[int, int]:
    """Processed lines of `users` users, each a chain [b1]->b2, [b1,b2]->b3, ... with one negative
    per prediction, lines shuffled. Items are private to their user (user u owns u*10 .. u*10+9).
    Returns item -> user."""
    rng = np.random.default_rng(seed)
    lines, owner = [], {}
    for u in range(users):
        items = [u * 10 + k for k in range(int(rng.integers(3, 10)))]
        owner.update(dict.fromkeys(items, u))
        for k in range(1, len(items)):
            hist = " ".join(map(str, items[:k]))
            cates = " ".join(str(i % 7) for i in items[:k])
            neg = int(rng.integers(0, users * 10))
            lines += [f"{hist};{cates};{items[k]};{items[k] % 7};1",
                      f"{hist};{cates};{neg};{neg % 7};0"]
    path.write_text("".join(line + "\n" for line in rng.permutation(lines)))
    return owner


def test_processed_split_keeps_every_users_earlier_targets_in_train(tmp_path):
    owner = write_user_chains(tmp_path / "p.txt")
    out = prepare_amazon_processed(tmp_path / "p.txt", tmp_path / "out", valid_frac=0.2,
                                   test_frac=0.2, max_history=10)
    ds = PreparedDataset.open(out)
    train = ds.read_split("train")
    seen: dict[int, set[int]] = {}  # user -> items in their training targets and histories
    for item, label, hist in zip(train["item_id"] - 2, train["label"], train["hist_item_id"]):
        items = [int(i) - 2 for i in hist if i != PAD_ID] + ([int(item)] if label else [])
        seen.setdefault(owner[items[0]], set()).update(items)
    held_out = 0
    for split in ("valid", "test"):
        cols = ds.read_split(split)
        assert cols["label"].size > 0
        for item, label in zip(cols["item_id"] - 2, cols["label"]):
            if label:
                held_out += 1
                assert int(item) not in seen.get(owner[int(item)], set()), (split, int(item))
    # Only each user's last prediction is held out: about 40 % of the 300 users, one each.
    assert 60 < held_out < 180


@pytest.mark.parametrize("history_ties", ["exclude", "keep"])
def test_reviews_of_the_same_day_are_not_each_others_history_by_default(tmp_path, history_ties):
    # unixReviewTime is day-granular: V1 reviewed A1 and A2 on day 10, then A3 and A4. (V2 adds
    # an item V1 never reviewed, for the negatives.)
    reviews = tmp_path / "r.json"
    reviews.write_text("".join(
        json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t}) + "\n"
        for u, a, t in (("V1", "A1", 10), ("V1", "A2", 10), ("V1", "A3", 20), ("V1", "A4", 30),
                        ("V2", "A5", 10))))
    kwargs = {} if history_ties == "exclude" else {"history_ties": history_ties}
    out = prepare_amazon(reviews, write_meta(tmp_path / "m.json"), tmp_path / "out",
                         valid_frac=0.0, **kwargs)
    ds = PreparedDataset.open(out)
    assert ds.manifest["params"]["history_ties"] == history_ties
    got = {r["item"]: r["hist"] for split in ("train", "test")
           for r in rows_by_user(ds, split) if r["label"] == 1 and r["user"] == 0}
    a2 = [] if history_ties == "exclude" else ["A1"]
    assert got == {"A2": a2, "A3": ["A1", "A2"], "A4": ["A1", "A2", "A3"]}
