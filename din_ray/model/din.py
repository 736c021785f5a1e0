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
from torch.nn import functional as F

from din_ray.schema import PAD_ID, Schema

Batch = dict[str, Tensor]
SparseRequests = dict[str, tuple[str, Tensor]]  # lookup key -> (table name, ids of any shape)

MODELS = ("din", "base", "popularity")  # plus din_ray.model.baselines: see model_names()
ACTIVATIONS = ("dice", "prelu")


@dataclass(frozen=True)
class TableSpec:
    """An embedding table: `num_rows` ids of width `dim`; row PAD_ID is kept at zero.

    `zero_init` starts every row at zero (per-id bias terms) instead of small random values.
    """

    name: str
    num_rows: int
    dim: int
    zero_init: bool = False


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


# --- row gather ---------------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """`src.index_select(0, index)` whose backward sums the gradient rows with one vectorised
    scatter_add. (On CPU the backward of index_select, index_add_, loops over the indices one
    slice at a time, and that of `src[index]` goes through a slower accumulating index_put; with
    B·L ≈ 50k history slots per batch either one costs more than the whole model.)"""

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = src.shape[0]
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        grad = grad.contiguous()
        out = grad.new_zeros(ctx.rows, *grad.shape[1:])
        flat = out.view(ctx.rows, -1)
        flat.scatter_add_(0, index.unsqueeze(1).expand(-1, flat.shape[1]),
                          grad.view(grad.shape[0], -1))
        return out, None


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """Rows `index` (N,) of `src` (R, ...) -> (N, ...), differentiable in `src`; any index may
    repeat (its gradient rows are summed)."""
    if not (src.requires_grad and torch.is_grad_enabled()):
        return src.index_select(0, index)
    return _GatherRows.apply(src, index)


# --- activations --------------------------------------------------------------------------------
class PReLU(nn.Module):
    """PReLU (Eq. 8) with one slope per channel of the LAST dimension.

    (torch.nn.PReLU puts channels on dim 1, which is the history axis for (B, L, H) inputs.)
    """

    def __init__(self, num_features: int, init: float = 0.25) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((num_features,), init))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        # Flattened to (N, C), our channels sit on F.prelu's dim 1: one fused kernel each way
        # instead of compare, multiply and select (and their backward).
        return F.prelu(x.reshape(-1, x.shape[-1]), self.alpha).reshape(x.shape)


class Dice(nn.Module):
    """Dice, the data adaptive activation (Eq. 9):

        f(s) = p(s)·s + (1 − p(s))·α·s,   p(s) = sigmoid((s − E[s]) / sqrt(Var[s] + ε))

    E[s] and Var[s] are per-channel statistics of the mini-batch in training and running
    averages of them at evaluation. Channels are the last dimension.

    The running averages are the plain average of the batch statistics over the first
    1/momentum updates (BatchNorm's momentum=None), then a moving average with weight
    `momentum`: the start values (mean 0, var 1) carry no weight from the first update on. A
    moving average from the start kept 3 % of them after one epoch of MovieLens (338 steps):
    running variances 6-70× the layers' real batch variances, which evaluation, early stopping
    and serving then used. Debiasing the moving average (Adam-style) measured the same to within
    3 % (benchmarks/dice_statistics.py).

    Args:
        num_features: channels C.
        eps: ε, 1e-8 in the paper.
        momentum: weight of the new batch in the moving averages, once past the first
            1/momentum updates.
    Shapes: x (..., C); mask (...) bool, True where a row is real, so padded history slots do not
        bias the statistics.
    Example:
        >>> dice = Dice(3).eval()   # fresh moving averages: mean 0, var 1 -> p = sigmoid(s)
        >>> dice(torch.tensor([[1.0, -1.0, 0.0]])).shape
        torch.Size([1, 3])
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.01) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before the counter existed load with it at 0, as BatchNorm does.
        state_dict.setdefault(prefix + "num_batches_tracked",
                              torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _track(self, mean: Tensor, var: Tensor) -> None:
        """Fold one batch's statistics (C,) into the running averages."""
        with torch.no_grad():  # fp32 moving averages, also under bf16 autocast
            self.num_batches_tracked += 1
            # A tensor weight, so a step on a GPU does not wait to read the count on the host.
            weight = (1.0 / self.num_batches_tracked.float()).clamp(min=self.momentum)
            self.running_mean.lerp_(mean.float(), weight)
            self.running_var.lerp_(var.float(), weight)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (N, C)
        if self.training and mask is None and rows.shape[0] > 1:
            # Every row counts: batch normalisation without affine parameters is exactly
            # (s − E[s]) / sqrt(Var[s] + ε) with biased batch statistics, and its fused kernels
            # (forward and backward, gradient through the statistics included) replace about
            # eight elementwise passes.
            z, mean, invstd = torch.native_batch_norm(rows, None, None, None, None, True, 0.0,
                                                      self.eps)
            self._track(mean, invstd.pow(-2) - self.eps)
            z = z.reshape(x.shape)
        elif not self.training:
            return self._folded(x)
        else:
            mean, var = self._statistics(rows, mask)
            z = (x - mean) * torch.rsqrt(var + self.eps)
        p = torch.sigmoid(z)
        return x * torch.addcmul(self.alpha, p, 1 - self.alpha)  # p·s + (1 − p)·α·s

    def _folded(self, x: Tensor) -> Tensor:
        """Eq. (9) at evaluation. The moving averages are constants there, so the normalisation
        folds into one affine map inside the sigmoid, p = sigmoid(a·s + b) with a = 1/sqrt(Var +
        ε), b = −E·a (C,). Without autograd the chain runs in place on one buffer: each fresh
        (N, C) buffer costs as much as the pass that fills it. x (..., C) -> (..., C)"""
        scale = torch.rsqrt(self.running_var + self.eps)  # (C,)
        shift = -self.running_mean * scale  # (C,)
        if torch.is_grad_enabled():
            p = torch.sigmoid(torch.addcmul(shift, x, scale))
            return x * torch.addcmul(self.alpha, p, 1 - self.alpha)
        out = torch.addcmul(shift, x, scale).sigmoid_()  # p
        return out.mul_(1 - self.alpha).add_(self.alpha).mul_(x)  # (α + p·(1 − α))·s

    def _statistics(self, rows: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mean and variance (C,) to normalise with: in training those of the real rows (N, C)
        (the moving averages are updated from them), else, or for a single real row, which has
        no variance, the moving averages."""
        if self.training and mask is not None:
            rows = rows[mask.reshape(-1)]
        if not self.training or rows.shape[0] <= 1:
            return self.running_mean, self.running_var
        mean = rows.mean(0)
        var = rows.var(0, unbiased=False)
        self._track(mean, var)
        return mean, var


def make_activation(name: str, num_features: int, dice_momentum: float = 0.01) -> nn.Module:
    return Dice(num_features, momentum=dice_momentum) if name == "dice" else PReLU(num_features)


class MLP(nn.Module):
    """Linear -> activation (-> dropout) per hidden width, then a final Linear to `out` units.

    Shapes: x (..., in_dim) -> (..., out); `mask` (...) is passed to Dice.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], activation: str, out: int = 1,
                 dropout: float = 0.0, dice_momentum: float = 0.01) -> None:
        super().__init__()
        dims = (in_dim, *hidden)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(make_activation(activation, b, dice_momentum) for b in hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(dims[-1], out)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for linear, act in zip(self.linears, self.acts):
            x = self.dropout(act(linear(x), mask))
        return self.out(x)


def _activate_inplace(act: nn.Module, x: Tensor) -> Tensor:
    """`act(x)` at evaluation without autograd, overwriting x (N, C) where it can: Dice's
    s·(α + (1 − α)·sigmoid(a·s + b)) in four passes over one extra buffer (`Dice._folded`
    takes five), PReLU as its one fused kernel."""
    if not isinstance(act, Dice):
        return act(x)
    scale = torch.rsqrt(act.running_var + act.eps)  # (C,)
    shift = -act.running_mean * scale  # (C,)
    p = torch.addcmul(shift, x, scale).sigmoid_()  # (N, C)
    torch.addcmul(act.alpha, p, 1 - act.alpha, out=p)  # α + p·(1 − α), in place
    return x.mul_(p)


# --- the local activation unit ------------------------------------------------------------------
class TargetAttention(nn.Module):
    """DIN's local activation unit with weighted-sum pooling (Eq. 3, Fig. 2).

    a(e_j, v_A) = MLP([e_j, v_A, e_j − v_A, e_j ⊙ v_A]) with widths `hidden` and a scalar output;
    v_U(A) = Σ_j a(e_j, v_A)·e_j, padded slots weighted 0. No softmax unless `softmax`.

    The first layer keeps the paper's parameter layout W = [W_e, W_v, W_d, W_p] (H, 4D) but is
    evaluated as (W_e + W_d)·e + (W_v − W_d)·v + W_p·(e ⊙ v): identical maths, and the candidate's
    term is computed once per sample instead of once per behaviour.

    Shapes: query (B, D), keys (B, L, D), mask (B, L) bool -> pooled (B, D), weights (B, L).
    Example:
        >>> att = TargetAttention(dim=4, hidden=(8, 4), activation="prelu")
        >>> keys = torch.randn(2, 3, 4); mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
        >>> pooled, w = att(torch.randn(2, 4), keys, mask)
        >>> bool((w[~mask] == 0).all())
        True
    """

    def __init__(self, dim: int, hidden: tuple[int, ...], activation: str,
                 softmax: bool = False, dice_momentum: float = 0.01) -> None:
        super().__init__()
        self.dim = dim
        self.softmax = softmax
        self.first = nn.Linear(4 * dim, hidden[0])
        self.first_act = make_activation(activation, hidden[0], dice_momentum)
        self.rest = MLP(hidden[0], hidden[1:], activation, out=1, dice_momentum=dice_momentum)

    def scores(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """Activation a(e_j, v_A) of every real behaviour; 0 on padded slots. -> (B, L)

        Only the real behaviours go through the unit: they are packed into N = mask.sum() rows
        first. Padded slots are weighted 0 and left out of Dice's statistics anyway, so the
        result is the same as running the unit on all B·L slots, at N/(B·L) of the cost.
        """
        B, L, D = keys.shape
        real = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat index of each real slot
        owner = torch.div(real, L, rounding_mode="floor")  # (N,) its sample
        e = gather_rows(keys.reshape(B * L, D), real)  # (N, D)
        v = gather_rows(query, owner)  # (N, D)
        w_e, w_v, w_d, w_p = self.first.weight.split(self.dim, dim=1)  # each (H, D)
        per_candidate = query @ (w_v - w_d).T + self.first.bias  # (B, H), once per sample
        # [e, e ⊙ v] @ [W_e + W_d, W_p].T plus the candidate's term: one matmul with the add fused.
        h = torch.addmm(gather_rows(per_candidate, owner), torch.cat([e, e * v], dim=1),
                        torch.cat([w_e + w_d, w_p], dim=1).T)  # (N, H)
        s = self.rest(self.first_act(h)).squeeze(-1)  # (N,)
        return s.new_zeros(B * L).index_copy(0, real, s).view(B, L)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self._pool(self.scores(query, keys, mask), keys, mask)

    def _pool(self, scores: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Masked (optionally softmaxed) weights (B, L) and the weighted sum of keys (B, D)."""
        weights = self._weights(scores, mask)
        pooled = (weights.unsqueeze(-1) * keys).sum(1)  # (B, D)
        return pooled, weights

    def _weights(self, scores: Tensor, mask: Tensor) -> Tensor:
        """Activation weights (B, L): scores (B, L) with padded slots at 0, softmaxed over the
        real ones when `softmax`."""
        if self.softmax:
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
            return torch.nan_to_num(weights)  # users with an empty history: all zero
        return scores * mask

    def shared(self, query: Tensor, keys: Tensor, mask: Tensor,
               owner: Tensor) -> tuple[Tensor, Tensor]:
        """`forward(query, keys[owner], mask[owner])` with each history's part of the first
        layer, keys @ (W_e + W_d).T, computed once per history instead of once per candidate
        (serving: one user, many candidate ads).

        Shapes: query (C, D) candidates; keys (U, L, D), mask (U, L) histories; owner (C,) long,
        the history of each candidate -> pooled (C, D), weights (C, L).
        """
        consecutive = keys.shape[0] == 1 or bool((owner[1:] >= owner[:-1]).all())
        if consecutive and len(query) and not (self.training or torch.is_grad_enabled()):
            # Serving: each history's candidates are consecutive (as the Scorer builds them).
            counts = torch.bincount(owner, minlength=keys.shape[0]).tolist()
            parts = [self._one_history(q, k, m) for q, k, m in
                     zip(query.split(counts), keys, mask) if len(q)]
            if len(parts) == 1:
                return parts[0]
            pooled, weights = zip(*parts)
            return torch.cat(pooled), torch.cat(weights)
        if keys.shape[0] == 1:
            h = self._first_layer(query, keys[0])  # (C, L, H): one history (a serving request)
        elif consecutive:
            counts = torch.bincount(owner, minlength=keys.shape[0]).tolist()
            h = torch.cat([self._first_layer(q, k) for q, k in zip(query.split(counts), keys)])
        else:
            h = self._first_layer_gathered(query, keys, owner)
        if keys.shape[0] == 1:  # one history: broadcast it over the candidates, no copies
            mask = mask.expand(query.shape[0], -1)  # (C, L)
        else:
            # Row copies (index_select: several times faster than x[owner] on CPU).
            keys, mask = keys.index_select(0, owner), mask.index_select(0, owner)  # (C, L, D)
        h = self.first_act(h, mask)
        return self._pool(self.rest(h, mask).squeeze(-1), keys, mask)  # scores (C, L)

    def _one_history(self, query: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """`shared` for one history at evaluation without autograd (serving), with every
        (candidate, behaviour) buffer written as few times as the maths allows:

          * the first layer is ONE matmul that also adds the per-behaviour row, through a column
            of ones appended to the candidates: [v, 1] @ [M; row] (`_first_layer`'s M), so no
            pass copies the bias rows into the (C, L·H) output before the product;
          * each activation runs in place on its layer's output (`_activate_inplace`);
          * the weighted sum over the history is one (C, L) @ (L, D) matmul, instead of a
            (C, L, D) product and a sum.

        Shapes: query (C, D) candidates, keys (L, D), mask (L,) bool -> pooled (C, D),
        weights (C, L). Equals `forward(query, keys, mask)` with the history repeated per
        candidate, up to float rounding (tests/train/test_speed_equivalence.py)."""
        C, (L, D), H = len(query), keys.shape, self.first.out_features
        w_e, w_v, w_d, w_p = self.first.weight.split(self.dim, dim=1)  # each (H, D)
        rhs = keys.new_empty(D + 1, L, H)  # [M; row], each part written once, in place
        torch.addcmul((w_v - w_d).T.unsqueeze(1), keys.T.unsqueeze(-1), w_p.T.unsqueeze(1),
                      out=rhs[:D])  # M (D, L, H)
        torch.addmm(self.first.bias, keys, (w_e + w_d).T, out=rhs[D])  # row (L, H)
        lhs = torch.cat([query, query.new_ones(C, 1)], dim=1)  # (C, D + 1)
        h = (lhs @ rhs.view(D + 1, L * H)).view(C * L, H)  # (C·L, H)
        h = _activate_inplace(self.first_act, h)
        for linear, act in zip(self.rest.linears, self.rest.acts):
            h = _activate_inplace(act, torch.addmm(linear.bias, h, linear.weight.T))
        scores = torch.addmm(self.rest.out.bias, h, self.rest.out.weight.T).view(C, L)
        weights = self._weights(scores, mask.expand(C, -1))  # (C, L)
        return weights @ keys, weights  # (C, D), (C, L)

    def _first_layer(self, query: Tensor, keys: Tensor) -> Tensor:
        """The first layer for one history and its candidates as ONE matmul, nothing built per
        (candidate, behaviour) before it:

            h[c, l] = (W_e + W_d)·e_l + b + Σ_d v_c[d]·(e_l[d]·W_p[:, d] + (W_v − W_d)[:, d])
                    = row[l] + (v @ M)[c, l],  M (D, L·H) built once per history.

        A (C, D) @ (D, L·H) product also runs far nearer the machine's matmul rate than the
        (C·L, D) @ (D, H) one of `_first_layer_gathered` (D is only 2 x 16 wide).

        Shapes: query (C, D), keys (L, D) -> (C, L, H)."""
        w_e, w_v, w_d, w_p = self.first.weight.split(self.dim, dim=1)  # each (H, D)
        L, D = keys.shape
        m = keys.T.unsqueeze(-1) * w_p.T.unsqueeze(1) + (w_v - w_d).T.unsqueeze(1)  # (D, L, H)
        row = keys @ (w_e + w_d).T + self.first.bias  # (L, H)
        return torch.addmm(row.reshape(-1), query, m.reshape(D, -1)).view(len(query), L, -1)

    def _first_layer_gathered(self, query: Tensor, keys: Tensor, owner: Tensor) -> Tensor:
        """The first layer over each candidate's gathered history (any `owner` order).
        Shapes: query (C, D), keys (U, L, D), owner (C,) -> (C, L, H)."""
        w_e, w_v, w_d, w_p = self.first.weight.split(self.dim, dim=1)  # each (H, D)
        per_behaviour = keys @ (w_e + w_d).T  # (U, L, H), shared by the user's candidates
        per_candidate = query @ (w_v - w_d).T + self.first.bias  # (C, H)
        keys = keys.index_select(0, owner)  # (C, L, D)
        interaction = (keys * query.unsqueeze(1)) @ w_p.T  # (C, L, H), a fresh buffer
        # Summed in place into it: every (C, L, H) pass saved is as dear as a small matmul.
        return (interaction.add_(per_behaviour.index_select(0, owner))
                .add_(per_candidate.unsqueeze(1)))


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
        total = (keys * mask.unsqueeze(-1)).sum(1)  # (B, D)
        if self.config.pooling == "mean":
            total = total / mask.sum(1, keepdim=True).clamp(min=1)
        return total, None

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
