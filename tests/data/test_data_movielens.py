"""MovieLens preparation: the three layouts on a hand-made fixture, exact histories, splits,
train-only vocabularies, bad input, and the bundled ml-latest-small."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import din_ray
from din_ray.data.format import DataError, PreparedDataset
from din_ray.data.movielens import prepare_movielens

# (movieId, title, genres in ml-latest order); every multi-genre list is in ML100K_GENRES order so
# the ml-100k flags encode the same first genre. Movie 99 is rated but absent from the movies file.
MOVIES = [
    (10, "Toy Story, The (1995)", ["Comedy", "Drama"]),
    (20, "Heat (1995)", ["Action"]),
    (30, "Café Society (2016)", ["Drama", "Romance"]),
    (40, "Untitled (2000)", []),
    (50, "Mix (2001)", ["Action", "Comedy"]),
    (60, "Rio Bravo (1959)", ["Western"]),
]
# (userId, movieId, rating, timestamp) in file order. User 1 rated 10 and 20 at the same second:
# neither is in the other's history (with history_ties="keep", 10, first in the file, would be
# in 20's).
RATINGS = [
    (1, 10, 5, 100),
    (1, 20, 3, 100),
    (1, 30, 4, 50),
    (1, 40, 2, 200),
    (2, 20, 4, 10),
    (2, 50, 1, 20),
    (2, 99, 4, 30),
    (3, 10, 3, 5),
    (3, 30, 5, 7),
    (3, 50, 4, 8),
    (3, 60, 4, 9),
    (4, 40, 5, 1),
    (4, 10, 1, 2),
]
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]
NO_GENRE = "(no genres listed)"


def write_fixture(root: Path, layout: str, ratings=RATINGS, movies=MOVIES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if layout == "csv":
        lines = ["userId,movieId,rating,timestamp"]
        lines += [f"{u},{m},{r:.1f},{t}" for u, m, r, t in ratings]
        # CRLF line ends, as the real files are shipped.
        (root / "ratings.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
        mlines = ["movieId,title,genres"] + [
            f'{m},"{title}",{"|".join(g) or NO_GENRE}' for m, title, g in movies]
        (root / "movies.csv").write_text("\n".join(mlines) + "\n", encoding="utf-8")
    elif layout == "dat":
        (root / "ratings.dat").write_text(
            "".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in ratings))
        (root / "movies.dat").write_bytes("".join(
            f"{m}::{title}::{'|'.join(g) or NO_GENRE}\n" for m, title, g in movies
        ).encode("latin-1"))
    elif layout == "100k":
        (root / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in ratings))
        rows = []
        for m, title, g in movies:
            flags = "|".join("1" if name in g else "0" for name in ML100K_GENRES)
            rows.append(f"{m}|{title}|01-Jan-1995||http://example.org/{m}|{flags}\n")
        (root / "u.item").write_bytes("".join(rows).encode("latin-1"))
    else:
        raise ValueError(layout)
    return root


def read_all(out: Path) -> tuple[PreparedDataset, dict[str, dict[str, np.ndarray]]]:
    ds = PreparedDataset.open(out)
    splits = {}
    for split in ("train", "valid", "test"):
        splits[split] = ds.read_split(split) if ds.files(split) else {}
    return ds, splits


def rows_as_tuples(cols: dict[str, np.ndarray]) -> list[tuple]:
    if not cols:
        return []
    n = len(cols["label"])
    return sorted(
        (int(cols["user"][i]), int(cols["label"][i]), int(cols["item_id"][i]),
         int(cols["cate_id"][i]), tuple(cols["hist_item_id"][i].tolist()),
         tuple(cols["hist_cate_id"][i].tolist()))
        for i in range(n)
    )


def reference(split_of_row, max_history: int, ratings=RATINGS, history_ties: str = "exclude"
              ) -> dict[str, list[tuple]]:
    """Slow, obviously-correct construction of every split from `ratings`/MOVIES.

    split_of_row(user, rank, n) -> split name for the user's rank-th rating (of n, time order).
    """
    genre = {m: (g[0] if g else NO_GENRE) for m, _, g in MOVIES}
    by_user: dict[int, list[tuple]] = {}
    for line, (u, m, r, t) in enumerate(ratings):
        by_user.setdefault(u, []).append((t, line, m, r))
    samples = []  # (split, user, label, movie, history movies)
    for u, items in by_user.items():
        items.sort()
        for k, (t, _, m, r) in enumerate(items):
            hist = [x[2] for x in items[:k] if history_ties == "keep" or x[0] < t][-max_history:]
            samples.append((split_of_row(u, k, len(items)), u, int(r >= 4), m, hist))
    train_movies = sorted({s[3] for s in samples if s[0] == "train"})
    train_genres = sorted({genre[m] for m in train_movies if m in genre})
    item = {m: i + 2 for i, m in enumerate(train_movies)}
    cate = {g: i + 2 for i, g in enumerate(train_genres)}

    def ids(ms):
        it = [item.get(m, 1) for m in ms]
        ct = [cate.get(genre.get(m), 1) for m in ms]
        pad = [0] * (max_history - len(ms))
        return tuple(it + pad), tuple(ct + pad)

    out = {"train": [], "valid": [], "test": []}
    for split, u, y, m, hist in samples:
        hi, hc = ids(hist)
        out[split].append((u, y, item.get(m, 1), cate.get(genre.get(m), 1), hi, hc))
    return {k: sorted(v) for k, v in out.items()}


def time_split(u, k, n, valid=0.25, test=0.25):
    n_test, n_valid = int(n * test), int(n * valid)
    return "train" if k < n - n_valid - n_test else ("valid" if k < n - n_test else "test")


# --- layouts and exact contents -------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["csv", "dat", "100k"])
def test_time_split_exact(tmp_path, layout, caplog):
    src = write_fixture(tmp_path / "ml", layout)
    with caplog.at_level(logging.WARNING):
        out = prepare_movielens(src, tmp_path / "out", max_history=2, split="time",
                                valid_frac=0.25, test_frac=0.25)
    ds, got = read_all(out)
    assert ds.manifest["params"]["layout"] == layout
    assert ds.manifest["params"]["ratings_without_movie"] == 1
    assert "absent from" in caplog.text and "99" in caplog.text

    # Train vocab: movies of train rows {10, 20, 30, 40, 50, 99}; 60 is rated only in test.
    assert ds.vocab("item_id") == {"10": 2, "20": 3, "30": 4, "40": 5, "50": 6, "99": 7}
    # Genres of train movies (first genre; 99 has none): sorted, "(no genres listed)" first.
    assert ds.vocab("cate_id") == {NO_GENRE: 2, "Action": 3, "Comedy": 4, "Drama": 5}
    assert ds.schema.feature("item_id").vocab_size == 8
    assert ds.schema.feature("cate_id").vocab_size == 6
    assert ds.schema.max_history == 2

    # User 1 in time order: 30 (ts 50), 10 (ts 100, line 1), 20 (ts 100, line 2), 40 (ts 200).
    # 4 ratings -> 2 train, 1 valid, 1 test; histories keep the 2 most recent strictly earlier
    # ones, oldest first.
    u1 = {s: [r for r in rows_as_tuples(got[s]) if r[0] == 1] for s in got}
    assert sorted(u1["train"]) == sorted([
        (1, 1, 4, 5, (0, 0), (0, 0)),  # 30 Drama, rating 4 -> positive, empty history
        (1, 1, 2, 4, (4, 0), (5, 0)),  # 10 Comedy (first of Comedy|Drama)
    ])
    assert u1["valid"] == [(1, 0, 3, 3, (4, 0), (5, 0))]  # 20 Action after 30 (10: same second)
    assert u1["test"] == [(1, 0, 5, 2, (2, 3), (4, 3))]  # 40 no genre; history truncated to 10, 20
    # User 3's last rating is movie 60 (Western), never seen in train: OOV item and category.
    u3_test = [r for r in rows_as_tuples(got["test"]) if r[0] == 3]
    assert u3_test == [(3, 1, 1, 1, (4, 6), (5, 3))]
    # User 2 rated unknown movie 99: known item (it is a train candidate), OOV category.
    assert (2, 1, 7, 1, (3, 6), (3, 3)) in rows_as_tuples(got["train"])

    assert {s: rows_as_tuples(got[s]) for s in got} == reference(time_split, 2)


# User 7 rated 10, 20, 30 in the same second, then 40; user 8 rated 50 and 60 together first.
TIES = [(7, 30, 5, 500), (7, 10, 4, 500), (8, 60, 4, 3), (7, 40, 2, 900), (7, 20, 1, 500),
        (8, 50, 5, 3), (8, 10, 4, 4)]


@pytest.mark.parametrize("history_ties", ["exclude", "keep"])
def test_history_ties_exclude_same_second_behaviours_by_default(tmp_path, history_ties):
    src = write_fixture(tmp_path / "ml", "csv", ratings=TIES)
    kwargs = {} if history_ties == "exclude" else {"history_ties": history_ties}
    out = prepare_movielens(src, tmp_path / "out", max_history=4, split="time", valid_frac=0,
                            test_frac=0, **kwargs)
    ds, got = read_all(out)
    assert ds.manifest["params"]["history_ties"] == history_ties
    inv = {i: int(m) for m, i in ds.vocab("item_id").items()}
    hist = {(int(u), inv[int(m)]): [inv[int(i)] for i in h if i]
            for u, m, h in zip(got["train"]["user"], got["train"]["item_id"],
                               got["train"]["hist_item_id"])}
    if history_ties == "exclude":  # strictly earlier, as the log pipeline
        assert hist == {(7, 30): [], (7, 10): [], (7, 20): [], (7, 40): [30, 10, 20],
                        (8, 60): [], (8, 50): [], (8, 10): [60, 50]}
    else:  # earlier in the file within a second
        assert hist == {(7, 30): [], (7, 10): [30], (7, 20): [30, 10], (7, 40): [30, 10, 20],
                        (8, 60): [], (8, 50): [60], (8, 10): [60, 50]}
    assert rows_as_tuples(got["train"]) == reference(lambda u, k, n: "train", 4, TIES,
                                                     history_ties)["train"]


def test_layouts_identical(tmp_path):
    outs = []
    for layout in ("csv", "dat", "100k"):
        src = write_fixture(tmp_path / layout, layout)
        out = prepare_movielens(src, tmp_path / f"out-{layout}", max_history=3, seed=3,
                                valid_frac=0.25, test_frac=0.25)
        outs.append(read_all(out)[1])
    for other in outs[1:]:
        for split in ("train", "valid", "test"):
            assert outs[0][split].keys() == other[split].keys()
            for k in outs[0][split]:
                np.testing.assert_array_equal(outs[0][split][k], other[split][k])


def test_user_split_and_counts(tmp_path):
    src = write_fixture(tmp_path / "ml", "csv")
    out = prepare_movielens(src, tmp_path / "out", max_history=3, split="user", seed=1,
                            valid_frac=0.25, test_frac=0.25)
    ds, got = read_all(out)
    users = {s: set(got[s]["user"].tolist()) if got[s] else set() for s in got}
    assert len(users["train"]) == 2 and len(users["valid"]) == 1 and len(users["test"]) == 1
    assert users["train"] | users["valid"] | users["test"] == {1, 2, 3, 4}
    assert sum(ds.num_rows(s) for s in got) == len(RATINGS)
    expected = reference(lambda u, k, n: next(s for s in users if u in users[s]), 3)
    assert {s: rows_as_tuples(got[s]) for s in got} == expected

    # Vocab from train users only; a held-out user's movie missing from train is OOV.
    train_movies = sorted({m for u, m, _, _ in RATINGS if u in users["train"]})
    assert ds.vocab("item_id") == {str(m): i + 2 for i, m in enumerate(train_movies)}

    # n_j: number of train samples containing id j (candidate or history), PAD excluded.
    counts = ds.counts()
    for table, cols in (("item_id", ("item_id", "hist_item_id")),
                        ("cate_id", ("cate_id", "hist_cate_id"))):
        want = np.zeros(ds.schema.tables[table][0], np.int64)
        tr = got["train"]
        for i in range(len(tr["label"])):
            ids = {int(tr[cols[0]][i])} | set(tr[cols[1]][i].tolist())
            for j in ids - {0}:
                want[j] += 1
        np.testing.assert_array_equal(counts[table], want)
    # Train rows are shuffled but every row appears once.
    assert len(rows_as_tuples(got["train"])) == ds.num_rows("train")


def test_seed_changes_user_split(tmp_path):
    src = write_fixture(tmp_path / "ml", "csv")
    split_users = []
    for seed in range(6):
        out = prepare_movielens(src, tmp_path / f"o{seed}", seed=seed, valid_frac=0.25,
                                test_frac=0.25)
        split_users.append(tuple(sorted(set(read_all(out)[1]["train"]["user"].tolist()))))
    assert len(set(split_users)) > 1
    again = prepare_movielens(src, tmp_path / "again", seed=0, valid_frac=0.25, test_frac=0.25)
    a, b = read_all(tmp_path / "o0")[1]["train"], read_all(again)[1]["train"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_overwrite(tmp_path):
    src = write_fixture(tmp_path / "ml", "csv")
    out = prepare_movielens(src, tmp_path / "out")
    with pytest.raises(FileExistsError):
        prepare_movielens(src, out)
    prepare_movielens(src, out, overwrite=True, max_history=4)
    assert PreparedDataset.open(out).schema.max_history == 4


# --- bad input --------------------------------------------------------------------------------
def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def expect_error(tmp_path: Path, *fragments: str) -> None:
    with pytest.raises(DataError) as e:
        prepare_movielens(tmp_path / "ml", tmp_path / "out")
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))
    assert_nothing_written(tmp_path)


def test_unknown_layout(tmp_path):
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "README.txt").write_text("hi")
    expect_error(tmp_path, str(tmp_path / "ml"), "ratings.csv", "movies.csv", "ratings.dat",
                 "u.data", "u.item")


def test_missing_input_dir(tmp_path):
    expect_error(tmp_path, str(tmp_path / "ml"), "not found")


@pytest.mark.parametrize("layout,missing", [("csv", "movies.csv"), ("dat", "movies.dat"),
                                            ("100k", "u.item"), ("csv", "ratings.csv")])
def test_missing_file(tmp_path, layout, missing):
    write_fixture(tmp_path / "ml", layout)
    (tmp_path / "ml" / missing).unlink()
    expect_error(tmp_path, str(tmp_path / "ml" / missing), "not found")


def test_missing_column(tmp_path):
    src = write_fixture(tmp_path / "ml", "csv")
    (src / "ratings.csv").write_text("userId,movieId,timestamp\n1,10,5\n")
    expect_error(tmp_path, "ratings.csv", "line 1", "rating")


def test_missing_movies_column(tmp_path):
    src = write_fixture(tmp_path / "ml", "csv")
    (src / "movies.csv").write_text("movieId,title\n10,A\n")
    expect_error(tmp_path, "movies.csv", "line 1", "genres")


@pytest.mark.parametrize("layout,bad_line,fragments", [
    ("csv", "1,10,abc,100", ["ratings.csv", "line 4", "'rating'", "'abc'"]),
    ("csv", "1,x10,4.0,100", ["ratings.csv", "line 4", "'movieId'", "'x10'"]),
    ("csv", "1,10,4.0,", ["ratings.csv", "line 4", "'timestamp'", "''"]),
    ("csv", "1,10,4.0", ["ratings.csv", "line 4", "expected 4 fields"]),
    ("dat", "1::10::four::100", ["ratings.dat", "line 3", "'rating'", "'four'"]),
    ("dat", "1::10::4", ["ratings.dat", "line 3", "expected 4"]),
    ("100k", "1\t10\t4\t1e", ["u.data", "line 3", "'timestamp'", "'1e'"]),
    ("100k", "1.5\t10\t4\t100", ["u.data", "line 3", "'userId'", "'1.5'"]),
])
def test_bad_rating_line(tmp_path, layout, bad_line, fragments):
    src = write_fixture(tmp_path / "ml", layout)
    path = src / {"csv": "ratings.csv", "dat": "ratings.dat", "100k": "u.data"}[layout]
    lines = path.read_text().splitlines()
    lines.insert(3 if layout == "csv" else 2, bad_line)  # 1-based line 4 (csv) / 3
    path.write_text("\n".join(lines) + "\n")
    expect_error(tmp_path, *fragments)


@pytest.mark.parametrize("layout,name,text,fragments", [
    ("csv", "ratings.csv", "userId,movieId,rating,timestamp\n", ["ratings.csv", "empty"]),
    ("csv", "ratings.csv", "", ["ratings.csv", "empty"]),
    ("csv", "movies.csv", "movieId,title,genres\r\n", ["movies.csv", "empty"]),
    ("dat", "ratings.dat", "", ["ratings.dat", "empty"]),
    ("100k", "u.item", "\n", ["u.item", "empty"]),
    ("csv", "movies.csv", "movieId,title,genres\n10,A,Drama\nten,B,Drama\n",
     ["movies.csv", "line 3", "'movieId'", "'ten'"]),
    ("csv", "movies.csv", "movieId,title,genres\n10,A,Drama\n10,B,Drama\n",
     ["movies.csv", "line 3", "10", "line 2"]),
    ("dat", "movies.dat", "10::A\n", ["movies.dat", "line 1"]),
    ("100k", "u.item", "10|A|x||u|0|1\n", ["u.item", "line 1"]),
])
def test_bad_file(tmp_path, layout, name, text, fragments):
    src = write_fixture(tmp_path / "ml", layout)
    (src / name).write_text(text)
    expect_error(tmp_path, *fragments)


def test_bad_arguments(tmp_path):
    src = write_fixture(tmp_path / "ml", "csv")
    for kwargs in ({"split": "random"}, {"valid_frac": 0.5, "test_frac": 0.5},
                   {"max_history": 0}, {"test_frac": -0.1}):
        with pytest.raises(ValueError):
            prepare_movielens(src, tmp_path / "out", **kwargs)
    assert_nothing_written(tmp_path)


# --- the bundled release ------------------------------------------------------------------------
def test_bundled_ml_latest_small(tmp_path):
    src = Path(din_ray.__file__).parent / "bundled" / "ml-latest-small"
    out = prepare_movielens(src, tmp_path / "out")
    ds = PreparedDataset.open(out)
    assert sum(ds.num_rows(s) for s in ("train", "valid", "test")) == 100_836
    assert len(ds.files("train")) >= 4
    assert ds.manifest["params"]["ratings_without_movie"] == 0
    labels = np.concatenate([ds.read_split(s)["label"] for s in ("train", "valid", "test")])
    assert labels.mean() == pytest.approx(48_580 / 100_836, abs=1e-6)
    train = ds.read_split("train")
    hist = train["hist_item_id"]
    # PAD only after the last real behaviour.
    real = hist != 0
    assert not (~real[:, :-1] & real[:, 1:]).any()
    assert real.sum(1).max() == 50 and (real.sum(1) == 0).any()
    assert ds.schema.feature("cate_id").vocab_size <= 2 + 20
    assert ds.counts()["item_id"][2:].min() >= 1  # every train-vocab movie occurs in train


# --- command line -------------------------------------------------------------------------------
def run_prepare(argv: list[str]) -> int:
    import argparse

    from din_ray.cli import prepare as commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prepare", *argv])
    return args.func(args)


def test_cli_prepare_movielens(tmp_path, capsys):
    src = write_fixture(tmp_path / "ml", "dat")
    out = tmp_path / "out"
    assert run_prepare(["movielens", "--input", str(src), "--output", str(out), "--split", "time",
                        "--max-history", "2", "--valid-frac", "0.25", "--test-frac", "0.25",
                        "--history-ties", "keep"]) == 0
    printed = capsys.readouterr().out
    assert "train 9, valid 2, test 2 rows" in printed and str(out) in printed
    ds = PreparedDataset.open(out)
    assert ds.manifest["params"]["split"] == "time" and ds.schema.max_history == 2
    assert ds.manifest["params"]["history_ties"] == "keep"


def test_cli_default_input_is_bundled(tmp_path):
    import argparse

    from din_ray.cli import prepare as commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", "movielens", "--output", str(tmp_path / "o")])
    assert (args.input / "ratings.csv").is_file() and (args.input / "movies.csv").is_file()
