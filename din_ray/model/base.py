"""What every CTR model here is: the `CTRModel` interface, its `ModelConfig`, and the
capabilities a model declares (serving's shared-user-side fast path).

A CTR model is split in two, torchrec-style:
  * the sparse part: embedding tables, owned by `din_ray.embeddings.tables.EmbeddingTables` so
    they can be row-wise sharded across workers and updated row by row (MBA touches only the
    rows in a batch);
  * the dense part: a `CTRModel` subclass. It declares which tables it needs (`table_specs`)
    and which ids to look up (`sparse_inputs`); `forward` receives the looked-up vectors and
    returns logits.

    model = build_model(schema, ModelConfig(model="din"))   # din_ray.model
    tables = EmbeddingTables(model.table_specs())
    logits = model(tables.lookup(model.sparse_inputs(batch)), batch)   # (B,)

Shapes: B batch, L history length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from torch import Tensor, nn

from din_ray.embeddings.tables import SparseRequests, TableSpec
from din_ray.model.layers import ACTIVATIONS
from din_ray.schema import PAD_ID, Schema

Batch = dict[str, Tensor]  # column name -> ids (B,) or (B, L), labels (B,)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture choices. Defaults follow the paper (§4.3, §6.1) unless noted.

    Args:
        model: a name of `din_ray.model.model_names()`: "din", "base", "popularity", "lr",
            "wide_deep", "pnn", "deepfm".
        activation: "dice" (Eq. 9) or "prelu" (Eq. 8), used in the attention unit and the MLP.
        attention_hidden: local activation unit widths (paper figure 2: 80 -> 40 -> 1).
        mlp_hidden: MLP widths before the logit (paper: 200 -> 80 -> 1 output here, a logit rather
            than the paper's 2-way softmax, which is equivalent).
        attention_softmax: normalise activation weights with softmax. Off by default: the paper
            drops it to keep the intensity of interest (§4.3).
        pooling: BaseModel's history pooling, "sum" (paper) or "mean".
        ad_bias: add a learned per-id bias for every ad feature to the logit (the original public
            code has an item bias; it lets the model learn an item's click rate without spending
            embedding capacity on it). Off by default, as in the plain reference DIN (see the
            field's comment).
        dropout: dropout rate after each MLP hidden layer (0 = off).
        smoothing: popularity baseline's prior strength (pseudo-impressions at the global rate).
        attention_activation: the local activation unit's own activation; "" = `activation`.
            PReLU by default, whatever `activation` is (see the field's comment).
        dice_momentum: Dice's moving-average weight once past its first 1/momentum batches.
        zero_logit: start the MLP's logit layer at zero, so the logit starts as the ad bias.
            Off by default (torch's default init of the layer).
    """

    model: str = "din"
    activation: str = "dice"
    attention_hidden: tuple[int, ...] = (80, 40)
    mlp_hidden: tuple[int, ...] = (200, 80)
    attention_softmax: bool = False
    pooling: str = "sum"
    # Off, and the logit layer at torch's init (zero_logit below), as in the plain reference DIN:
    # with both on the logit starts as the ad bias, nothing below the zero layer gets a gradient
    # at first, and with N(0, 0.01²) rows the synthetic set's validation GAUC after one epoch was
    # 0.61. With N(0, 0.05²) rows and up to 8 epochs (TrainConfig) this gained +0.005 validation
    # GAUC on the planted synthetic set and +0.0045 on ml-latest-small (test: +0.003, −0.006)
    # over the previous defaults, 3 seeds each. With the local loop permuting the whole split
    # they are level with the reference on the synthetic set (12 seeds) and 0.0055 below it on
    # ml-latest-small (docs/results.md, "Defaults vs a plain DIN", session 5).
    ad_bias: bool = False
    dropout: float = 0.0
    smoothing: float = 20.0
    # PReLU in the local activation unit, `activation` in the MLP, as the plain reference DIN
    # (benchmarks/reference_din.py): Dice in the unit as well cost 0.026 validation GAUC on the
    # planted synthetic set (0.736 -> 0.762 with PReLU there; docs/results.md, "Defaults vs a
    # plain DIN"). `attention_activation="dice"` restores Dice in both.
    attention_activation: str = "prelu"
    dice_momentum: float = 0.01
    zero_logit: bool = False

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
        # Saved before these fields existed: the unit used `activation`, Dice momentum 0.01,
        # the ad bias on and the logit layer zero-initialised.
        raw = {"attention_activation": "", "dice_momentum": 0.01, "ad_bias": True,
               "zero_logit": True, **raw}
        return cls(**{k: v for k, v in raw.items() if k in names})


# --- the model interface ------------------------------------------------------------------------
class CTRModel(nn.Module):
    """Dense part of a CTR model over the schema's feature groups.

    Subclasses implement `forward(emb, batch) -> logits (B,)`. By default every schema feature is
    looked up in its table and the output of `forward` is a logit.

    Capabilities are declared here, each with the default that is right for any model, as
    torchrec's DLRM does; a subclass turns one on by declaring it itself:

        shares_user_side   serving's fast path. True when `score_candidates(emb, batch, owner)`
                           computes each user's side once and equals `forward` on the batch
                           with the user side repeated for every candidate. Default False:
                           serving then scores the repeated batch through `forward`.
        closed_form        fitted without gradients: the one table is computed by
                           `table_from_counts(clicks, impressions, smoothing)` from the
                           candidate's training counts (`din_ray.train.loop.fit_closed_form`);
                           such a model has no trainable parameters. Default False.

    A class that redefines `forward`, or a method `forward` relies on without the method the
    fast path runs in its place (`fast_path_counterparts`), has the fast path off unless it
    declares `shares_user_side` again itself: no model inherits a fast path that skips part of
    its own `forward`.
    """

    shares_user_side: ClassVar[bool] = False
    closed_form: ClassVar[bool] = False
    # A method `forward` relies on -> the method `score_candidates` runs in its place. A model
    # with a fast path lists the steps of its `forward` that the fast path replaces.
    fast_path_counterparts: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "shares_user_side" in own:
            return
        if "forward" in own or any(m in own and c not in own
                                   for m, c in cls.fast_path_counterparts.items()):
            cls.shares_user_side = False

    def __init__(self, schema: Schema, config: ModelConfig) -> None:
        super().__init__()
        self.schema = schema
        self.config = config

    def table_specs(self) -> dict[str, TableSpec]:
        """The embedding tables this model needs, by name: by default one per schema table."""
        tables = self.schema.tables
        return {name: TableSpec(name, rows, dim) for name, (rows, dim) in tables.items()}

    def sparse_inputs(self, batch: Batch) -> SparseRequests:
        """What to look up for `batch`: key -> (table, ids (B,) or (B, L)); `forward` receives
        the vectors under the same keys, (B, dim) or (B, L, dim). By default every feature."""
        return {f.name: (f.table, batch[f.name]) for f in self.schema.features}

    def history_mask(self, batch: Batch) -> Tensor:
        """(B, L) True where a history slot holds a behaviour; derived once, from PAD_ID."""
        return batch[self.schema.behavior_features[0].name] != PAD_ID

    def score_candidates(self, emb: dict[str, Tensor], batch: Batch,
                         owner: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits (C,) of C candidates against U users, each user's side computed once, and the
        activation weights (C, L) (None when the model has none); see `shares_user_side`.

        Args:
            emb, batch: looked-up vectors and ids, as for `forward`, except that user-side
                features have U rows and ad features C rows.
            owner: (C,) long, the user row of each candidate.
        Raises: NotImplementedError unless the model declares `shares_user_side`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no shared-user-side scoring "
                                  "(shares_user_side is False); score the repeated batch")
