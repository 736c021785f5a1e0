"""DIN (Zhou et al., KDD 2018) and the BaseModel it is compared with (§4.2, §4.3), wired from
`din_ray.model.layers`.

Both embed the candidate ad (v_A, its item and category vectors concatenated), pool the user's
behaviour history into one interest vector, and feed [interest, v_A, profile, context] to an MLP:

    BaseModel   interest = Σ_j e_j                      (pool_history: blind to the candidate)
    DIN         interest = Σ_j a(e_j, v_A)·e_j          (TargetAttention, Eq. 3)

    model = DIN(schema, ModelConfig(model="din"))        # or din_ray.model.build_model
    tables = EmbeddingTables(model.table_specs())
    logits = model(tables.lookup(model.sparse_inputs(batch)), batch)   # (B,)

For serving, `score_candidates` scores many candidates against few users with each user's side
computed once (`CTRModel.shares_user_side`).

Shapes: B batch, L history length, D concatenated behaviour width (item + category dims),
U users and C candidates when scoring.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from din_ray.embeddings.tables import SparseRequests, TableSpec
from din_ray.model.base import Batch, CTRModel, ModelConfig
from din_ray.model.layers import MLP, TargetAttention, pool_history
from din_ray.schema import Schema


class _Interest(CTRModel):
    """Shared body of DIN and BaseModel: embeddings -> [profile, interest, ad, context] -> MLP.

    The paper's behaviour vector is the concatenation of a behaviour's item and category
    embeddings (Fig. 2); the candidate vector v_A concatenates the aligned ad features the same way.
    """

    shares_user_side = True  # score_candidates below is this class's forward, user side once
    # forward pools through user_interest -> pool; score_candidates through pool_shared.
    fast_path_counterparts = {"user_interest": "score_candidates", "pool": "pool_shared"}

    def __init__(self, schema: Schema, config: ModelConfig) -> None:
        super().__init__(schema, config)
        if not schema.behavior_features:
            raise ValueError(f"model {config.model!r} needs behaviour features; schema has none")
        self.behavior = schema.behavior_features
        self.aligned = tuple(schema.feature(f.aligned_with) for f in self.behavior)
        aligned_names = {f.name for f in self.aligned}
        self.singles = tuple(f for f in schema.features
                             if not f.is_sequence and f.name not in aligned_names)
        self.behavior_dim = sum(f.embedding_dim for f in self.behavior)  # D
        in_dim = 2 * self.behavior_dim + sum(f.embedding_dim for f in self.singles)
        self.mlp = MLP(in_dim, config.mlp_hidden, config.activation, out=1, dropout=config.dropout,
                       dice_momentum=config.dice_momentum)
        if config.zero_logit:
            # The logit starts as the ad bias alone (with bias_init="popularity", the popularity
            # baseline); the network learns a correction on top of it.
            nn.init.zeros_(self.mlp.out.weight)
            nn.init.zeros_(self.mlp.out.bias)

    def table_specs(self) -> dict[str, TableSpec]:
        """The schema's tables, plus a zero-initialised dim-1 `<table>.bias` per ad feature."""
        specs = super().table_specs()
        if self.config.ad_bias:
            for f in self.schema.ad_features:
                name = f"{f.table}.bias"
                specs[name] = TableSpec(name, f.vocab_size, 1, zero_init=True)
        return specs

    def sparse_inputs(self, batch: Batch) -> SparseRequests:
        """Every feature, plus the ad features' ids again under `<feature>.bias`."""
        requests = super().sparse_inputs(batch)
        if self.config.ad_bias:
            for f in self.schema.ad_features:
                requests[f"{f.name}.bias"] = (f"{f.table}.bias", batch[f.name])
        return requests

    def pool(self, query: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """The interest: query (B, D), keys (B, L, D), mask (B, L) -> pooled (B, D), activation
        weights (B, L) or None. DIN and BaseModel differ only here."""
        raise NotImplementedError

    def user_interest(self, emb: dict[str, Tensor], batch: Batch) -> tuple[Tensor, Tensor | None]:
        """Pooled interest (B, D) and activation weights (B, L) (None for BaseModel)."""
        keys = torch.cat([emb[f.name] for f in self.behavior], dim=-1)  # (B, L, D)
        query = torch.cat([emb[f.name] for f in self.aligned], dim=-1)  # (B, D)
        return self.pool(query, keys, self.history_mask(batch))

    def forward(self, emb: dict[str, Tensor], batch: Batch) -> Tensor:
        """Logits (B,) from the looked-up vectors of `sparse_inputs(batch)`."""
        pooled, _ = self.user_interest(emb, batch)
        query = torch.cat([emb[f.name] for f in self.aligned], dim=-1)  # (B, D)
        parts = [pooled, query] + [emb[f.name] for f in self.singles]
        logits = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)
        if self.config.ad_bias:
            for f in self.schema.ad_features:
                logits = logits + emb[f"{f.name}.bias"].squeeze(-1)
        return logits

    def pool_shared(self, query: Tensor, keys: Tensor, mask: Tensor,
                    owner: Tensor) -> tuple[Tensor, Tensor | None]:
        """`pool` for C candidates over U histories: query (C, D), keys (U, L, D), mask (U, L),
        owner (C,) -> pooled (C, D), weights (C, L) or None. Subclasses share per-history work."""
        return self.pool(query, keys.index_select(0, owner), mask.index_select(0, owner))

    @torch.no_grad()
    def score_candidates(self, emb: dict[str, Tensor], batch: Batch,
                         owner: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits of many candidates against few users, the user side computed once per user.

        Equals `forward` on the batch where every user-side input is repeated for each of its
        candidates (`x[owner]`), up to float rounding.

        Args:
            emb, batch: looked-up vectors and ids, as for `forward`, except that user-side
                features have U rows (behaviours (U, L), profile and context (U,)) and ad
                features have C rows.
            owner: (C,) long, the user row of each candidate.
        Returns: logits (C,) and activation weights (C, L) (None when the model has none).
        """
        if not self.shares_user_side:
            raise NotImplementedError(f"{type(self).__name__} redefines forward or a step of it "
                                      "and has no shared-user-side scoring; score the repeated "
                                      "batch")
        keys = torch.cat([emb[f.name] for f in self.behavior], dim=-1)  # (U, L, D)
        query = torch.cat([emb[f.name] for f in self.aligned], dim=-1)  # (C, D)
        pooled, weights = self.pool_shared(query, keys, self.history_mask(batch), owner)
        parts = [pooled, query] + [emb[f.name] if f.group == "ad"
                                   else emb[f.name].index_select(0, owner) for f in self.singles]
        logits = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (C,)
        if self.config.ad_bias:
            for f in self.schema.ad_features:
                logits = logits + emb[f"{f.name}.bias"].squeeze(-1)
        return logits, weights


class DIN(_Interest):
    """Deep Interest Network: interest pooled by the local activation unit (§4.3)."""

    def __init__(self, schema: Schema, config: ModelConfig) -> None:
        super().__init__(schema, config)
        self.attention = TargetAttention(self.behavior_dim, config.attention_hidden,
                                         config.attention_activation,
                                         softmax=config.attention_softmax,
                                         dice_momentum=config.dice_momentum)

    def pool(self, query: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.attention(query, keys, mask)

    def pool_shared(self, query: Tensor, keys: Tensor, mask: Tensor,
                    owner: Tensor) -> tuple[Tensor, Tensor]:
        return self.attention.shared(query, keys, mask, owner)


class BaseModel(_Interest):
    """Embedding&MLP (§4.2): the history is sum- (paper) or mean-pooled, blind to the candidate."""

    def pool(self, query: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, None]:
        return pool_history(keys, mask, self.config.pooling), None  # (B, D)

    def pool_shared(self, query: Tensor, keys: Tensor, mask: Tensor,
                    owner: Tensor) -> tuple[Tensor, None]:
        total, _ = self.pool(query[:0], keys, mask)  # (U, D): candidate-blind, once per user
        return total.index_select(0, owner), None
