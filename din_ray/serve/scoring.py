"""Scoring parsed requests with a loaded checkpoint, free of any web framework.

`ServedModel.load` loads a checkpoint (a checkpoint directory, a train output or a tune output:
`resolve_checkpoint`) with its raw-id encoders (`din_ray.data.ids`) and a `RequestParser`
(`din_ray.serve.request`, the request format); `Scorer` scores a batch of parsed requests in one
forward pass; `ServedModel.response` builds the answer:

    -> {"model": {"name", "version", "created"}, "scores": [CTR per candidate, input order],
        "explain": {"history_used", "history_dropped", "weights": [[w per behaviour]
                    per candidate]}}                        # only when asked

`weights[c][j]` is the activation weight a(e_j, v_c) of Eq. 3 (softmax-normalised only if the
model was trained with attention_softmax) of candidate c on the history entry at position
`history_dropped + j` of the request's lists; BaseModel has none (`"explain": null` and an
`explain_note`). `din_ray/serve/app.py` wraps this in a Ray Serve deployment; everything here
runs (and is tested) without Ray.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from din_ray.allocator import keep_freed_memory
from din_ray.checkpoint import (
    ID_FILTER,
    MANIFEST,
    Checkpoint,
    load_model,
    resolve_checkpoint,
)
from din_ray.data.ids import Vocabulary, load_encoders
from din_ray.embeddings.tables import EmbeddingTables, SparseRequests
from din_ray.model import CTRModel
from din_ray.schema import Schema
from din_ray.serve.request import ParsedRequest, RequestLimits, RequestParser

log = logging.getLogger(__name__)

USER_SIDE = ("user", "behavior", "context")  # groups shared by all candidates of a request


# --- checkpoints --------------------------------------------------------------------------------
def checkpoint_version(path: Path) -> str:
    """Short content hash of the manifest: changes whenever a different checkpoint is served."""
    return hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()[:12]


def load_vocabularies(path: Path, schema: Schema) -> dict[str, Vocabulary]:
    """The raw-id encoders of the checkpoint at `path` (`din_ray.data.ids.load_encoders`), with
    CKPT/id_filter.npz's remapping where the model was trained with the frequency filter."""
    filter_file = path / ID_FILTER
    if not filter_file.exists():
        return load_encoders(path, schema)
    with np.load(filter_file, allow_pickle=False) as remaps:
        return load_encoders(path, schema, {t: remaps[t] for t in remaps.files})


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
        features (C,), and the request row of every candidate, owner (C,).

        Histories (U, L) are cut to the longest real one of the batch (at least one slot): the
        parser pads every history to the model's max length after its real behaviours, padded
        slots count for nothing in any model, and they would cost as much as real ones (a user
        with 5 behaviours of 50 would pay for 50)."""
        batch: dict[str, Tensor] = {}
        length = max(1, max(r.history_length for r in requests))
        for f in self.user_side:
            if f.is_sequence:
                batch[f.name] = torch.from_numpy(np.stack([r.history[f.name][:length]
                                                           for r in requests]))
            else:
                batch[f.name] = torch.tensor([r.user[f.name] for r in requests])
        for f in self.ad_side:
            batch[f.name] = torch.from_numpy(np.concatenate([r.candidates[f.name]
                                                             for r in requests]))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if len(requests) == 1:  # the common case, without repeat_interleave's three ops
            return batch, torch.zeros(requests[0].num_candidates, dtype=torch.long,
                                      device=self.device)
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
        name = ckpt.model_config().model
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
