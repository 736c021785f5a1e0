"""`prepare --vocab-from`: known raw ids keep their dense ids, new ones are appended, vocabularies
never shrink, another schema is refused before anything is written. In-process, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from builders import random_columns, tiny_schema

from din_ray.data.format import DatasetWriter, PreparedDataset
from din_ray.data.logs.pipeline import prepare_logs
from din_ray.data.logs.synthetic import write_synthetic_days
from din_ray.data.vocab_extend import extend_ids, prepare_onto
from din_ray.schema import SchemaError


def test_extend_ids_keeps_known_appends_new_in_order():
    extended, position = extend_ids(["a", "b", "c"], ["d", "b", "e"])
    assert list(extended) == ["a", "b", "c", "d", "e"]
    assert position.tolist() == [3, 1, 4]


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    root = tmp_path_factory.mktemp("days")
    specs = write_synthetic_days(root / "raw", 2, 3000, drift=0.3, items=120, categories=10,
                                 users=200)
    d1 = root / "d1"
    prepare_logs(specs[0], d1, executor="local")
    return root, specs, d1


def _raw_of(ds: PreparedDataset, table: str) -> dict[int, str]:
    return {v: k for k, v in ds.vocab(table).items()}


def test_log_source_keeps_known_ids_and_appends_new(days):
    root, specs, d1 = days
    d2 = root / "d2"
    prepare_logs(specs[1], d2, executor="local", vocab_from=d1)
    a, b = PreparedDataset.open(d1), PreparedDataset.open(d2)
    old, new = a.vocab("adgroup_id"), b.vocab("adgroup_id")
    assert all(new[raw] == i for raw, i in old.items())  # every earlier id, absent or not
    appended = sorted(set(new) - set(old))
    assert appended and sorted(new[r] for r in appended) == list(
        range(len(old) + 2, len(new) + 2))
    assert b.schema.tables["adgroup_id"][0] == len(new) + 2
    # Retired ads (drift) are absent from day 2's training data but keep their rows...
    counts = b.counts()["adgroup_id"]
    retired = [i for r, i in old.items() if int(r) <= 36]  # day 2 shows ads 37..
    assert retired and (counts[retired] == 0).all()
    # ... and the new period's data is encoded on the extended ids: every training candidate id
    # is a known raw id of the new vocabulary that day 2 shows.
    raw = _raw_of(b, "adgroup_id")
    train = b.read_split("train")
    shown = {raw[i] for i in np.unique(train["adgroup_id"]) if i >= 2}
    assert shown and all(37 <= int(r) <= 156 for r in shown)
    # Binned and hashed-free tables are unchanged.
    assert b.schema.tables["price"] == a.schema.tables["price"]


def test_log_source_count_decay_adds_earlier_counts(days):
    root, specs, d1 = days
    plain, decayed = root / "c-plain", root / "c-decay"
    prepare_logs(specs[1], plain, executor="local", vocab_from=d1)
    prepare_logs(specs[1], decayed, executor="local", vocab_from=d1, count_decay=0.5)
    old = PreparedDataset.open(d1).counts()["adgroup_id"]
    new = PreparedDataset.open(plain).counts()["adgroup_id"]
    got = PreparedDataset.open(decayed).counts()["adgroup_id"]
    want = new.astype(float)
    want[:len(old)] += 0.5 * old
    np.testing.assert_array_equal(got, np.rint(want).astype(np.int64))


def test_log_source_refuses_another_schema_before_any_work(days, tmp_path):
    _, specs, d1 = days
    spec = yaml.safe_load(specs[1].read_text())
    spec["max_history"] = 7
    for f in spec["features"].values():
        f.pop("bins", None)  # price becomes a vocabulary table
    for f in spec["impressions"], spec["behaviors"]:
        f["path"] = str(specs[1].parent / f["path"])
    for j in spec["joins"].values():
        j["path"] = str(specs[1].parent / j["path"])
    other = tmp_path / "spec.yaml"
    other.write_text(yaml.safe_dump(spec))
    with pytest.raises(SchemaError) as e:
        prepare_logs(other, tmp_path / "out", executor="local", vocab_from=d1)
    assert "'hist_cate_id' max_len: 50 before, 7 now" in str(e.value)
    assert "'bins'" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # nothing half-written


def _tiny(path, vocab: list[str], rows: int, seed: int, source: str = "tiny"):
    """A tiny prepared dataset whose item vocabulary is `vocab` (dense ids 2..)."""
    schema = tiny_schema(items=len(vocab) + 2)
    with DatasetWriter(path, schema, source=source) as w:
        for split, s in (("train", seed), ("valid", seed + 1), ("test", seed + 2)):
            w.write(split, random_columns(schema, rows, s))
        w.add_vocab("item_id", ["<pad>", "<oov>"] + vocab)
    return path


def test_in_memory_sources_are_rewritten_onto_the_extended_ids(tmp_path):
    old_vocab = [f"i{k}" for k in range(10)]
    previous = _tiny(tmp_path / "day1", old_vocab, 50, 0)
    # The new period knows i3, i7 (in another order) and two new ids; i0.. others are absent.
    new_vocab = ["i7", "n1", "i3", "n2"]
    fresh = _tiny(tmp_path / "fresh", new_vocab, 80, 5)
    out = prepare_onto(previous, tmp_path / "day2",
                       lambda tmp: _tiny(tmp, new_vocab, 80, 5), source="tiny")
    f, o = PreparedDataset.open(fresh), PreparedDataset.open(out)
    assert o.vocab("item_id") == {**{r: i + 2 for i, r in enumerate(old_vocab)},
                                  "n1": 12, "n2": 13}
    assert o.schema.tables["item_id"][0] == 14
    fresh_raw, out_raw = _raw_of(f, "item_id"), _raw_of(o, "item_id")
    for split in ("train", "test"):
        a, b = f.read_split(split), o.read_split(split)
        for col in ("item_id", "hist_item_id"):
            want = [fresh_raw.get(int(i), str(i)) for i in a[col].reshape(-1)]
            got = [out_raw.get(int(i), str(i)) for i in b[col].reshape(-1)]
            assert got == want  # the same raw ids, on new dense ids
        np.testing.assert_array_equal(a["label"], b["label"])
    # MBA counts: the new period's, moved onto the extended ids.
    fc, oc = f.counts()["item_id"], o.counts()["item_id"]
    assert (oc[9], oc[5], oc[12], oc[2]) == (fc[2], fc[4], fc[3], 0)  # i7, i3, n1, i0 (absent)
    assert not list(tmp_path.glob(".day2*"))  # the fresh copy is gone


def test_in_memory_source_of_another_source_is_refused(tmp_path):
    previous = _tiny(tmp_path / "day1", ["a", "b"], 20, 0, source="movielens")
    with pytest.raises(SchemaError, match="source 'movielens', this is 'tiny'"):
        prepare_onto(previous, tmp_path / "day2", lambda tmp: _tiny(tmp, ["a"], 20, 1),
                     source="tiny")
    assert not (tmp_path / "day2").exists()


def test_cli_prepare_synthetic_vocab_from_grows_the_vocabulary(tmp_path):
    from din_ray.cli import main as cli_main

    common = ["prepare", "synthetic", "--rows", "1500", "--max-history", "5"]
    assert cli_main([*common, "--items", "200", "--output", str(tmp_path / "a")]) == 0
    assert cli_main([*common, "--items", "260", "--seed", "1", "--output", str(tmp_path / "b"),
                     "--vocab-from", str(tmp_path / "a")]) == 0
    a, b = PreparedDataset.open(tmp_path / "a"), PreparedDataset.open(tmp_path / "b")
    old, new = a.vocab("item_id"), b.vocab("item_id")
    assert len(new) == 260 and all(new[r] == i for r, i in old.items())
    assert b.manifest["params"]["vocab_from"] == str(tmp_path / "a")
    # --count-decay without --vocab-from fails at once.
    assert cli_main([*common, "--output", str(tmp_path / "c"), "--count-decay", "0.5"]) == 2
    assert not (tmp_path / "c").exists()
