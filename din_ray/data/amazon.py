"""Amazon product reviews (McAuley et al. 2014) -> prepared DIN data, the paper's protocol (§6.1).

    din-ray prepare amazon --reviews reviews_Electronics_5.json.gz \\
        --meta meta_Electronics.json.gz --output out/amazon
    din-ray prepare amazon --processed train.txt --processed-test test.txt --output out/amz

Raw files (`prepare_amazon`), as the original public DIN code builds its data set:
  * reviews: one JSON object per line (`reviewerID`, `asin`, `unixReviewTime`), plain or gzip;
  * meta: one Python literal (a dict) per line, as that release writes it (single quotes, so not
    JSON); parsed with `ast.literal_eval`, which evaluates literals only, never code. Lines that
    are valid JSON are accepted too. Category = last level of the last category path
    (`categories[-1][-1]`).
  * Each user's reviews in time order b_1..b_n: for k = 1..n-2 a training pair predicts b_{k+1}
    from the reviews before it (positive) together with one random item the user never reviewed
    (negative, same history); the last review gives the test pair (k = n-1). A `valid_frac`
    share of users (seeded) have their last training pair moved to the validation split, so
    early stopping sees the same kind of prediction as the test. "Before" is strictly
    earlier: reviews of the same day (`unixReviewTime` is day-granular) are left out of each
    other's histories, as in the log pipeline (`din_ray.data.logs.pipeline`); `history_ties="keep"`
    (`--history-ties keep`) keeps those earlier in the file, as the original code did.

Processed files (`prepare_amazon_processed`): one sample per line
`hist_items;hist_cates;item;cate;label` with space-separated, already remapped integer ids (the
layout of PaddleRec's DIN data). Ids are shifted by 2 to make room for PAD and OOV. These files
carry no user id: samples with the same history are grouped as one "user" for GAUC (in the DIN
protocol those are exactly the positive/negative pair of one prediction). A user's samples form
a chain of histories, each a prefix of the next (`[b1]->b2`, `[b1,b2]->b3`, ...), so only the
END of a chain (a history no other history extends) may go to validation/test: an earlier link
would put its target in the histories of the user's later, training, samples.

Both read their input as a stream. A gzip file cut short (e.g. a partial download) ends in a
partial line: that line is skipped, counted and logged, and the count is stored in the
manifest (`params.truncated_lines_skipped`); every other malformed line is an error naming the
file, line and field.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from din_ray.data.common import (
    CHUNK_ROWS,
    SortedBehaviours,
    check_history_ties,
    check_max_history,
    check_split_fracs,
    history_ends,
    item_category_schema,
    order_by_user_time,
    train_rows_per_file,
    user_runs,
    vocab_entries,
)
from din_ray.data.format import DataError, DatasetWriter, refuse_existing
from din_ray.schema import NUM_RESERVED_IDS, OOV_ID, PAD_ID

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# An asin can be found in a meta line without parsing it: only lines of wanted items are parsed.
_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")


# --- streaming lines ----------------------------------------------------------------------------
@dataclass
class LineReader:
    """Lines of a text file, plain or gzip (by the .gz suffix), read in chunks.

    A gzip stream that ends before its end-of-stream marker is a truncated file: the partial
    last line is not yielded; `truncated_lines` counts it (0 or 1) so the caller can report it.
    Concatenated gzip members are read one after another.
    """

    path: Path
    truncated_lines: int = 0
    truncated: bool = False

    def __iter__(self) -> Iterator[tuple[int, str]]:
        """Yields (1-based line number, line without its newline); blank lines skipped."""
        lineno = 0
        for raw in self._raw_lines():
            lineno += 1
            text = raw.decode("utf-8", errors="strict").strip()
            if text:
                yield lineno, text

    def _raw_lines(self) -> Iterator[bytes]:
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        buf = b""
        with open(self.path, "rb") as f:
            if self.path.suffix != ".gz":
                for line in f:
                    yield line.rstrip(b"\r\n")
                return
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while True:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
                while chunk:
                    try:
                        buf += d.decompress(chunk)
                    except zlib.error as e:
                        raise DataError(f"{self.path}: not a valid gzip stream ({e})") from None
                    chunk = b""
                    if d.eof and d.unused_data:  # another gzip member follows
                        chunk = d.unused_data
                        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    *lines, buf = buf.split(b"\n")
                    yield from lines
        if not d.eof:
            self.truncated = True
            if buf.strip():
                self.truncated_lines += 1
                log.warning("%s: the gzip stream ends early (truncated file); its last, partial "
                            "line (%d bytes) is skipped", self.path, len(buf))
            return
        if buf.strip():
            yield buf


# --- raw reviews and meta -----------------------------------------------------------------------
@dataclass
class Reviews:
    """Reviews in file order."""

    user: list[str] = field(default_factory=list)
    asin: list[str] = field(default_factory=list)
    time: list[int] = field(default_factory=list)
    truncated_lines: int = 0


def _parse_record(path: Path, lineno: int, text: str) -> dict:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        try:
            rec = ast.literal_eval(text)  # literals only: safe on untrusted input
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise DataError(f"{path}:{lineno}: neither JSON nor a Python literal "
                            f"({type(e).__name__}): {text[:80]!r}") from None
    if not isinstance(rec, dict):
        raise DataError(f"{path}:{lineno}: expected an object, got {type(rec).__name__}")
    return rec


def read_reviews(path: str | Path) -> Reviews:
    """(reviewerID, asin, unixReviewTime) of every review, streamed."""
    path = Path(path)
    out = Reviews()
    reader = LineReader(path)
    for lineno, text in reader:
        rec = _parse_record(path, lineno, text)
        for key in ("reviewerID", "asin", "unixReviewTime"):
            if key not in rec:
                raise DataError(f"{path}:{lineno}: field {key!r} missing")
        try:
            t = int(rec["unixReviewTime"])
        except (TypeError, ValueError):
            raise DataError(f"{path}:{lineno}: field 'unixReviewTime' is not an integer: "
                            f"{rec['unixReviewTime']!r}") from None
        out.user.append(str(rec["reviewerID"]))
        out.asin.append(str(rec["asin"]))
        out.time.append(t)
    out.truncated_lines = reader.truncated_lines
    if not out.user:
        raise DataError(f"{path}: no reviews")
    return out


def read_categories(path: str | Path, wanted: set[str]) -> tuple[dict[str, str], int]:
    """asin -> category (last level of the last category path) for the `wanted` asins.

    Returns the mapping and the number of truncated lines skipped. Items whose line has no
    category path are left out (they get the OOV category).
    """
    path = Path(path)
    out: dict[str, str] = {}
    reader = LineReader(path)
    for lineno, text in reader:
        m = _ASIN.search(text)
        if m is None:
            raise DataError(f"{path}:{lineno}: no 'asin' field: {text[:80]!r}")
        if m.group(1) not in wanted:
            continue  # not reviewed: skip without parsing
        rec = _parse_record(path, lineno, text)
        asin = str(rec.get("asin", ""))
        cats = rec.get("categories")
        if not isinstance(cats, list | tuple):
            if cats is not None:
                raise DataError(f"{path}:{lineno}: field 'categories' must be a list of paths, "
                                f"got {type(cats).__name__}")
            continue
        if cats and isinstance(cats[-1], list | tuple) and cats[-1]:
            out[asin] = str(cats[-1][-1])
    return out, reader.truncated_lines


@dataclass
class _Samples(SortedBehaviours):
    """Reviews sorted by (user, time, file line) (`user` the dense reviewer, `item` >= 2, `cate`
    OOV when unknown); samples index into them."""

    item_cate: np.ndarray  # (V_item,) category of each dense item id

    def columns(self, target: np.ndarray, cand: np.ndarray, label: np.ndarray,
                max_history: int) -> dict[str, np.ndarray]:
        """Rows predicting review position `target` (B,) with candidate items `cand` (B,): the
        history is the user's reviews before `target`, the most recent `max_history`."""
        return {"label": label.astype(np.int8), "user": self.user[target],
                "item_id": cand.astype(np.int32), "cate_id": self.item_cate[cand].astype(np.int32),
                **self.histories(target, max_history)}


def prepare_amazon(
    reviews: str | Path,
    meta: str | Path,
    output_dir: str | Path,
    *,
    max_history: int = 50,
    valid_frac: float = 0.1,
    test_frac: float = 0.0,
    seed: int = 0,
    embedding_dim: int = 16,
    history_ties: str = "exclude",
    overwrite: bool = False,
) -> Path:
    """Prepare raw Amazon reviews + meta with the original DIN protocol (module docstring).

    Vocabularies (as the original code): every reviewed asin, every category of a reviewed item
    and every reviewer, each label-encoded in sorted order (items and categories from 2; users
    from 0, stored in the `user` column for GAUC). Negatives are drawn uniformly from all items
    with `seed`, redrawn while the user reviewed them. Items without a category in the meta
    file get the OOV category (counted in `params.items_without_category`).

    Args:
        reviews, meta: the two files (.json or .json.gz).
        output_dir: prepared dataset to create.
        max_history: behaviour sequence length L (most recent kept).
        valid_frac: share of users whose last training pair becomes validation.
        test_frac: unused (the test split is each user's last review); accepted so every
            source takes the same options.
        seed: negatives, validation users and the training-row shuffle.
        history_ties: "exclude" (default) or "keep" reviews of the target's own day.
    Raises:
        DataError: unreadable or malformed input (file, line and field named), or no training
            pair (every user has fewer than 3 reviews).
    """
    del test_frac
    reviews, meta, output_dir = Path(reviews), Path(meta), Path(output_dir)
    check_max_history(max_history)
    check_split_fracs(valid_frac, 0.0)
    check_history_ties(history_ties)
    refuse_existing(output_dir, overwrite)
    r = read_reviews(reviews)
    asins = sorted(set(r.asin))
    categories, meta_truncated = read_categories(meta, set(asins))
    log.info("read %d reviews of %d items (%d with a category) from %s", len(r.user), len(asins),
             len(categories), reviews)

    user_id = {u: i for i, u in enumerate(sorted(set(r.user)))}
    user = np.fromiter((user_id[u] for u in r.user), np.int64, len(r.user))
    item_id = {a: i + NUM_RESERVED_IDS for i, a in enumerate(asins)}
    item = np.fromiter((item_id[a] for a in r.asin), np.int64, len(r.asin))
    cate_raw = sorted(set(categories.values()))
    cate_id = {c: i + NUM_RESERVED_IDS for i, c in enumerate(cate_raw)}
    # (V_item,) category of each dense item id; OOV without one, PAD for PAD.
    item_cate = np.array([PAD_ID, OOV_ID] + [cate_id.get(categories.get(a), OOV_ID)
                                             for a in asins], np.int32)
    without_category = sum(a not in categories for a in asins)

    n = len(user)
    time = np.array(r.time, dtype=np.int64)
    order = order_by_user_time(user, time)
    user, item, time = user[order], item[order].astype(np.int32), time[order]
    first, count = user_runs(user)  # (U,), (U,)
    s = _Samples(user=user, item=item, cate=item_cate[item], user_start=np.repeat(first, count),
                 hist_end=history_ends(user, time, history_ties), item_cate=item_cate)

    rng = np.random.default_rng(seed)
    negatives = _sample_negatives(item, first, count, len(asins), rng)  # (N,)
    # Positions k+1 = 1 .. n-1 within each user are targets; the last one is the test pair.
    rank = np.arange(n) - s.user_start
    last = rank == np.repeat(count, count) - 1
    target = rank >= 1
    test_pos = np.flatnonzero(target & last)
    train_pos = np.flatnonzero(target & ~last)
    # Validation: the last training pair of a seeded share of users.
    valid_users = rng.random(len(first)) < valid_frac
    is_last_train = np.zeros(n, bool)
    is_last_train[first + count - 2] = count >= 3
    to_valid = is_last_train & np.repeat(valid_users, count)
    valid_pos = np.flatnonzero(to_valid)
    train_pos = train_pos[~to_valid[train_pos]]
    if train_pos.size == 0:
        raise DataError(f"{reviews}: no training pair: every one of the {len(first)} reviewers "
                        f"has fewer than 3 reviews (the protocol needs b_1, b_2 to train and a "
                        f"later review to test)")
    train_pos = rng.permutation(train_pos)

    # A category table has at least one real row, even if the meta file matched no item.
    schema = item_category_schema("amazon", len(asins) + NUM_RESERVED_IDS,
                                  max(len(cate_raw), 1) + NUM_RESERVED_IDS, max_history,
                                  embedding_dim)
    params = {"reviews": str(reviews), "meta": str(meta), "max_history": max_history,
              "valid_frac": valid_frac, "seed": seed, "embedding_dim": embedding_dim,
              "history_ties": history_ties, "reviews_read": n, "users": len(first),
              "items": len(asins),
              "categories": len(cate_raw), "items_without_category": without_category,
              "truncated_lines_skipped": r.truncated_lines + meta_truncated}
    if params["items_without_category"]:
        log.warning("%s: %d reviewed items have no category in %s; their category is OOV",
                    reviews, params["items_without_category"], meta)
    rows_per_file = train_rows_per_file(2 * train_pos.size)
    with DatasetWriter(output_dir, schema, source="amazon", params=params, overwrite=overwrite,
                       rows_per_file=rows_per_file) as w:
        for split, pos in (("train", train_pos), ("valid", valid_pos), ("test", test_pos)):
            for lo in range(0, pos.size, CHUNK_ROWS // 2):
                p = pos[lo:lo + CHUNK_ROWS // 2]
                # Positive and negative of each prediction side by side (same history).
                target = np.repeat(p, 2)
                cand = np.stack([item[p], negatives[p]], axis=1).reshape(-1)
                label = np.tile(np.array([1, 0], np.int8), p.size)
                w.write(split, s.columns(target, cand, label, max_history))
        w.add_vocab("item_id", vocab_entries(asins))
        w.add_vocab("cate_id", vocab_entries(cate_raw))
    return output_dir


def _sample_negatives(item: np.ndarray, first: np.ndarray, count: np.ndarray, n_items: int,
                      rng: np.random.Generator) -> np.ndarray:
    """One item per review, uniform over all items, that its user never reviewed. -> (N,)"""
    neg = rng.integers(0, n_items, size=len(item)) + NUM_RESERVED_IDS
    for u, (start, c) in enumerate(zip(first, count)):
        reviewed = set(item[start:start + c].tolist())
        if len(reviewed) >= n_items:
            raise DataError(f"user #{u} reviewed every item; no negative can be drawn")
        for i in range(start, start + c):
            while int(neg[i]) in reviewed:
                neg[i] = rng.integers(0, n_items) + NUM_RESERVED_IDS
    return neg.astype(np.int32)


# --- already processed text -----------------------------------------------------------------------
def _processed_lines(reader: LineReader
                     ) -> Iterator[tuple[int, list[int], list[int], int, int, int]]:
    """(line, hist items, hist cates, item, cate, label) of a `hist;hist_cates;item;cate;label`
    file, raw ids as written."""
    path = reader.path
    for lineno, text in reader:
        parts = text.split(";")
        if len(parts) != 5:
            raise DataError(f"{path}:{lineno}: expected 5 ';'-separated fields "
                            f"(hist;hist_cates;item;cate;label), got {len(parts)}")
        try:
            hist = [int(x) for x in parts[0].split()]
            hist_c = [int(x) for x in parts[1].split()]
            item, cate, label = int(parts[2]), int(parts[3]), int(parts[4])
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: ids must be integers ({e})") from None
        if len(hist) != len(hist_c):
            raise DataError(f"{path}:{lineno}: {len(hist)} history items but {len(hist_c)} "
                            "history categories")
        if label not in (0, 1):
            raise DataError(f"{path}:{lineno}: field 'label' must be 0 or 1, got {label}")
        if min([item, cate, *hist, *hist_c]) < 0:
            raise DataError(f"{path}:{lineno}: negative id")
        yield lineno, hist, hist_c, item, cate, label


# Rolling hash of history prefixes (polynomial mod a Mersenne prime). Only used within one
# preparation to find chain ends; a collision can only make an end look extended (its rows then
# stay in train), never let an extended history leave train.
_PREFIX_MOD = (1 << 61) - 1
_PREFIX_BASE = 1_000_003


def _prefix_keys(hist: list[int]) -> list[int]:
    """Keys of hist[:0], hist[:1], ..., hist[:k] (k + 1 ints; the last is the whole history)."""
    h, out = 1, [1]
    for x in hist:
        h = (h * _PREFIX_BASE + x + 1) % _PREFIX_MOD
        out.append(h)
    return out


def chain_ends(reader: LineReader) -> set[int]:
    """Prefix keys (`_prefix_keys(hist)[-1]`) of the histories in a processed file that no other
    history of the file extends: the last prediction of each user's chain."""
    whole: set[int] = set()
    extended: set[int] = set()
    for _, hist, *_rest in _processed_lines(reader):
        keys = _prefix_keys(hist)
        whole.add(keys[-1])
        extended.update(keys[:-1])
    return whole - extended


def _history_group(hist: list[int]) -> int:
    """A stable 63-bit key of a history: the GAUC group of the samples sharing it."""
    digest = hashlib.blake2b(" ".join(map(str, hist)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def prepare_amazon_processed(
    processed: str | Path,
    output_dir: str | Path,
    *,
    processed_test: str | Path | None = None,
    max_history: int = 50,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 0,
    embedding_dim: int = 16,
    overwrite: bool = False,
) -> Path:
    """Prepare `hist;hist_cates;item;cate;label` text (module docstring), streamed in three passes
    (chain ends of `processed`, vocabulary sizes, rows).

    Args:
        processed: training samples.
        processed_test: test samples; without it, a `test_frac` share of the chain ends of
            `processed` is the test split.
        valid_frac: share of the chain ends of `processed` (about one per user) for
            validation; every other sample is training.
        seed: which chain ends go to validation/test (an end's split depends only on its
            history and the seed).
    """
    processed, output_dir = Path(processed), Path(output_dir)
    files = [processed] + ([Path(processed_test)] if processed_test else [])
    check_max_history(max_history)
    check_split_fracs(valid_frac, 0.0 if processed_test else test_frac)
    refuse_existing(output_dir, overwrite)
    ends = chain_ends(LineReader(processed))
    max_item = max_cate = -1
    for path in files:
        for _, hist, hist_c, item, cate, _ in _processed_lines(LineReader(path)):
            max_item = max(max_item, item, *hist)
            max_cate = max(max_cate, cate, *hist_c)
    if max_item < 0:
        raise DataError(f"{processed}: no samples")
    schema = item_category_schema("amazon-processed", max_item + 1 + NUM_RESERVED_IDS,
                                  max_cate + 1 + NUM_RESERVED_IDS, max_history, embedding_dim)
    params = {"processed": str(processed), "processed_test": str(processed_test or ""),
              "max_history": max_history, "valid_frac": valid_frac,
              "test_frac": 0.0 if processed_test else test_frac, "seed": seed,
              "embedding_dim": embedding_dim, "truncated_lines_skipped": 0}
    salt = seed.to_bytes(8, "little", signed=False)

    def split_of(group: int) -> str:
        u = int.from_bytes(hashlib.blake2b(group.to_bytes(8, "little"), digest_size=8,
                                           key=salt).digest(), "little") / 2**64
        if u < valid_frac:
            return "valid"
        if not processed_test and u < valid_frac + test_frac:
            return "test"
        return "train"

    with DatasetWriter(output_dir, schema, source="amazon-processed", params=params,
                       overwrite=overwrite) as w:
        for path, is_test in ((f, f != processed) for f in files):
            rows: dict[str, list] = {}
            reader = LineReader(path)
            for _, hist, hist_c, item, cate, label in _processed_lines(reader):
                group = _history_group(hist)
                if is_test:
                    split = "test"
                elif _prefix_keys(hist)[-1] in ends:
                    split = split_of(group)
                else:
                    split = "train"  # a later sample of the same user extends this history
                rows.setdefault(split, []).append((group, hist, hist_c, item, cate, label))
                if len(rows[split]) >= CHUNK_ROWS:
                    w.write(split, _processed_columns(rows.pop(split), max_history))
            for split, chunk in rows.items():
                w.write(split, _processed_columns(chunk, max_history))
            params["truncated_lines_skipped"] += reader.truncated_lines  # the manifest's dict
        w.add_vocab("item_id", vocab_entries(range(max_item + 1)))
        w.add_vocab("cate_id", vocab_entries(range(max_cate + 1)))
    return output_dir


def _processed_columns(rows: list, max_history: int) -> dict[str, np.ndarray]:
    b = len(rows)
    hist = np.zeros((b, max_history), np.int32)
    hist_c = np.zeros((b, max_history), np.int32)
    for i, (_, h, hc, *_rest) in enumerate(rows):
        h, hc = h[-max_history:], hc[-max_history:]  # most recent kept, oldest first
        hist[i, :len(h)] = np.asarray(h) + NUM_RESERVED_IDS
        hist_c[i, :len(hc)] = np.asarray(hc) + NUM_RESERVED_IDS
    return {"label": np.array([r[5] for r in rows], np.int8),
            "user": np.array([r[0] for r in rows], np.int64),
            "item_id": np.array([r[3] for r in rows], np.int32) + NUM_RESERVED_IDS,
            "cate_id": np.array([r[4] for r in rows], np.int32) + NUM_RESERVED_IDS,
            "hist_item_id": hist, "hist_cate_id": hist_c}
