"""MovieLens ratings -> prepared DIN data, following the paper's protocol (§6.1).

    din-ray prepare movielens --input din_ray/bundled/ml-latest-small --output out/ml-small

Each rating is one sample: the candidate is the rated movie and its genre, the label is
rating >= 4, and the behaviour sequence is the movies the same user rated strictly before it
(earlier timestamp; `--history-ties keep` adds those of the same second that come earlier in the
file), with their genres, most recent `max_history` kept. Users are split at random into
train/valid/test (the paper's protocol); `split="time"` splits each user's ratings
chronologically instead.

Three on-disk layouts are recognised (see `LAYOUTS`): `ratings.csv` + `movies.csv` (ml-latest,
ml-latest-small, ml-20m, ml-25m), `ratings.dat` + `movies.dat` with `::` separators (ml-1m,
ml-10m) and `u.data` + `u.item` (ml-100k).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from din_ray.data.common import (
    CHUNK_ROWS,
    RESERVED_RAW,
    SortedBehaviours,
    check_history_ties,
    check_max_history,
    check_split_fracs,
    history_ends,
    item_category_schema,
    order_by_user_time,
    split_users,
    train_rows_per_file,
    user_runs,
    vocab_entries,
)
from din_ray.data.format import DataError, DatasetWriter, refuse_existing
from din_ray.schema import NUM_RESERVED_IDS, OOV_ID

log = logging.getLogger(__name__)

# A movie without any genre gets this category, as ml-latest itself writes it.
NO_GENRE = "(no genres listed)"

# ml-100k `u.item` ends with 19 genre flags in this fixed order (its `u.genre` file).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)

@dataclass(frozen=True)
class Layout:
    name: str
    ratings: str
    movies: str
    releases: str


LAYOUTS = (
    Layout("csv", "ratings.csv", "movies.csv", "ml-latest, ml-latest-small, ml-20m, ml-25m"),
    Layout("dat", "ratings.dat", "movies.dat", "ml-1m, ml-10m"),
    Layout("100k", "u.data", "u.item", "ml-100k"),
)

RATING_FIELDS = ("userId", "movieId", "rating", "timestamp")


@dataclass
class Ratings:
    """Ratings in file order."""

    user: np.ndarray  # (N,) int64 raw userId
    movie: np.ndarray  # (N,) int64 raw movieId
    rating: np.ndarray  # (N,) float32
    timestamp: np.ndarray  # (N,) int64


@dataclass
class Movies:
    """Movie -> first genre. `ids` is sorted; `genre[i]` indexes `genre_names`."""

    ids: np.ndarray  # (M,) int64
    genre: np.ndarray  # (M,) int32
    genre_names: list[str]


# --- reading ------------------------------------------------------------------------------------
def detect_layout(input_dir: Path) -> Layout:
    """Which MovieLens release layout `input_dir` holds."""
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: MovieLens input directory not found")
    for layout in LAYOUTS:
        if (input_dir / layout.ratings).is_file():
            if not (input_dir / layout.movies).is_file():
                raise DataError(f"{input_dir / layout.movies}: file not found (needed beside "
                                f"{layout.ratings} for the {layout.releases} layout)")
            return layout
    for layout in LAYOUTS:
        if (input_dir / layout.movies).is_file():
            raise DataError(f"{input_dir / layout.ratings}: file not found (needed beside "
                            f"{layout.movies} for the {layout.releases} layout)")
    expected = "; ".join(f"{x.ratings} + {x.movies} ({x.releases})" for x in LAYOUTS)
    raise DataError(f"{input_dir}: no MovieLens files found; expected one of: {expected}")


def read_ratings(path: Path, layout: Layout) -> Ratings:
    """Parse a ratings file with pandas; on any failure re-scan it line by line to report the
    first bad line (file, line number, field, value)."""
    if layout.name == "csv":
        header = _csv_header(path)
        missing = [c for c in RATING_FIELDS if c not in header]
        if missing:
            raise DataError(f"{path} line 1: missing column(s) {missing}; header is {header}")
        kwargs = dict(sep=",", usecols=list(RATING_FIELDS), encoding="utf-8-sig",
                      dtype={"userId": "int64", "movieId": "int64", "rating": "float64",
                             "timestamp": "int64"})
    elif layout.name == "dat":
        # `::` is two one-character separators with an empty field between: the C parser reads
        # it fast, the regex separator "::" would need the slow python engine.
        kwargs = dict(sep=":", header=None, names=range(7), usecols=[0, 2, 4, 6],
                      encoding="latin-1", dtype="float64")
    else:
        kwargs = dict(sep="\t", header=None, names=range(4), encoding="latin-1",
                      dtype="float64")
    try:
        df = pd.read_csv(path, engine="c", **kwargs)
        df.columns = list(RATING_FIELDS)
        ok = df.notna().all(axis=None) and np.isfinite(df["rating"].to_numpy()).all()
        if layout.name != "csv":  # read as floats: also check the ids are integers
            ints = df[["userId", "movieId", "timestamp"]].to_numpy()
            ok = ok and bool((ints == np.round(ints)).all())
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        pandas_error, ok = e, False
    else:
        pandas_error = None
    if not ok:
        _scan_ratings(path, layout)  # raises with the line number
        raise DataError(f"{path}: could not be parsed: {pandas_error}")
    if len(df) == 0:
        raise DataError(f"{path}: empty file (no data rows)")
    return Ratings(
        user=df["userId"].to_numpy().astype(np.int64),
        movie=df["movieId"].to_numpy().astype(np.int64),
        rating=df["rating"].to_numpy().astype(np.float32),
        timestamp=df["timestamp"].to_numpy().astype(np.int64),
    )


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"{path}: empty file (no header, no data rows)")
    return [h.strip() for h in header]


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank data row of a CSV file with a header line; a row
    whose field count is not the header's is an error naming its line."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        width = len(next(reader, []))
        for row in reader:
            if not row:
                continue
            if len(row) != width:
                raise DataError(f"{path} line {reader.line_num}: expected {width} fields, got "
                                f"{len(row)}")
            yield reader.line_num, row


def _latin1_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line break) of every non-blank line of a `.dat`
    or ml-100k file, decoded as Latin-1 (these releases are not UTF-8)."""
    with open(path, encoding="latin-1", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line


def _ratings_lines(path: Path, layout: Layout) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, the four rating fields) for every non-blank data line."""
    if layout.name == "csv":
        header = _csv_header(path)
        cols = [header.index(c) for c in RATING_FIELDS]
        for lineno, row in _csv_rows(path):
            yield lineno, [row[i] for i in cols]
        return
    sep = "::" if layout.name == "dat" else "\t"
    for lineno, line in _latin1_lines(path):
        fields = line.split(sep)
        if len(fields) != 4:
            raise DataError(f"{path} line {lineno}: expected 4 {sep!r}-separated fields "
                            f"(user, movie, rating, timestamp), got {len(fields)}: {line!r}")
        yield lineno, fields


def _scan_ratings(path: Path, layout: Layout) -> None:
    rows = 0
    for lineno, fields in _ratings_lines(path, layout):
        rows += 1
        for name, value in zip(RATING_FIELDS, fields, strict=True):
            if name == "rating":
                try:
                    ok = math.isfinite(float(value))
                except ValueError:
                    ok = False
                kind = "a number"
            else:
                try:
                    int(value)
                    ok = True
                except ValueError:
                    ok = False
                kind = "an integer"
            if not ok:
                raise DataError(f"{path} line {lineno}: field {name!r}: {value!r} is not {kind}")
    if rows == 0:
        raise DataError(f"{path}: empty file (no data rows)")


def read_movies(path: Path, layout: Layout) -> Movies:
    """movieId -> first listed genre (ml-100k: the first set flag in `ML100K_GENRES` order)."""
    ids: list[int] = []
    genres: list[str] = []
    seen: dict[int, int] = {}

    def add(lineno: int, raw_id: str, genre: str) -> None:
        try:
            movie = int(raw_id)
        except ValueError:
            raise DataError(f"{path} line {lineno}: field 'movieId': {raw_id!r} is not an "
                            f"integer") from None
        if movie in seen:
            raise DataError(f"{path} line {lineno}: movieId {movie} already defined on line "
                            f"{seen[movie]}")
        seen[movie] = lineno
        ids.append(movie)
        genres.append(genre)

    if layout.name == "csv":
        header = _csv_header(path)
        missing = [c for c in ("movieId", "genres") if c not in header]
        if missing:
            raise DataError(f"{path} line 1: missing column(s) {missing}; header is {header}")
        id_col, genre_col = header.index("movieId"), header.index("genres")
        for lineno, row in _csv_rows(path):
            add(lineno, row[id_col], _first_genre(path, lineno, row[genre_col]))
    else:
        # Titles are never used, so Latin-1 (which decodes any byte) is safe for both releases.
        for lineno, line in _latin1_lines(path):
            if layout.name == "dat":
                fields = line.split("::")
                if len(fields) < 3:
                    raise DataError(f"{path} line {lineno}: expected movieId::title::genres, "
                                    f"got {line!r}")
                add(lineno, fields[0], _first_genre(path, lineno, fields[-1]))
            else:
                fields = line.split("|")
                if len(fields) < 5 + len(ML100K_GENRES):
                    raise DataError(f"{path} line {lineno}: expected {5 + len(ML100K_GENRES)}"
                                    f" '|'-separated fields, got {len(fields)}")
                flags = fields[-len(ML100K_GENRES):]
                bad = [v for v in flags if v not in ("0", "1")]
                if bad:
                    raise DataError(f"{path} line {lineno}: genre flag {bad[0]!r} is not 0/1")
                first = next((g for g, v in zip(ML100K_GENRES, flags, strict=True)
                              if v == "1"), NO_GENRE)
                add(lineno, fields[0], first)
    if not ids:
        raise DataError(f"{path}: empty file (no data rows)")
    names = sorted(set(genres))
    code = {g: i for i, g in enumerate(names)}
    order = np.argsort(np.array(ids, np.int64), kind="stable")
    return Movies(ids=np.array(ids, np.int64)[order],
                  genre=np.array([code[g] for g in genres], np.int32)[order], genre_names=names)


def _first_genre(path: Path, lineno: int, value: str) -> str:
    first = value.split("|")[0].strip()
    if not first:
        raise DataError(f"{path} line {lineno}: field 'genres' is empty "
                        f"(MovieLens writes {NO_GENRE!r} for none)")
    return first


# --- preparing ----------------------------------------------------------------------------------
def prepare_movielens(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    max_history: int = 50,
    split: str = "user",
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 0,
    embedding_dim: int = 16,
    history_ties: str = "exclude",
    overwrite: bool = False,
) -> Path:
    """Prepare a MovieLens release for DIN.

    Protocol (paper §6.1): one sample per rating, label = rating >= 4. The candidate is the rated
    movie (`item_id`) and its genre (`cate_id`); a movie with several genres takes the FIRST one
    listed ("Comedy|Drama" -> Comedy; ml-100k: the first set flag in `ML100K_GENRES` order), and
    "(no genres listed)" (or no ml-100k flag set) is a category like any other. The behaviour
    sequences (`hist_item_id`, `hist_cate_id`) are the movies the user rated strictly earlier
    (timestamp < the sample's; with history_ties="keep" also those of the same second earlier
    in the file), ordered by (timestamp, line in the file); the `max_history` most recent are
    kept, oldest first, PAD-padded at the end. The `user` column is the raw userId, for GAUC
    grouping only.

    Vocabularies (raw movieId -> 2.., genre -> 2.., in sorted raw order) are built from the
    training rows only (their candidates, which include every movie in their histories); ids
    unseen in training map to OOV (1). A rating of a movie absent from the movies file gets
    category OOV; such ratings are counted, logged as a warning and recorded in the manifest
    (`params.ratings_without_movie`).

    Args:
        input_dir: directory of one MovieLens release (layout detected, see `LAYOUTS`).
        output_dir: prepared dataset to create (see `din_ray.data.format`).
        max_history: behaviour sequence length L.
        split: "user" (paper: users shuffled with `seed`, assigned by fraction) or "time" (each
            user's ratings in order: the last floor(n * test_frac) go to test, the
            floor(n * valid_frac) before them to valid, the rest to train; histories still reach
            back into earlier splits).
        valid_frac, test_frac: fractions of users (or of each user's ratings) for valid/test.
        seed: user split and train row shuffle.
        embedding_dim: width written into the schema (training may override it).
        history_ties: "exclude" (default) or "keep" ratings of the sample's own second
            (`HISTORY_TIES`).
        overwrite: replace an existing `output_dir`.

    Returns:
        The prepared dataset directory.

    Raises:
        DataError: missing/unknown files or malformed input; the message names the file, line
            and field. Nothing is written then.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_max_history(max_history)
    if split not in ("user", "time"):
        raise ValueError(f"split must be 'user' or 'time', got {split!r}")
    check_split_fracs(valid_frac, test_frac)
    check_history_ties(history_ties)
    refuse_existing(output_dir, overwrite)

    layout = detect_layout(input_dir)
    movies = read_movies(input_dir / layout.movies, layout)
    ratings = read_ratings(input_dir / layout.ratings, layout)
    log.info("read %d ratings and %d movies from %s (%s layout)", len(ratings.user),
             len(movies.ids), input_dir, layout.name)

    rng = np.random.default_rng(seed)
    seq = _Sequences.build(ratings, movies, split, valid_frac, test_frac, rng, history_ties)
    del ratings  # the sorted copy in `seq` is all that is needed from here on
    if seq.missing_movie:
        log.warning("%s: %d ratings refer to movies absent from %s (e.g. movieId %d); their "
                    "category is OOV", input_dir / layout.ratings, seq.missing_movie,
                    layout.movies, seq.missing_example)
    train_pos = np.flatnonzero(seq.split == 0)
    if train_pos.size == 0:
        raise DataError(f"{input_dir}: no training rows (valid_frac={valid_frac}, "
                        f"test_frac={test_frac}, {len(seq.user_start)} ratings)")
    train_pos = rng.permutation(train_pos)  # shuffled so every train file is a random sample

    schema = item_category_schema("movielens", len(seq.item_raw), len(seq.cate_raw),
                                  max_history, embedding_dim)
    params = {"input": str(input_dir), "layout": layout.name, "max_history": max_history,
              "split": split, "valid_frac": valid_frac, "test_frac": test_frac, "seed": seed,
              "embedding_dim": embedding_dim, "history_ties": history_ties,
              "ratings_without_movie": seq.missing_movie}
    rows_per_file = train_rows_per_file(train_pos.size)
    chunk = min(rows_per_file, CHUNK_ROWS)
    with DatasetWriter(output_dir, schema, source="movielens", params=params,
                       overwrite=overwrite, rows_per_file=rows_per_file) as writer:
        for s in range(0, train_pos.size, chunk):
            writer.write("train", seq.columns(train_pos[s:s + chunk], max_history))
        for code, name in ((1, "valid"), (2, "test")):
            pos = np.flatnonzero(seq.split == code)  # (user, time) order
            for s in range(0, pos.size, CHUNK_ROWS):
                writer.write(name, seq.columns(pos[s:s + CHUNK_ROWS], max_history))
        writer.add_vocab("item_id", vocab_entries(seq.item_raw[2:]))
        writer.add_vocab("cate_id", vocab_entries(seq.cate_raw[2:]))
    return output_dir


@dataclass
class _Sequences(SortedBehaviours):
    """All ratings sorted by (user, timestamp, file line) (`user` the raw userId, `item` the
    dense movie id, `cate` the dense genre id), with labels and split codes."""

    label: np.ndarray  # (N,) int8
    split: np.ndarray  # (N,) int8: 0 train, 1 valid, 2 test
    item_raw: np.ndarray  # (V_item,) raw movieId of each dense id (0, 1 unused)
    cate_raw: np.ndarray  # (V_cate,) genre of each dense id (0, 1 unused)
    missing_movie: int  # ratings of movies absent from the movies file
    missing_example: int  # one such movieId (0 if none)

    @classmethod
    def build(cls, r: Ratings, movies: Movies, split: str, valid_frac: float, test_frac: float,
              rng: np.random.Generator, history_ties: str = "exclude") -> _Sequences:
        n = len(r.user)
        order = order_by_user_time(r.user, r.timestamp)
        user = r.user[order]
        movie = r.movie[order]
        first, counts = user_runs(user)  # (U,), (U,)
        user_start = np.repeat(first, counts)  # (N,)

        if split == "user":
            split_code = np.repeat(split_users(len(first), valid_frac, test_frac, rng), counts)
        else:
            rank = np.arange(n) - user_start
            total = np.repeat(counts, counts)
            n_test = np.floor(total * test_frac + 1e-9).astype(np.int64)
            n_valid = np.floor(total * valid_frac + 1e-9).astype(np.int64)
            split_code = np.where(rank < total - n_valid - n_test, 0,
                                  np.where(rank < total - n_test, 1, 2)).astype(np.int8)

        pos = np.searchsorted(movies.ids, movie).clip(max=len(movies.ids) - 1)
        known = movies.ids[pos] == movie
        genre = np.where(known, movies.genre[pos], -1).astype(np.int32)

        # Every history movie of a training row is itself a training row's candidate (user
        # split: same user; time split: the user's earlier, hence training, ratings), so the
        # training candidates are the whole training vocabulary.
        train = split_code == 0
        item_raw = np.unique(movie[train])
        item = _lookup(item_raw, movie)
        train_genres = np.unique(genre[train & known])
        names = np.array(movies.genre_names, dtype=object)
        genre_to_dense = np.full(len(names), OOV_ID, np.int32)
        genre_to_dense[train_genres] = np.arange(len(train_genres)) + NUM_RESERVED_IDS
        cate = np.where(known, genre_to_dense[genre.clip(min=0)], OOV_ID).astype(np.int32)
        reserved = np.array(RESERVED_RAW, dtype=object)
        return cls(
            user=user,
            label=(r.rating[order] >= 4.0).astype(np.int8),
            item=item,
            cate=cate,
            user_start=user_start,
            hist_end=history_ends(user, r.timestamp[order], history_ties),
            split=split_code,
            item_raw=np.concatenate([np.zeros(2, np.int64), item_raw]),
            cate_raw=np.concatenate([reserved, names[train_genres]]),
            missing_movie=int((~known).sum()),
            missing_example=int(movie[~known][0]) if not known.all() else 0,
        )

    def columns(self, pos: np.ndarray, max_history: int) -> dict[str, np.ndarray]:
        """Prepared columns for the ratings at sorted positions `pos` (B,)."""
        return {"label": self.label[pos], "user": self.user[pos], "item_id": self.item[pos],
                "cate_id": self.cate[pos], **self.histories(pos, max_history)}


def _lookup(vocab: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Dense ids (2.. in `vocab` order) of `raw`; OOV where absent. `vocab` is sorted."""
    if vocab.size == 0:
        return np.full(raw.shape, OOV_ID, np.int32)
    pos = np.searchsorted(vocab, raw).clip(max=vocab.size - 1)
    return np.where(vocab[pos] == raw, pos + NUM_RESERVED_IDS, OOV_ID).astype(np.int32)
