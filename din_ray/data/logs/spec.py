"""The YAML spec of an impression log + behaviour log, validated into frozen dataclasses.

    din-ray prepare log --spec examples/log_spec.yaml --output out/logs

A spec names the impression table(s) (user, timestamp, label, ad and context columns), the
behaviour table (user, timestamp, behaviour fields, optional type), optional side tables joined to
the impressions by key (ad features, user profiles), and one entry per model feature::

    name: shop
    max_history: 50
    impressions:
      path: impressions/            # files, directories or globs; CSV or Parquet; local or s3://
      user: user
      timestamp: time_stamp
      label: {column: clk, positive: [1], negative: [0]}
    behaviors:
      path: behaviors.csv
      user: user
      timestamp: time_stamp
      type: {column: btag, keep: [pv, cart, fav, buy]}     # optional
    joins:
      ad: {path: ads.parquet, key: adgroup_id, column: adgroup_id}
    features:
      adgroup_id: {group: ad, column: adgroup_id, min_count: 2}
      cate_id: {group: ad, from: ad, column: cate_id}
      pid: {group: context, column: pid, type: str}
      hist_cate_id: {group: behavior, column: cate, aligned_with: cate_id}
    split: {valid: 0.1, test: 0.1}          # or {valid_start: 1494500000, test_start: ...}
    malformed: {max_fraction: 0.001, show: 5}

Every error names the offending key (`features.cate_id.min_count: ...`). Relative paths are
resolved against the spec file's directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from din_ray.schema import GROUPS

FORMATS = ("csv", "parquet")
RAW_TYPES = ("int", "str")
# Cell values read as "missing" in CSV inputs (Taobao writes NULL for an unknown brand).
DEFAULT_NULL_VALUES = ("", "NULL", "null", "NaN", "nan", "\\N")


class SpecError(ValueError):
    """An invalid log spec; the message starts with the offending key."""


def _fail(where: str, message: str) -> SpecError:
    return SpecError(f"{where}: {message}")


@dataclass(frozen=True)
class Source:
    """Where a table's rows live.

    Args:
        paths: files, directories (every *.csv / *.parquet below) or local globs; local paths or
            URIs understood by pyarrow (s3://, gs://, ...).
        format: "csv" or "parquet".
        delimiter: CSV field separator.
    """

    paths: tuple[str, ...]
    format: str
    delimiter: str = ","

    def __post_init__(self) -> None:
        if not self.paths:
            raise SpecError("path: at least one path is required")
        if self.format not in FORMATS:
            raise SpecError(f"format: must be one of {FORMATS}, got {self.format!r}")
        if len(self.delimiter) != 1:
            raise SpecError(f"delimiter: must be one character, got {self.delimiter!r}")


@dataclass(frozen=True)
class Label:
    """Click label: raw values (compared as strings) meaning 1 and 0; anything else is
    malformed."""

    column: str
    positive: tuple[str, ...] = ("1",)
    negative: tuple[str, ...] = ("0",)

    def __post_init__(self) -> None:
        both = set(self.positive) & set(self.negative)
        if both:
            raise SpecError(f"positive and negative share values {sorted(both)}")
        if not self.positive or not self.negative:
            raise SpecError("positive and negative need at least one value each")


@dataclass(frozen=True)
class Impressions:
    source: Source
    user: str
    timestamp: str
    label: Label


@dataclass(frozen=True)
class Behaviors:
    """Behaviour rows; with `type_column` set, only types in `keep_types` are used (others are
    counted as filtered, never silently dropped)."""

    source: Source
    user: str
    timestamp: str
    type_column: str | None = None
    keep_types: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Join:
    """A side table joined to the impressions: its row whose `key` equals the impression column
    `on` (spelled `column` in YAML, where a bare `on` reads as a boolean). Side tables are
    dimension tables (ads, user profiles) and are read whole into memory."""

    name: str
    source: Source
    key: str
    on: str
    key_type: str = "int"


@dataclass(frozen=True)
class FeatureSpec:
    """One model feature.

    Args:
        name: feature name in the prepared data.
        group: user | ad | context | behavior.
        column: raw column in its source table.
        source: "impressions", a join's name, or "behaviors" (behaviour features).
        type: raw value type, "int" or "str" (behaviour features take their ad feature's).
        min_count: vocabulary: raw ids seen fewer times in the training period become OOV.
        hash_buckets: instead of a vocabulary, hash raw ids into this many buckets.
        bins: numeric column bucketized by these ascending edges (raw id = bin index).
        aligned_with: behaviour features: the ad feature whose table (and vocabulary) they share.
    """

    name: str
    group: str
    column: str
    source: str
    type: str = "int"
    min_count: int = 1
    hash_buckets: int | None = None
    bins: tuple[float, ...] | None = None
    aligned_with: str | None = None

    @property
    def table(self) -> str:
        return self.aligned_with if self.group == "behavior" else self.name


@dataclass(frozen=True)
class Split:
    """Train/valid/test by impression time: train ts < valid_start <= valid ts < test_start <=
    test ts. Given either as timestamps or as fractions of impressions (cutoffs at the
    quantiles)."""

    valid: float | None = None
    test: float | None = None
    valid_start: int | None = None
    test_start: int | None = None

    @property
    def by_fraction(self) -> bool:
        return self.valid_start is None


@dataclass(frozen=True)
class Malformed:
    """Malformed rows (bad timestamp, missing user, unknown label, ...) are skipped, counted and
    reported per file; the job fails when they exceed `max_fraction` of all rows or `max_count`
    (None: no such limit; a spec giving neither gets max_fraction 0.001)."""

    max_fraction: float | None = 0.001
    max_count: int | None = None
    show: int = 5


@dataclass(frozen=True)
class LogSpec:
    name: str
    impressions: Impressions
    behaviors: Behaviors
    features: tuple[FeatureSpec, ...]
    joins: tuple[Join, ...] = ()
    split: Split = Split(valid=0.1, test=0.1)
    malformed: Malformed = Malformed()
    max_history: int = 50
    embedding_dim: int = 16
    null_values: tuple[str, ...] = DEFAULT_NULL_VALUES
    user_type: str = "int"
    rows_per_bucket: int = 2_000_000
    unit_rows: int = 1_000_000
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def feature(self, name: str) -> FeatureSpec:
        return next(f for f in self.features if f.name == name)

    def group(self, group: str) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.group == group)

    @property
    def table_owners(self) -> dict[str, FeatureSpec]:
        """Table name -> the non-behaviour feature that defines its vocabulary/hashing."""
        return {f.name: f for f in self.features if f.group != "behavior"}


# --- parsing ------------------------------------------------------------------------------------
def _mapping(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise _fail(where, f"expected a mapping, got {type(raw).__name__} {raw!r}")
    return raw


def _check_keys(raw: dict, where: str, required: tuple[str, ...], optional: tuple[str, ...]):
    unknown = sorted(set(raw) - set(required) - set(optional))
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed: {sorted(required + optional)}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise _fail(f"{where}.{missing[0]}" if where else missing[0], "required key missing")


def _str(raw, where: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise _fail(where, f"expected a non-empty string, got {raw!r}")
    return raw.strip()


def _int(raw, where: str, minimum: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise _fail(where, f"expected an integer >= {minimum}, got {raw!r}")
    return raw


def _values(raw, where: str) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items or any(isinstance(v, (dict, list)) or v is None for v in items):
        raise _fail(where, f"expected a value or a list of values, got {raw!r}")
    return tuple(str(v) for v in items)


def _source(raw: dict, where: str, base: Path) -> Source:
    paths = raw["path"] if isinstance(raw["path"], list) else [raw["path"]]
    resolved = []
    for i, p in enumerate(paths):
        p = _str(p, f"{where}.path" + (f"[{i}]" if len(paths) > 1 else ""))
        resolved.append(p if "://" in p or Path(p).is_absolute() else str(base / p))
    fmt = raw.get("format")
    if fmt is None:
        first = resolved[0].rstrip("/").lower()
        fmt = "csv" if first.endswith((".csv", ".csv.gz", ".tsv")) else "parquet"
    try:
        return Source(tuple(resolved), fmt, raw.get("delimiter", ","))
    except SpecError as e:
        raise _fail(where, str(e)) from None


SOURCE_KEYS = ("path", "format", "delimiter")


def parse_spec(raw: dict, base: Path = Path("."), source: str = "spec") -> LogSpec:
    """Validate a spec mapping (as loaded from YAML); relative paths are resolved against
    `base`. Raises SpecError naming the key."""
    try:
        return _parse(_mapping(raw, source), base)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None


def load_spec(path: str | Path) -> LogSpec:
    """Read and validate a YAML log spec."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: invalid YAML: {e}") from None
    return parse_spec(raw, path.resolve().parent, str(path))


def _parse(raw: dict, base: Path) -> LogSpec:
    top_opt = ("name", "joins", "split", "malformed", "max_history", "embedding_dim",
               "null_values", "user_type", "rows_per_bucket", "unit_rows", "seed", "extra")
    _check_keys(raw, "", ("impressions", "behaviors", "features"), top_opt)

    imp = _mapping(raw["impressions"], "impressions")
    _check_keys(imp, "impressions", ("path", "user", "timestamp", "label"), SOURCE_KEYS[1:])
    lab = imp["label"]
    if isinstance(lab, str):
        lab = {"column": lab}
    lab = _mapping(lab, "impressions.label")
    _check_keys(lab, "impressions.label", ("column",), ("positive", "negative"))
    try:
        label = Label(_str(lab["column"], "impressions.label.column"),
                      _values(lab.get("positive", [1]), "impressions.label.positive"),
                      _values(lab.get("negative", [0]), "impressions.label.negative"))
    except SpecError as e:
        raise _fail("impressions.label", str(e)) from None
    impressions = Impressions(_source(imp, "impressions", base),
                              _str(imp["user"], "impressions.user"),
                              _str(imp["timestamp"], "impressions.timestamp"), label)

    beh = _mapping(raw["behaviors"], "behaviors")
    _check_keys(beh, "behaviors", ("path", "user", "timestamp"), SOURCE_KEYS[1:] + ("type",))
    type_column = keep = None
    if beh.get("type") is not None:
        t = beh["type"]
        if isinstance(t, str):
            t = {"column": t}
        t = _mapping(t, "behaviors.type")
        _check_keys(t, "behaviors.type", ("column",), ("keep",))
        type_column = _str(t["column"], "behaviors.type.column")
        keep = _values(t["keep"], "behaviors.type.keep") if "keep" in t else None
    behaviors = Behaviors(_source(beh, "behaviors", base), _str(beh["user"], "behaviors.user"),
                          _str(beh["timestamp"], "behaviors.timestamp"), type_column, keep)

    joins = []
    for name, j in _mapping(raw.get("joins") or {}, "joins").items():
        where = f"joins.{name}"
        if name in ("impressions", "behaviors") or not str(name).isidentifier():
            raise _fail(where, "join names must be identifiers other than impressions/behaviors")
        j = _mapping(j, where)
        _check_keys(j, where, ("path", "key", "column"), SOURCE_KEYS[1:] + ("key_type",))
        key_type = j.get("key_type", "int")
        if key_type not in RAW_TYPES:
            raise _fail(f"{where}.key_type", f"must be one of {RAW_TYPES}, got {key_type!r}")
        joins.append(Join(name, _source(j, where, base), _str(j["key"], f"{where}.key"),
                          _str(j["column"], f"{where}.column"), key_type))
    join_names = {j.name for j in joins}

    features = _parse_features(_mapping(raw["features"], "features"), join_names)

    split = _parse_split(raw.get("split", {"valid": 0.1, "test": 0.1}))
    mal = _mapping(raw.get("malformed") or {}, "malformed")
    _check_keys(mal, "malformed", (), ("max_fraction", "max_count", "show"))
    max_count = mal.get("max_count")
    frac = mal.get("max_fraction", None if max_count is not None else Malformed.max_fraction)
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float))
                             or not 0 <= frac <= 1):
        raise _fail("malformed.max_fraction", f"expected a number in [0, 1], got {frac!r}")
    malformed = Malformed(
        None if frac is None else float(frac),
        None if max_count is None else _int(max_count, "malformed.max_count", 0),
        _int(mal.get("show", Malformed.show), "malformed.show", 1))
    nulls = raw.get("null_values", list(DEFAULT_NULL_VALUES))
    if not isinstance(nulls, list) or not all(isinstance(v, str) for v in nulls):
        raise _fail("null_values", f"expected a list of strings, got {nulls!r}")
    name = raw.get("name", "logs")
    user_type = raw.get("user_type", "int")
    if user_type not in RAW_TYPES:
        raise _fail("user_type", f"must be one of {RAW_TYPES}, got {user_type!r}")
    return LogSpec(
        name=_str(name, "name"), impressions=impressions, behaviors=behaviors,
        features=features, joins=tuple(joins), split=split, malformed=malformed,
        max_history=_int(raw.get("max_history", 50), "max_history", 1),
        embedding_dim=_int(raw.get("embedding_dim", 16), "embedding_dim", 1),
        null_values=tuple(nulls), user_type=user_type,
        rows_per_bucket=_int(raw.get("rows_per_bucket", 2_000_000), "rows_per_bucket", 1),
        unit_rows=_int(raw.get("unit_rows", 1_000_000), "unit_rows", 1),
        seed=_int(raw.get("seed", 0), "seed", 0),
        extra=_mapping(raw.get("extra") or {}, "extra"),
    )


def _parse_features(raw: dict, join_names: set[str]) -> tuple[FeatureSpec, ...]:
    if not raw:
        raise _fail("features", "at least one feature is required")
    feats: list[FeatureSpec] = []
    for name, f in raw.items():
        where = f"features.{name}"
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise _fail(where, "feature names must be identifiers")
        f = _mapping(f, where)
        _check_keys(f, where, ("group", "column"),
                    ("from", "type", "min_count", "hash_buckets", "bins", "aligned_with"))
        group = f["group"]
        if group not in GROUPS:
            raise _fail(f"{where}.group", f"must be one of {GROUPS}, got {group!r}")
        column = _str(f["column"], f"{where}.column")
        if group == "behavior":
            for key in ("from", "type", "min_count", "hash_buckets", "bins"):
                if key in f:
                    raise _fail(f"{where}.{key}", "behaviour features take their source "
                                "(behaviors) and vocabulary from their aligned ad feature")
            if "aligned_with" not in f:
                raise _fail(f"{where}.aligned_with", "behaviour features need the ad feature "
                            "whose table they share")
            feats.append(FeatureSpec(name, group, column, "behaviors",
                                     aligned_with=_str(f["aligned_with"], f"{where}.aligned_with")))
            continue
        if "aligned_with" in f:
            raise _fail(f"{where}.aligned_with", "only behaviour features are aligned")
        src = f.get("from", "impressions")
        if src != "impressions" and src not in join_names:
            raise _fail(f"{where}.from", f"must be 'impressions' or a join name "
                        f"{sorted(join_names)}, got {src!r}")
        ftype = f.get("type", "int")
        if ftype not in RAW_TYPES:
            raise _fail(f"{where}.type", f"must be one of {RAW_TYPES}, got {ftype!r}")
        buckets = f.get("hash_buckets")
        if buckets is not None:
            buckets = _int(buckets, f"{where}.hash_buckets", 1)
            if "min_count" in f:
                raise _fail(f"{where}.min_count", "hash_buckets and min_count are exclusive")
        bins = f.get("bins")
        if bins is not None:
            if (not isinstance(bins, list) or not bins
                    or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                               and math.isfinite(b) for b in bins)
                    or any(b >= c for b, c in zip(bins, bins[1:]))):
                raise _fail(f"{where}.bins", f"expected strictly ascending numbers, got {bins!r}")
            bins = tuple(float(b) for b in bins)
        feats.append(FeatureSpec(name, group, column, src, ftype,
                                 _int(f.get("min_count", 1), f"{where}.min_count", 1),
                                 buckets, bins))
    by_name = {f.name: f for f in feats}
    for f in feats:
        if f.group != "behavior":
            continue
        target = by_name.get(f.aligned_with)
        if target is None or target.group != "ad":
            raise _fail(f"features.{f.name}.aligned_with",
                        f"{f.aligned_with!r} is not an ad feature of this spec")
    if not any(f.group == "behavior" for f in feats):
        raise _fail("features", "DIN needs at least one behaviour feature (group: behavior)")
    return tuple(feats)


def _parse_split(raw) -> Split:
    raw = _mapping(raw, "split")
    _check_keys(raw, "split", (), ("valid", "test", "valid_start", "test_start"))
    fracs = "valid" in raw or "test" in raw
    stamps = "valid_start" in raw or "test_start" in raw
    if fracs == stamps:
        raise _fail("split", "give either fractions {valid, test} or timestamps "
                    "{valid_start, test_start}")
    if fracs:
        vals = {}
        for key in ("valid", "test"):
            v = raw.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise _fail(f"split.{key}", f"expected a fraction in [0, 1), got {v!r}")
            vals[key] = float(v)
        if vals["valid"] + vals["test"] >= 1:
            raise _fail("split", f"valid + test must be < 1 to leave training data, got "
                        f"{vals['valid']} + {vals['test']}")
        return Split(valid=vals["valid"], test=vals["test"])
    for key in ("valid_start", "test_start"):
        if key not in raw:
            raise _fail(f"split.{key}", "required with timestamp cutoffs")
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(f"split.{key}", f"expected an integer timestamp, got {v!r}")
    if raw["valid_start"] > raw["test_start"]:
        raise _fail("split", f"valid_start ({raw['valid_start']}) must be <= test_start "
                    f"({raw['test_start']})")
    return Split(valid_start=raw["valid_start"], test_start=raw["test_start"])
