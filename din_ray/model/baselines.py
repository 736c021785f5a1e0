"""The paper's competitors (§6.2): LR, Wide&Deep, PNN and DeepFM.

Each uses the same schema, the same embedding tables (`din_ray.embeddings.tables`) and the same
training loop as DIN and BaseModel, and is selected by name (`din_ray.model.MODELS`):

    din-ray train --data out/ml --model wide_deep --activation prelu --output runs/wd

    model         logit
    lr            b + Σ_f w_f[id_f]                 one weight per id and feature; histories summed
    base          BaseModel (din_ray.model.din)     Embedding&MLP, sum pooling
    wide_deep     BaseModel + Σ_j u[hash(h_j, c)]   wide part: the history × candidate cross ids
    pnn           MLP([fields, <f_i, f_k> ∀ i<k])   product layer: field-pair inner products
    deepfm        BaseModel + FM(fields) + Σ_f w_f  FM as the wide part, with first-order terms
    din           DIN (din_ray.model.din)

"Fields" are one d-vector per feature: the candidate's item and category (and any profile or
context feature) embeddings, and each behaviour sequence pooled like BaseModel does (sum by
default). Shapes: B batch, L history length, F fields, d embedding width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from din_ray.embeddings.tables import SparseRequests, TableSpec
from din_ray.model.base import Batch, CTRModel, ModelConfig
from din_ray.model.din import BaseModel
from din_ray.model.layers import MLP
from din_ray.schema import PAD_ID, Schema

# Rows of each Wide&Deep cross table: 2 reserved + a prime number of hash buckets, so the pair
# index (h · V + c) spreads over the buckets whatever the vocabulary sizes are.
CROSS_BUCKETS = 1_048_573  # prime, about 2^20
CROSS_ROWS = CROSS_BUCKETS + 2


# --- first-order (one weight per id) terms, shared by LR and DeepFM -----------------------------
def first_order_specs(schema: Schema) -> dict[str, TableSpec]:
    """A dim-1 table per feature: `<table>.w_<feature>`, named after the feature's table. Its
    n_j for MBA are counted on its own lookups (`din_ray.train.loop.table_counts`)."""
    return {_w(f.table, f.name): TableSpec(_w(f.table, f.name), f.vocab_size, 1)
            for f in schema.features}


def first_order_inputs(schema: Schema, batch: Batch) -> SparseRequests:
    return {f"w.{f.name}": (_w(f.table, f.name), batch[f.name]) for f in schema.features}


def first_order_logit(schema: Schema, emb: dict[str, Tensor], mask: Tensor | None) -> Tensor:
    """Σ_f w_f[id_f], sequence features summed over their real (mask) slots. -> (B,)"""
    total = 0
    for f in schema.features:
        w = emb[f"w.{f.name}"].squeeze(-1)  # (B,) or (B, L)
        total = total + ((w * mask).sum(1) if f.is_sequence else w)
    return total


def _w(table: str, feature: str) -> str:
    return f"{table}.w_{feature}"


class LR(CTRModel):
    """Logistic regression over the one-hot/multi-hot ids (§6.2, a weak baseline).

    logit = b + Σ_f w_f[id_f], with separate weights for the candidate's ids and for the
    history's ids (a history id's weight is summed over the slots holding it). PAD weighs 0.
    """

    def __init__(self, schema: Schema, config: ModelConfig) -> None:
        super().__init__(schema, config)
        self.bias = nn.Parameter(torch.zeros(()))

    def table_specs(self) -> dict[str, TableSpec]:
        return first_order_specs(self.schema)

    def sparse_inputs(self, batch: Batch) -> SparseRequests:
        return first_order_inputs(self.schema, batch)

    def forward(self, emb: dict[str, Tensor], batch: Batch) -> Tensor:
        mask = self.history_mask(batch) if self.schema.behavior_features else None  # (B, L)
        return self.bias + first_order_logit(self.schema, emb, mask)


class _Fields(BaseModel):
    """BaseModel plus a view of its inputs as F equal-width field vectors (PNN, DeepFM)."""

    def __init__(self, schema: Schema, config: ModelConfig) -> None:
        super().__init__(schema, config)
        dims = {f.embedding_dim for f in schema.features}
        if len(dims) != 1:
            raise ValueError(f"model {config.model!r} takes inner products of field embeddings, "
                             f"which needs one embedding_dim for every table; got {sorted(dims)}")
        self.num_fields = len(self.behavior) + len(self.aligned) + len(self.singles)

    def fields(self, emb: dict[str, Tensor], batch: Batch) -> Tensor:
        """Pooled behaviour sequences, then candidate features, then the rest. -> (B, F, d)"""
        mask = self.history_mask(batch)  # (B, L)
        pooled = [self.pool(emb[a.name], emb[f.name], mask)[0]  # (B, d) each
                  for f, a in zip(self.behavior, self.aligned)]
        singles = [emb[f.name] for f in (*self.aligned, *self.singles)]
        return torch.stack(pooled + singles, dim=1)  # (B, F, d)


class WideDeep(BaseModel):
    """Wide&Deep (§6.2): deep part = BaseModel; wide part = the cross product of the user's
    behaviours with the candidate, as the paper takes it ("user rated movies × candidate movie").

    For each behaviour feature h (aligned with candidate feature c) and each history slot j, the
    pair (h_j, c) is hashed into one of `CROSS_BUCKETS` buckets of a dim-1 table `wide_<h>`; the
    wide logit is the sum of the slot weights, PAD slots excluded.
    """

    def __init__(self, schema: Schema, config: ModelConfig) -> None:
        super().__init__(schema, config)
        self.cross_rows = CROSS_ROWS

    def table_specs(self) -> dict[str, TableSpec]:
        specs = super().table_specs()
        for f in self.behavior:
            specs[f"wide_{f.name}"] = TableSpec(f"wide_{f.name}", self.cross_rows, 1)
        return specs

    def cross_ids(self, history: Tensor, candidate: Tensor, cand_vocab: int) -> Tensor:
        """Hashed ids of the (behaviour, candidate) pairs; PAD where either side is PAD.

        Shapes: history (B, L), candidate (B,) -> (B, L) in [2, cross_rows) or PAD.
        """
        pair = history * cand_vocab + candidate.unsqueeze(1)  # (B, L) exact pair index
        ids = pair % (self.cross_rows - 2) + 2
        real = (history != PAD_ID) & (candidate != PAD_ID).unsqueeze(1)
        return torch.where(real, ids, torch.zeros_like(ids))

    def sparse_inputs(self, batch: Batch) -> SparseRequests:
        requests = super().sparse_inputs(batch)
        for f, a in zip(self.behavior, self.aligned):
            ids = self.cross_ids(batch[f.name].long(), batch[a.name].long(), a.vocab_size)
            requests[f"wide.{f.name}"] = (f"wide_{f.name}", ids)
        return requests

    def forward(self, emb: dict[str, Tensor], batch: Batch) -> Tensor:
        mask = self.history_mask(batch)  # (B, L)
        wide = sum((emb[f"wide.{f.name}"].squeeze(-1) * mask).sum(1) for f in self.behavior)
        return super().forward(emb, batch) + wide


class PNN(_Fields):
    """Product-based neural network (§6.2, inner-product variant): after the embeddings, a product
    layer adds the inner products <f_i, f_k> of every pair of field vectors to the MLP input.

    MLP input: [BaseModel's concatenated fields (F·d), F(F−1)/2 inner products].
    """

    def __init__(self, schema: Schema, config: ModelConfig) -> None:
        super().__init__(schema, config)
        rows, cols = torch.triu_indices(self.num_fields, self.num_fields, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        in_dim = self.mlp.linears[0].in_features + len(rows)
        self.mlp = MLP(in_dim, config.mlp_hidden, config.activation, out=1,
                       dropout=config.dropout, dice_momentum=config.dice_momentum)
        if config.zero_logit:  # as in every model with an MLP: the logit starts as the ad bias
            nn.init.zeros_(self.mlp.out.weight)
            nn.init.zeros_(self.mlp.out.bias)

    def forward(self, emb: dict[str, Tensor], batch: Batch) -> Tensor:
        fields = self.fields(emb, batch)  # (B, F, d)
        gram = fields @ fields.transpose(1, 2)  # (B, F, F)
        products = gram[:, self.pair_rows, self.pair_cols]  # (B, F(F-1)/2)
        x = torch.cat([fields.flatten(1), products], dim=-1)  # (B, F·d + F(F-1)/2)
        logits = self.mlp(x).squeeze(-1)  # (B,)
        if self.config.ad_bias:
            for f in self.schema.ad_features:
                logits = logits + emb[f"{f.name}.bias"].squeeze(-1)
        return logits


class DeepFM(_Fields):
    """DeepFM (§6.2): a factorization machine as the wide part, sharing the deep part's
    embeddings: logit = BaseModel + Σ_f w_f[id_f] + Σ_{i<k} <f_i, f_k>.

    The pairwise term uses FM's identity Σ_{i<k} <f_i, f_k> = ½(‖Σ_i f_i‖² − Σ_i ‖f_i‖²).
    """

    def table_specs(self) -> dict[str, TableSpec]:
        return {**super().table_specs(), **first_order_specs(self.schema)}

    def sparse_inputs(self, batch: Batch) -> SparseRequests:
        return {**super().sparse_inputs(batch), **first_order_inputs(self.schema, batch)}

    def forward(self, emb: dict[str, Tensor], batch: Batch) -> Tensor:
        fields = self.fields(emb, batch)  # (B, F, d)
        fm = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(-1)  # (B,)
        first = first_order_logit(self.schema, emb, self.history_mask(batch))  # (B,)
        return super().forward(emb, batch) + fm + first
