"""Feature schema: the contract between prepared data, the model, checkpoints and serving.

The paper (Table 1) groups features into user profile, user behaviour, ad and context groups.
Every feature is a column of integer ids in the prepared Parquet. A behaviour feature is an ordered,
fixed-length, PAD-padded array (most recent behaviours kept) that shares its embedding table
with the ad feature it is aligned with (`hist_item_id` <-> `item_id`), so a behaviour and a
candidate live in the same embedding space, which is what the local activation unit compares.

Stored as `schema.json` beside the data and inside every checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Reserved ids in every vocabulary. PAD fills unused history slots and is masked out everywhere;
# OOV stands for ids unseen when the vocabulary was built (new users/items at test or serving time).
PAD_ID = 0
OOV_ID = 1
NUM_RESERVED_IDS = 2

GROUPS = ("user", "behavior", "ad", "context")
SCHEMA_VERSION = 1


class SchemaError(ValueError):
    """A schema (or data that should match it) is malformed; the message names the feature."""


@dataclass(frozen=True)
class Feature:
    """One categorical feature column.

    Args:
        name: column name in the Parquet files and key in model inputs.
        group: one of `GROUPS`.
        table: embedding table the ids index. Behaviour features name the table of the ad feature
            they are aligned with; other features usually name their own table.
        vocab_size: rows of the table, reserved ids included (>= NUM_RESERVED_IDS + 1).
        embedding_dim: width of the table's vectors.
        max_len: history length for behaviour features (fixed-length padded arrays); None otherwise.
        aligned_with: for behaviour features, the ad feature this sequence mirrors.
    """

    name: str
    group: str
    table: str
    vocab_size: int
    embedding_dim: int
    max_len: int | None = None
    aligned_with: str | None = None

    def __post_init__(self) -> None:
        where = f"feature {self.name!r}"
        if not self.name or not self.name.replace("_", "").isalnum():
            raise SchemaError(f"{where}: name must be a non-empty identifier")
        if self.group not in GROUPS:
            raise SchemaError(f"{where}: group must be one of {GROUPS}, got {self.group!r}")
        if self.vocab_size <= NUM_RESERVED_IDS:
            raise SchemaError(
                f"{where}: vocab_size must be > {NUM_RESERVED_IDS} (PAD and OOV are reserved), "
                f"got {self.vocab_size}"
            )
        if self.embedding_dim <= 0:
            raise SchemaError(f"{where}: embedding_dim must be > 0, got {self.embedding_dim}")
        if self.group == "behavior":
            if self.max_len is None or self.max_len <= 0:
                raise SchemaError(
                    f"{where}: behaviour features need max_len > 0, got {self.max_len}")
            if not self.aligned_with:
                raise SchemaError(f"{where}: behaviour features need aligned_with (an ad feature)")
        elif self.max_len is not None or self.aligned_with is not None:
            raise SchemaError(f"{where}: only behaviour features take max_len/aligned_with")

    @property
    def is_sequence(self) -> bool:
        return self.group == "behavior"


@dataclass(frozen=True)
class Schema:
    """All features of a dataset plus the label and grouping columns.

    Args:
        features: every id feature, in a stable order.
        label: 0/1 click label column.
        user_column: raw user key used only to group impressions for GAUC (not a model input
            unless also declared as a feature).
        name: free-form dataset name (e.g. "movielens").
    """

    features: tuple[Feature, ...]
    label: str = "label"
    user_column: str = "user"
    name: str = ""
    version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"duplicate feature names: {dupes}")
        for reserved in (self.label, self.user_column):
            if reserved in names:
                raise SchemaError(f"feature {reserved!r} clashes with the label/user column name")
        by_name = {f.name: f for f in self.features}
        tables: dict[str, Feature] = {}
        for f in self.features:
            first = tables.setdefault(f.table, f)
            if (first.vocab_size, first.embedding_dim) != (f.vocab_size, f.embedding_dim):
                raise SchemaError(
                    f"feature {f.name!r} shares table {f.table!r} with {first.name!r} but has "
                    f"vocab_size/embedding_dim {f.vocab_size}/{f.embedding_dim} instead of "
                    f"{first.vocab_size}/{first.embedding_dim}"
                )
            if f.is_sequence:
                target = by_name.get(f.aligned_with or "")
                if target is None or target.group != "ad":
                    raise SchemaError(
                        f"feature {f.name!r}: aligned_with={f.aligned_with!r} is not an ad feature"
                    )
                if target.table != f.table:
                    raise SchemaError(
                        f"feature {f.name!r}: must share table {target.table!r} with "
                        f"{target.name!r}, got {f.table!r}"
                    )
        lens = {f.max_len for f in self.behavior_features}
        if len(lens) > 1:
            raise SchemaError(f"behaviour features must share one max_len, got {sorted(lens)}")

    # --- views -----------------------------------------------------------------------------
    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise SchemaError(f"unknown feature {name!r}; schema has {[f.name for f in self.features]}")

    def group(self, group: str) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.group == group)

    @property
    def behavior_features(self) -> tuple[Feature, ...]:
        return self.group("behavior")

    @property
    def ad_features(self) -> tuple[Feature, ...]:
        return self.group("ad")

    @property
    def max_history(self) -> int:
        return self.behavior_features[0].max_len if self.behavior_features else 0

    @property
    def tables(self) -> dict[str, tuple[int, int]]:
        """Embedding tables: name -> (num_rows, dim), in first-use order."""
        out: dict[str, tuple[int, int]] = {}
        for f in self.features:
            out.setdefault(f.table, (f.vocab_size, f.embedding_dim))
        return out

    def with_embedding_dim(self, dim: int) -> Schema:
        """The same schema with every table's width set to `dim` (a training choice)."""
        feats = [Feature(**{**asdict(f), "embedding_dim": dim}) for f in self.features]
        return Schema(feats, self.label, self.user_column, self.name, self.version, self.extra)

    # --- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "name": self.name,
            "label": self.label,
            "user_column": self.user_column,
            "features": [asdict(f) for f in self.features],
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, raw: dict, source: str = "schema") -> Schema:
        if not isinstance(raw, dict):
            raise SchemaError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("version") != SCHEMA_VERSION:
            raise SchemaError(
                f"{source}: unsupported schema version {raw.get('version')!r} "
                f"(this din-ray reads {SCHEMA_VERSION})"
            )
        known = {"version", "name", "label", "user_column", "features", "extra"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SchemaError(f"{source}: unknown keys {unknown}")
        feats = []
        for i, f in enumerate(raw.get("features") or []):
            fname = f.get("name", f"#{i}") if isinstance(f, dict) else f"#{i}"
            try:
                feats.append(Feature(**f))
            except TypeError as e:
                raise SchemaError(f"{source}: feature {fname!r}: {e}") from None
            except SchemaError as e:
                raise SchemaError(f"{source}: {e}") from None
        if not feats:
            raise SchemaError(f"{source}: no features")
        try:
            return cls(
                tuple(feats),
                label=raw.get("label", "label"),
                user_column=raw.get("user_column", "user"),
                name=raw.get("name", ""),
                extra=raw.get("extra") or {},
            )
        except SchemaError as e:
            raise SchemaError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        path = Path(path)
        if path.is_dir():
            path = path / "schema.json"
        if not path.exists():
            raise SchemaError(f"{path}: schema file not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_dict(raw, source=str(path))
