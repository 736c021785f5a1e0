"""DIN (Zhou et al., KDD 2018), BaseModel and the popularity baseline.

A CTR model here is split in two, torchrec-style:
  * the sparse part: embedding tables, owned by `din_ray.embeddings.tables.EmbeddingTables` so they can be
    row-wise sharded across workers and updated row by row (MBA touches only the rows in a batch);
  * the dense part: this module's `CTRModel` subclasses. A model declares which tables it needs
    (`table_specs`) and which ids to look up (`sparse_inputs`); `forward` receives the looked-up
    vectors and returns logits.

    model = build_model(schema, ModelConfig(model="din"))
    tables = EmbeddingTables(model.table_specs())
    logits = model(tables.lookup(model.sparse_inputs(batch)), batch)   # (B,)

Shapes: B batch, L history length, D concatenated behaviour width (item + category dims),
H hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from din_ray.embeddings.tables import SparseRequests, TableSpec
from din_ray.model.layers import ACTIVATIONS, MLP, TargetAttention, pool_history
from din_ray.schema import PAD_ID, Schema

Batch = dict[str, Tensor]

MODELS = ("din", "base", "popularity")  # plus din_ray.model.baselines: see model_names()


@dataclass(frozen=True)
class ModelConfig:
    """Architecture choices. Defaults follow the paper (§4.3, §6.1) unless noted.

    Args:
        model: "din" | "base" | "popularity" (more in `din_ray.model.baselines`).
        activation: "dice" (Eq. 9) or "prelu" (Eq. 8), used in the attention unit and the MLP.
        attention_hidden: local activation unit widths (paper figure 2: 80 -> 40 -> 1).
        mlp_hidden: MLP widths before the logit (paper: 200 -> 80 -> 1 output here, a logit rather
            than the paper's 2-way softmax, which is equivalent).
        attention_softmax: normalise activation weights with softmax. Off by default: the paper
            drops it to keep the intensity of interest (§4.3).
        pooling: BaseModel's history pooling, "sum" (paper) or "mean".
        ad_bias: add a learned per-id bias for every ad feature to the logit (the original public
            code has an item bias; it lets the model learn an item's click rate without spending
            embedding capacity on it, which matters on small data).
        dropout: dropout rate after each MLP hidden layer (0 = off).
        smoothing: popularity baseline's prior strength (pseudo-impressions at the global rate).
        attention_activation: the local activation unit's own activation; "" = `activation`.
            PReLU by default, whatever `activation` is (see the field's comment).
        dice_momentum: Dice's moving-average weight once past its first 1/momentum batches.
        zero_logit: start the MLP's logit layer at zero, so the logit starts as the ad bias.
    """

    model: str = "din"
    activation: str = "dice"
    attention_hidden: tuple[int, ...] = (80, 40)
    mlp_hidden: tuple[int, ...] = (200, 80)
    attention_softmax: bool = False
    pooling: str = "sum"
    ad_bias: bool = True
    dropout: float = 0.0
    smoothing: float = 20.0
    # PReLU in the local activation unit, `activation` in the MLP, as the plain reference DIN
    # (benchmarks/reference_din.py): Dice in the unit as well cost 0.026 validation GAUC on the
    # planted synthetic set (0.736 -> 0.762 with PReLU there; docs/results.md, "Defaults vs a
    # plain DIN"). `attention_activation="dice"` restores Dice in both.
    attention_activation: str = "prelu"
    dice_momentum: float = 0.01
    zero_logit: bool = True

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.attention_activation not in ("", *ACTIVATIONS):
            raise ValueError(f"attention_activation must be '' or one of {ACTIVATIONS}, got "
                             f"{self.attention_activation!r}")
        # "" = the MLP's; stored resolved, so equal models have equal configs.
        object.__setattr__(self, "attention_activation",
                           self.attention_activation or self.activation)
        if not 0.0 < self.dice_momentum <= 1.0:
            raise ValueError(f"dice_momentum must be in (0, 1], got {self.dice_momentum}")
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("attention_hidden", "mlp_hidden"):
            widths = getattr(self, name)
            object.__setattr__(self, name, tuple(int(w) for w in widths))
            if not widths or min(widths) <= 0:
                raise ValueError(f"{name} must be non-empty positive widths, got {widths}")

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """The model fields of `raw` (a training config, as saved in a checkpoint or live);
        its other keys are ignored."""
        names = {f.name for f in fields(cls)}
        # Saved before these fields existed: the unit used `activation`, Dice momentum 0.01.
        raw = {"attention_activation": "", "dice_momentum": 0.01, **raw}
        return cls(**{k: v for k, v in raw.items() if k in names})


# --- models -------------------------------------------------------------------------------------
class CTRModel(nn.Module):
    """Dense part of a CTR model over the schema's feature groups.

    Subclasses implement `forward(emb, batch) -> logits (B,)`. By default every schema feature is
    looked up in its table and the output of `forward` is a logit.

    `shares_user_side` declares serving's fast path: True when `score_candidates(emb, batch,
    owner)` computes each user's side once and equals `forward` on the batch with the user side
    repeated for every candidate. A class that redefines `forward` has it off unless it declares
    it again itself, so no model inherits a fast path that skips part of its own `forward`.
    """

    shares_user_side: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in vars(cls) and "shares_user_side" not in vars(cls):
            cls.shares_user_side = False

    def __init__(self, schema: Schema, config: ModelConfig) -> None:
        super().__init__()
        self.schema = schema
        self.config = config

    def table_specs(self) -> dict[str, TableSpec]:
        tables = self.schema.tables
        return {name: TableSpec(name, rows, dim) for name, (rows, dim) in tables.items()}

    def sparse_inputs(self, batch: Batch) -> SparseRequests:
        return {f.name: (f.table, batch[f.name]) for f in self.schema.features}

    def history_mask(self, batch: Batch) -> Tensor:
        """(B, L) True where a history slot holds a behaviour; derived once, from PAD_ID."""
        return batch[self.schema.behavior_features[0].name] != PAD_ID


class _Interest(CTRModel):
    """Shared body of DIN and BaseModel: embeddings -> [profile, interest, ad, context] -> MLP.

    The paper's behaviour vector is the concatenation of a behaviour's item and category
    embeddings (Fig. 2); the candidate vector v_A concatenates the aligned ad features the same way.
    """

    shares_user_side = True  # score_candidates below is this class's forward, user side once

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
        specs = super().table_specs()
        if self.config.ad_bias:
            for f in self.schema.ad_features:
                name = f"{f.table}.bias"
                specs[name] = TableSpec(name, f.vocab_size, 1, zero_init=True)
        return specs

    def sparse_inputs(self, batch: Batch) -> SparseRequests:
        requests = super().sparse_inputs(batch)
        if self.config.ad_bias:
            for f in self.schema.ad_features:
                requests[f"{f.name}.bias"] = (f"{f.table}.bias", batch[f.name])
        return requests

    def pool(self, query: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def user_interest(self, emb: dict[str, Tensor], batch: Batch) -> tuple[Tensor, Tensor | None]:
        """Pooled interest (B, D) and activation weights (B, L) (None for BaseModel)."""
        keys = torch.cat([emb[f.name] for f in self.behavior], dim=-1)  # (B, L, D)
        query = torch.cat([emb[f.name] for f in self.aligned], dim=-1)  # (B, D)
        return self.pool(query, keys, self.history_mask(batch))

    def forward(self, emb: dict[str, Tensor], batch: Batch) -> Tensor:
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
            raise NotImplementedError(f"{type(self).__name__} redefines forward and has no "
                                      "shared-user-side scoring; score the repeated batch")
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


_REGISTRY: dict[str, type[CTRModel]] = {"din": DIN, "base": BaseModel, "popularity": Popularity}


def register_model(name: str, cls: type[CTRModel]) -> None:
    """Make a model selectable by name (`din_ray.model.baselines` registers the paper's competitors)."""
    _REGISTRY[name] = cls


def _register_builtin_baselines() -> None:
    """Import `din_ray.model.baselines` (LR, Wide&Deep, PNN, DeepFM), which registers itself. Done on
    first use rather than at import time: baselines imports this module."""
    import din_ray.model.baselines  # noqa: F401


def model_names() -> tuple[str, ...]:
    _register_builtin_baselines()
    return tuple(_REGISTRY)


def build_model(schema: Schema, config: ModelConfig) -> CTRModel:
    _register_builtin_baselines()
    if config.model not in _REGISTRY:
        raise ValueError(f"model must be one of {model_names()}, got {config.model!r}")
    return _REGISTRY[config.model](schema, config)
