"""The popularity baseline: a candidate's smoothed click rate, no history, no gradient.

Its one table is filled by counting clicks and impressions on the training split
(`Popularity.table_from_counts`; the training loop calls it), not by SGD. It gives the floor
every learned model must clear, and its table can seed DIN's per-id ad bias
(bias_init="popularity").
"""

from __future__ import annotations

import torch
from torch import Tensor

from din_ray.embeddings.tables import SparseRequests, TableSpec
from din_ray.model.base import Batch, CTRModel, ModelConfig
from din_ray.schema import Schema


class Popularity(CTRModel):
    """No-history baseline: the candidate's smoothed click rate on the training split.

    Its one table holds logit((clicks_j + k·p) / (impressions_j + k)) per candidate id j, with p
    the global click rate and k = `config.smoothing`; it is filled by counting, not by SGD
    (see `din_ray.train.loop`). Unseen ids get the global rate.
    """

    def __init__(self, schema: Schema, config: ModelConfig) -> None:
        super().__init__(schema, config)
        self.candidate = schema.ad_features[0]

    def table_specs(self) -> dict[str, TableSpec]:
        name = f"{self.candidate.table}.ctr"
        return {name: TableSpec(name, self.candidate.vocab_size, 1)}

    def sparse_inputs(self, batch: Batch) -> SparseRequests:
        return {"ctr": (f"{self.candidate.table}.ctr", batch[self.candidate.name])}

    def forward(self, emb: dict[str, Tensor], batch: Batch) -> Tensor:
        return emb["ctr"].squeeze(-1)

    @staticmethod
    def table_from_counts(clicks: Tensor, impressions: Tensor, smoothing: float) -> Tensor:
        """(V,) click and impression counts -> (V, 1) smoothed click-rate logits."""
        prior = clicks.sum() / impressions.sum().clamp(min=1)
        rate = (clicks + smoothing * prior) / (impressions + smoothing)
        return torch.logit(rate.clamp(1e-6, 1 - 1e-6)).unsqueeze(-1)
