"""Serving requests: the JSON format, its limits and validation, free of any web framework.

`RequestParser` turns one request body into a `ParsedRequest` in dense ids (`din_ray.serve.scoring`
scores it; `din_ray/serve/app.py` serves both over HTTP). One request ranks the candidate ads of
ONE user:

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

The answer's format is `din_ray.serve.scoring`'s.

Raw ids are JSON strings or integers, compared as strings (296 and "296" are the same movie)
against the checkpoint's vocabularies (`CKPT/vocab/<table>.parquet`); ids never seen in training
map to OOV_ID. Tables prepared from logs without a vocabulary are encoded the way preparation
encoded them, recorded in the schema: hashed tables (`extra.hashed`) hash the raw id into their
buckets, binned numeric features (`extra.bins`) take the raw number and look up its bin. Any
other table without a vocabulary file was built from dense ids: it takes integers, and ids
outside its rows map to OOV_ID. These encoders live in `din_ray.data.ids`, shared with data
preparation. Histories longer than the model's max length keep their most recent (last)
`max_len` behaviours; `history_dropped` says how many were cut.

Every rejected request raises `RequestError`, which carries an HTTP status and the offending
field (`candidates[3].item_id`, `history.cate_id`, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from din_ray.data.ids import RawIdError, Vocabulary, json_type, short_json
from din_ray.schema import PAD_ID, Feature, Schema

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
                                            f"{json_type(payload)}")
        unknown = sorted(set(payload) - set(TOP_LEVEL))
        if unknown:
            raise RequestError(422, _key(unknown[0]),
                               f"unknown field; expected {list(TOP_LEVEL)}")
        explain = payload.get("explain", False)
        if not isinstance(explain, bool):
            raise RequestError(422, "explain", f"expected true or false, got {short_json(explain)}")
        user = self._scalars(payload, "user", self.user_features)
        user.update(self._scalars(payload, "context", self.context_features))
        history, length, dropped = self._history(payload.get("history"))
        return ParsedRequest(user, history, length, dropped, self._candidates(payload), explain)

    def _encode(self, f: Feature, value: object, field: str) -> int:
        try:
            return self.vocabs[f.table].encode(value)
        except RawIdError as e:
            raise RequestError(422, field, str(e)) from None

    def _scalars(self, payload: dict, key: str, features: tuple[Feature, ...]) -> dict[str, int]:
        raw = payload.get(key)
        if raw is None and not features:
            return {}
        if not isinstance(raw, dict):
            names = [f.name for f in features]
            raise RequestError(422, key, f"expected an object with {names}, got "
                                         f"{json_type(raw)}")
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
                                                   f"{json_type(raw)}")
            self._check_keys(raw, list(self.history_fields), "history")
            first = next(iter(self.history_fields))
            for key in self.history_fields:
                if not isinstance(raw[key], list):
                    raise RequestError(422, f"history.{key}",
                                       f"expected a list, got {json_type(raw[key])}")
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
            raise RequestError(422, "candidates", f"expected a list, got {json_type(raw)}")
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
                                               f"{json_type(cand)}")
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
