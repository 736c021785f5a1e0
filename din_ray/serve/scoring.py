"""Serving core, free of any web framework: request validation, raw-id mapping, scoring.

`din_ray/serve/app.py` wraps this in a Ray Serve deployment; everything here runs (and is tested) without
Ray. One request ranks the candidate ads of ONE user:

    POST /v1/ctr
    {
      "user":       {"<user feature>": raw id, ...},        # every user-profile feature; may be
                                                           # omitted when the schema has none
      "history":    {"item_id": [10, 296, 318],            # one list per behaviour field, keyed
                     "cate_id": ["Drama", "Comedy", "Drama"]},  # by the AD feature it aligns with;
                                                           # oldest first, the LAST is the most
                                                           # recent; omitted = no history
      "candidates": [{"item_id": 296, "cate_id": "Comedy"}, ...],   # every ad feature, 1..N
      "context":    {"<context feature>": raw id, ...},     # required iff the schema has any
      "explain":    false                                   # activation weights per behaviour
    }

    -> {"model": {"name", "version", "created"}, "scores": [CTR per candidate, input order],
        "explain": {"history_used", "history_dropped", "weights": [[w per behaviour]
                    per candidate]}}                        # only when asked

`weights[c][j]` is the activation weight a(e_j, v_c) of Eq. 3 (softmax-normalised only if the
model was trained with attention_softmax) of candidate c on the history entry at position
`history_dropped + j` of the request's lists; BaseModel has none (`"explain": null` and an
`explain_note`).

Raw ids are JSON strings or integers, compared as strings (296 and "296" are the same movie)
against the checkpoint's vocabularies (`CKPT/vocab/<table>.parquet`); ids never seen in training
map to OOV_ID. Tables prepared from logs without a vocabulary are encoded the way preparation
encoded them, recorded in the schema: hashed tables (`extra.hashed`) hash the raw id into their
buckets, binned numeric features (`extra.bins`) take the raw number and look up its bin. Any
other table without a vocabulary file was built from dense ids: it takes integers, and ids
outside its rows map to OOV_ID. Histories longer than the model's max length keep their
most recent (last) `max_len` behaviours; `history_dropped` says how many were cut.

Every rejected request raises `RequestError`, which carries an HTTP status and the offending
field (`candidates[3].item_id`, `history.cate_id`, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from din_ray.allocator import keep_freed_memory
from din_ray.checkpoint import ID_FILTER, MANIFEST, Checkpoint, CheckpointError, load_model
from din_ray.data.ids import bin_index, hashed_ids
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model.din import CTRModel, SparseRequests
from din_ray.schema import NUM_RESERVED_IDS, OOV_ID, PAD_ID, Feature, Schema

log = logging.getLogger(__name__)

USER_SIDE = ("user", "behavior", "context")  # groups shared by all candidates of a request
TOP_LEVEL = ("user", "history", "candidates", "context", "explain")


class RequestError(ValueError):
    """A request the server rejects: HTTP `status`, the offending `field`, and why."""

    def __init__(self, status: int, field: str, message: str) -> None:
        # Field names and values come from the client: a lone surrogate ("\ud800" in JSON) is a
        # valid Python str that cannot be encoded as the UTF-8 of the error response.
        field, message = _printable(field), _printable(message)
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def to_dict(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one request. Defaults: a ranking call carries hundreds of ads (paper §6), and
    1 MiB holds 1000 candidates plus a long history with room to spare."""

    max_candidates: int = 1000
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_candidates", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# --- checkpoints --------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory behind `path`.

    Accepts a checkpoint (has manifest.json), a `din-ray train` output directory (has
    checkpoint/), or a `din-ray tune` output directory (has best.json naming the best trial's
    checkpoint; a relative name is taken relative to that directory).
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    best = path / "best.json"
    if best.exists():
        try:
            target = json.loads(best.read_text())["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{best}: expected a JSON object with a 'checkpoint' path "
                                  f"({type(e).__name__}: {e})") from None
        target = Path(target) if Path(target).is_absolute() else path / target
        return resolve_checkpoint(target)
    if (path / "checkpoint" / MANIFEST).exists():
        return path / "checkpoint"
    raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST}), a train output (no "
                          "checkpoint/) or a tune output (no best.json)")


def checkpoint_version(path: Path) -> str:
    """Short content hash of the manifest: changes whenever a different checkpoint is served."""
    return hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()[:12]


# --- raw ids ------------------------------------------------------------------------------------
class Vocabulary:
    """Raw id -> dense id for one embedding table.

    Args:
        table: table name; num_rows: its rows (reserved ids included).
        mapping: raw id string -> dense id, or None when the table's ids are already dense.
    """

    def __init__(self, table: str, num_rows: int, mapping: dict[str, int] | None) -> None:
        self.table, self.num_rows, self.mapping = table, num_rows, mapping

    @classmethod
    def load(cls, path: Path, table: str, num_rows: int) -> Vocabulary:
        t = pq.read_table(path, columns=["raw", "id"])
        ids = np.asarray(t.column("id").to_numpy(), dtype=np.int64)
        if ids.size and (ids.min() < NUM_RESERVED_IDS or ids.max() >= num_rows):
            raise CheckpointError(f"{path}: dense ids must lie in [{NUM_RESERVED_IDS}, "
                                  f"{num_rows}), got [{ids.min()}, {ids.max()}]")
        return cls(table, num_rows, dict(zip(t.column("raw").to_pylist(), ids.tolist())))

    def encode(self, value: object, field: str) -> int:
        _check_raw_id(value, field)
        if self.mapping is not None:
            return self.mapping.get(str(value), OOV_ID)
        if not isinstance(value, int):
            raise RequestError(422, field, f"table {self.table!r} has no vocabulary: send its "
                                           f"dense integer id, got {_short(value)}")
        return value if NUM_RESERVED_IDS <= value < self.num_rows else OOV_ID

    def describe(self) -> dict:
        return {"num_rows": self.num_rows,
                "raw_ids": len(self.mapping) if self.mapping is not None else None}


class HashedIds(Vocabulary):
    """Raw id -> `hash(raw) % buckets + NUM_RESERVED_IDS`, the function `din_ray.data.logs.pipeline` used
    for a table prepared with `hash_buckets` (int ids hashed as int64, others as strings)."""

    def __init__(self, table: str, num_rows: int, buckets: int, id_type: str) -> None:
        super().__init__(table, num_rows, None)
        self.buckets, self.id_type = buckets, id_type

    def encode(self, value: object, field: str) -> int:
        _check_raw_id(value, field)
        if self.id_type == "int":
            try:
                raw = np.array([int(value)], dtype=np.int64)
            except (ValueError, OverflowError):
                raise RequestError(422, field, f"table {self.table!r} hashes integer ids, got "
                                               f"{_short(value)}") from None
        else:
            raw = np.array([str(value)], dtype=object)
        return int(hashed_ids(raw, self.buckets, self.id_type)[0])

    def describe(self) -> dict:
        return {"num_rows": self.num_rows, "raw_ids": None, "hash_buckets": self.buckets}


class BinnedIds(Vocabulary):
    """A raw number -> the id of its bin: bin i (edges[i-1] <= x < edges[i]) is id
    i + NUM_RESERVED_IDS, as `din_ray.data.logs.pipeline` bucketized the feature."""

    def __init__(self, table: str, num_rows: int, edges: Sequence[float]) -> None:
        super().__init__(table, num_rows, None)
        self.edges = np.asarray(edges, dtype=np.float64)

    def encode(self, value: object, field: str) -> int:
        try:
            x = float(value) if not isinstance(value, bool) else float("nan")
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond 1e308
            x = float("nan")
        if not np.isfinite(x):
            raise RequestError(422, field, f"table {self.table!r} bins numbers, got "
                                           f"{_short(value)}")
        return int(bin_index(np.array([x]), self.edges)[0]) + NUM_RESERVED_IDS

    def describe(self) -> dict:
        return {"num_rows": self.num_rows, "raw_ids": None, "bins": self.edges.tolist()}


class FilteredIds(Vocabulary):
    """Another encoder's ids through the frequency filter the model was trained with
    (`reg="filter"`: ids outside the kept ones became OOV in training and evaluation)."""

    def __init__(self, inner: Vocabulary, remap: np.ndarray) -> None:
        super().__init__(inner.table, inner.num_rows, inner.mapping)
        self.inner, self.remap = inner, remap

    def encode(self, value: object, field: str) -> int:
        return int(self.remap[self.inner.encode(value, field)])

    def describe(self) -> dict:
        kept = int((self.remap >= NUM_RESERVED_IDS).sum())
        return {**self.inner.describe(), "filter_kept_ids": kept}


def load_vocabularies(path: Path, schema: Schema) -> dict[str, Vocabulary]:
    """One raw-id encoder per schema table: CKPT/vocab/<table>.parquet where present, else the
    hashing or binning recorded in the schema, else dense ids; then CKPT/id_filter.npz's
    remapping where the model was trained with the frequency filter."""
    out = _base_encoders(path, schema)
    filter_file = path / ID_FILTER
    if filter_file.exists():
        with np.load(filter_file, allow_pickle=False) as remaps:
            for table in remaps.files:
                remap = np.asarray(remaps[table], dtype=np.int64)
                if table not in out or len(remap) != out[table].num_rows:
                    raise CheckpointError(f"{filter_file}: remapping of {table!r} does not "
                                          "match the schema's tables")
                out[table] = FilteredIds(out[table], remap)
    return out


def _base_encoders(path: Path, schema: Schema) -> dict[str, Vocabulary]:
    hashed = schema.extra.get("hashed", {})
    hash_types = schema.extra.get("hash_types", {})
    bins = schema.extra.get("bins", {})
    out: dict[str, Vocabulary] = {}
    for table, (rows, _) in schema.tables.items():
        file = path / "vocab" / f"{table}.parquet"
        if file.exists():
            out[table] = Vocabulary.load(file, table, rows)
        elif table in hashed:
            if table not in hash_types:
                raise CheckpointError(f"{path}: table {table!r} is hashed but its schema does "
                                      "not say whether as integers or strings (data prepared "
                                      "by an older din-ray); prepare the data again")
            out[table] = HashedIds(table, rows, int(hashed[table]), hash_types[table])
        elif table in bins:
            out[table] = BinnedIds(table, rows, bins[table])
        else:
            out[table] = Vocabulary(table, rows, None)
    return out


def _check_raw_id(value: object, field: str) -> None:
    """Raw ids are JSON strings (valid Unicode: no lone surrogates) or integers."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(422, field, f"expected a string or integer id, got "
                                       f"{_json_type(value)} {_short(value)}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(422, field, f"not valid Unicode (a lone surrogate escape): "
                                           f"{_short(value)}") from None


def _short(value: object, limit: int = 40) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, list, dict)) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --- requests -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedRequest:
    """One validated request in dense ids.

    user: user-side scalar features (profile and context) -> dense id.
    history: behaviour feature name -> (L,) int64, oldest first, PAD after the last real one
        (the prepared-data layout).
    history_length: real behaviours kept (<= L); history_dropped: oldest ones cut off.
    candidates: ad feature name -> (C,) int64.
    """

    user: dict[str, int]
    history: dict[str, np.ndarray]
    history_length: int
    history_dropped: int
    candidates: dict[str, np.ndarray]
    explain: bool

    @property
    def num_candidates(self) -> int:
        return len(next(iter(self.candidates.values())))


class RequestParser:
    """Validates request bodies against a schema and maps raw ids through its vocabularies."""

    def __init__(self, schema: Schema, vocabs: dict[str, Vocabulary],
                 limits: RequestLimits | None = None) -> None:
        if not schema.behavior_features or not schema.ad_features:
            raise ValueError(f"schema {schema.name!r}: serving needs behaviour and ad features")
        self.schema, self.vocabs = schema, vocabs
        self.limits = limits or RequestLimits()
        self.user_features = schema.group("user")
        self.context_features = schema.group("context")
        self.ad_features = schema.ad_features
        # history key (the aligned ad feature's name) -> behaviour feature
        self.history_fields = {f.aligned_with: f for f in schema.behavior_features}
        self.max_len = schema.max_history

    def parse_body(self, body: bytes) -> ParsedRequest:
        """Raw HTTP body -> `ParsedRequest`; raises `RequestError` (400, 413 or 422)."""
        if len(body) > self.limits.max_body_bytes:
            raise RequestError(413, "body", f"{len(body)} bytes exceeds the limit of "
                                            f"{self.limits.max_body_bytes}")
        try:
            payload = json.loads(body, object_pairs_hook=_unique_keys,
                                 parse_constant=_no_constant)
        except UnicodeDecodeError as e:
            raise RequestError(400, "body", f"not UTF-8 text: {e.reason}") from None
        except json.JSONDecodeError as e:
            raise RequestError(400, "body", f"invalid JSON at line {e.lineno} column "
                                            f"{e.colno}: {e.msg}") from None
        except RecursionError:
            raise RequestError(400, "body", "JSON nested too deeply") from None
        except ValueError as e:  # e.g. an integer literal of more than 4300 digits
            raise RequestError(400, "body", f"invalid JSON: {e}") from None
        return self.parse(payload)

    def parse(self, payload: object) -> ParsedRequest:
        """Decoded JSON -> `ParsedRequest`; raises `RequestError` (422) naming the field."""
        if not isinstance(payload, dict):
            raise RequestError(422, "body", f"expected a JSON object, got "
                                            f"{_json_type(payload)}")
        unknown = sorted(set(payload) - set(TOP_LEVEL))
        if unknown:
            raise RequestError(422, _key(unknown[0]),
                               f"unknown field; expected {list(TOP_LEVEL)}")
        explain = payload.get("explain", False)
        if not isinstance(explain, bool):
            raise RequestError(422, "explain", f"expected true or false, got {_short(explain)}")
        user = self._scalars(payload, "user", self.user_features)
        user.update(self._scalars(payload, "context", self.context_features))
        history, length, dropped = self._history(payload.get("history"))
        return ParsedRequest(user, history, length, dropped, self._candidates(payload), explain)

    def _encode(self, f: Feature, value: object, field: str) -> int:
        return self.vocabs[f.table].encode(value, field)

    def _scalars(self, payload: dict, key: str, features: tuple[Feature, ...]) -> dict[str, int]:
        raw = payload.get(key)
        if raw is None and not features:
            return {}
        if not isinstance(raw, dict):
            names = [f.name for f in features]
            raise RequestError(422, key, f"expected an object with {names}, got "
                                         f"{_json_type(raw)}")
        self._check_keys(raw, [f.name for f in features], key)
        return {f.name: self._encode(f, raw[f.name], f"{key}.{f.name}") for f in features}

    def _check_keys(self, obj: dict, expected: list[str], where: str) -> None:
        unknown = sorted(set(obj) - set(expected))
        if unknown:
            hint = ""
            behaviour = {f.name: a for a, f in self.history_fields.items()}
            if where == "history" and unknown[0] in behaviour:
                hint = f" (history lists are keyed by the ad feature: {behaviour[unknown[0]]!r})"
            raise RequestError(422, f"{where}.{_key(unknown[0])}",
                               f"unknown field; expected {expected}{hint}")
        missing = [k for k in expected if k not in obj]
        if missing:
            raise RequestError(422, f"{where}.{missing[0]}", "missing")

    def _history(self, raw: object) -> tuple[dict[str, np.ndarray], int, int]:
        lists: dict[str, list] = {}
        if raw is not None:
            if not isinstance(raw, dict):
                raise RequestError(422, "history", f"expected an object of aligned lists "
                                                   f"{list(self.history_fields)}, got "
                                                   f"{_json_type(raw)}")
            self._check_keys(raw, list(self.history_fields), "history")
            first = next(iter(self.history_fields))
            for key in self.history_fields:
                if not isinstance(raw[key], list):
                    raise RequestError(422, f"history.{key}",
                                       f"expected a list, got {_json_type(raw[key])}")
                if len(raw[key]) != len(raw[first]):
                    raise RequestError(422, f"history.{key}",
                                       f"has {len(raw[key])} entries but history.{first} has "
                                       f"{len(raw[first])}; history lists must be aligned")
                lists[key] = raw[key]
        total = len(next(iter(lists.values()))) if lists else 0
        keep = min(total, self.max_len)
        dropped = total - keep
        out = {}
        for key, f in self.history_fields.items():
            row = np.full(self.max_len, PAD_ID, dtype=np.int64)
            for j in range(keep):  # the last `keep` entries are the most recent
                row[j] = self._encode(f, lists[key][dropped + j],
                                      f"history.{key}[{dropped + j}]")
            out[f.name] = row
        return out, keep, dropped

    def _candidates(self, payload: dict) -> dict[str, np.ndarray]:
        raw = payload.get("candidates")
        if raw is None:
            raise RequestError(422, "candidates", "missing")
        if not isinstance(raw, list):
            raise RequestError(422, "candidates", f"expected a list, got {_json_type(raw)}")
        if not raw:
            raise RequestError(422, "candidates", "empty; send at least one candidate")
        if len(raw) > self.limits.max_candidates:
            raise RequestError(422, "candidates", f"{len(raw)} candidates exceed the limit of "
                                                  f"{self.limits.max_candidates}")
        names = [f.name for f in self.ad_features]
        cols = {f.name: np.empty(len(raw), dtype=np.int64) for f in self.ad_features}
        for i, cand in enumerate(raw):
            where = f"candidates[{i}]"
            if not isinstance(cand, dict):
                raise RequestError(422, where, f"expected an object with {names}, got "
                                               f"{_json_type(cand)}")
            self._check_keys(cand, names, where)
            for f in self.ad_features:
                cols[f.name][i] = self._encode(f, cand[f.name], f"{where}.{f.name}")
        return cols


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads hook: a key given twice is ambiguous (JSON parsers disagree on which wins)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise RequestError(400, _key(key), "duplicate key in a JSON object")
    return out


def _key(name: str) -> str:
    """A client's object key as a field name: quoted unless a plain identifier ("" stays
    visible)."""
    return name if name.isidentifier() else json.dumps(name)


def _no_constant(name: str) -> float:
    """json.loads hook: NaN and Infinity are not JSON (RFC 8259), though Python reads them."""
    raise RequestError(400, "body", f"{name} is not a JSON value")


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --- scoring ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """One request's result: CTR per candidate; activation weights (C, history_length) or
    None when the model has none."""

    ctr: list[float]
    weights: list[list[float]] | None


class Scorer:
    """Scores a batch of requests in one forward pass.

    For models that declare `shares_user_side` (DIN, BaseModel) each request's user side
    (history embeddings, the history's part of the attention's first layer) is computed once and
    shared by its candidates (`score_candidates`); other models see the equivalent repeated
    batch through their own `forward`.
    """

    def __init__(self, model: CTRModel, tables: EmbeddingTables, schema: Schema,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model, self.tables = model.to(self.device).eval(), tables.to(self.device).eval()
        self.schema = schema
        self.user_side = tuple(f for f in schema.features if f.group in USER_SIDE)
        self.ad_side = schema.ad_features
        self.shared = model.shares_user_side

    def batch(self, requests: Sequence[ParsedRequest]) -> tuple[dict[str, Tensor], Tensor]:
        """Dense ids of `requests` on the scorer's device: user-side features (U, ...) and ad
        features (C,), and the request row of every candidate, owner (C,)."""
        batch: dict[str, Tensor] = {}
        for f in self.user_side:
            if f.is_sequence:
                batch[f.name] = torch.from_numpy(np.stack([r.history[f.name] for r in requests]))
            else:
                batch[f.name] = torch.tensor([r.user[f.name] for r in requests])
        for f in self.ad_side:
            batch[f.name] = torch.from_numpy(np.concatenate([r.candidates[f.name]
                                                             for r in requests]))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        counts = torch.tensor([r.num_candidates for r in requests], device=self.device)
        owner = torch.repeat_interleave(torch.arange(len(requests), device=self.device),
                                        counts)  # (C,)
        return batch, owner

    def logits(self, requests: Sequence[ParsedRequest]) -> tuple[Tensor, Tensor | None]:
        """Logits (C,) of every candidate of every request, in order, and weights (C, L)."""
        batch, owner = self.batch(requests)
        with torch.inference_mode():  # per thread: the Serve replica calls this off the loop
            if self.shared:
                emb = self._embed(self.model.sparse_inputs(batch))
                return self.model.score_candidates(emb, batch, owner)
            full = {k: (v[owner] if k in {f.name for f in self.user_side} else v)
                    for k, v in batch.items()}
            return self.model(self._embed(self.model.sparse_inputs(full)), full), None

    def _embed(self, sparse: SparseRequests) -> dict[str, Tensor]:
        """`tables.lookup(sparse)` as one row gather per input: key -> ids shape + (dim,).

        A replica holds whole tables and the parser only emits ids inside them (index_select
        raises on any other), so the training lookup's id deduplication and range check buy
        nothing for a request's few hundred ids; skipping them halves the lookup's time."""
        if self.tables.world_size != 1:  # a row block only: the exchange-aware lookup
            return self.tables.lookup(sparse)
        return {key: self.tables.weight(table).index_select(0, ids.reshape(-1))
                .view(*ids.shape, self.tables.specs[table].dim)
                for key, (table, ids) in sparse.items()}

    def score(self, requests: Sequence[ParsedRequest]) -> list[Scores]:
        logits, weights = self.logits(requests)
        probs = torch.sigmoid(logits).tolist()  # the batch's one copy to the host
        if weights is not None:
            weights = weights.cpu() if any(r.explain for r in requests) else None
        out, start = [], 0
        for r in requests:
            end = start + r.num_candidates
            w = None
            if weights is not None and r.explain:
                w = weights[start:end, :r.history_length].tolist()
            out.append(Scores(probs[start:end], w))
            start = end
        return out


# --- a loaded checkpoint ------------------------------------------------------------------------
@dataclass
class ServedModel:
    """Everything a replica needs to answer requests for one checkpoint."""

    path: Path
    checkpoint: Checkpoint
    parser: RequestParser
    scorer: Scorer
    name: str
    version: str

    @classmethod
    def load(cls, path: str | Path, limits: RequestLimits | None = None,
             device: torch.device | str = "cpu") -> ServedModel:
        """Load the checkpoint at `path` (see `resolve_checkpoint`) with safe deserialisation
        only: JSON, Parquet and `torch.load(weights_only=True)` inside `din_ray.checkpoint`.
        The weights are read on the host and then moved to `device` (a replica's GPU), so any
        checkpoint serves on any device."""
        path = resolve_checkpoint(path).resolve()
        keep_freed_memory()  # a request's activations reuse the last one's pages
        model, tables, ckpt = load_model(path)
        parser = RequestParser(ckpt.schema, load_vocabularies(path, ckpt.schema), limits)
        name = str(ckpt.config.get("model", type(model).__name__))
        served = cls(path, ckpt, parser, Scorer(model, tables, ckpt.schema, device), name,
                     checkpoint_version(path))
        log.info("serving %s version %s from %s on %s", name, served.version, path, device)
        return served

    @property
    def explains(self) -> bool:
        """Whether the model has per-behaviour activation weights (DIN does, BaseModel not)."""
        return hasattr(self.scorer.model, "attention")

    def model_ref(self) -> dict:
        return {"name": self.name, "version": self.version,
                "created": self.checkpoint.manifest.get("created")}

    def info(self) -> dict:
        """GET /v1/model: schema, vocabularies, training metrics, request format."""
        p = self.parser
        metrics = {k: v for k, v in self.checkpoint.metrics.items() if k != "history"}
        return {
            "model": {**self.model_ref(), "checkpoint": str(self.path),
                      "explain": self.explains},
            "schema": self.checkpoint.schema.to_dict(),
            "vocab_sizes": {t: v.num_rows for t, v in p.vocabs.items()},
            "vocabularies": {t: v.describe() for t, v in p.vocabs.items()},
            "metrics": metrics,
            "request": {"user": [f.name for f in p.user_features],
                        "context": [f.name for f in p.context_features],
                        "history": list(p.history_fields), "max_history": p.max_len,
                        "candidate": [f.name for f in p.ad_features],
                        "max_candidates": p.limits.max_candidates,
                        "max_body_bytes": p.limits.max_body_bytes},
        }

    def response(self, request: ParsedRequest, scores: Scores) -> dict:
        """The JSON body answering `request`."""
        out: dict = {"model": self.model_ref(), "scores": scores.ctr}
        if request.explain:
            if scores.weights is None:
                out["explain"] = None
                out["explain_note"] = (f"model {self.name!r} has no per-behaviour activation "
                                       "weights (only DIN's attention produces them)")
            else:
                out["explain"] = {"history_used": request.history_length,
                                  "history_dropped": request.history_dropped,
                                  "weights": scores.weights}
        return out
