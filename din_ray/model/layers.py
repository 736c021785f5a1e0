"""The layers DIN and its competitors are built from (Zhou et al., KDD 2018, §4.3 and Fig. 2).

    PReLU, Dice        the two activations the paper compares (Eq. 8, Eq. 9); `make_activation`
    MLP                Linear -> activation (-> dropout) per hidden width, then a logit
    TargetAttention    DIN's local activation unit with weighted-sum pooling (Eq. 3), as a layer:
                       the candidate attends over the padded history, padding weighted 0
    pool_history       BaseModel's candidate-blind sum (or mean) pooling of the history
    frozen             an evaluation path's constants (weights regrouped or transposed, Dice's
                       affine map), rebuilt only when the weights they come from change

The models in `din_ray.model.din` and `din_ray.model.baselines` only wire these together.

Shapes: B batch, L history length, D behaviour width (item + category dims), H hidden width,
C channels of an activation (its input's last dimension).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from din_ray.embeddings.tables import gather_rows

ACTIVATIONS = ("dice", "prelu")


# --- activations --------------------------------------------------------------------------------
class PReLU(nn.Module):
    """PReLU (Eq. 8) with one slope per channel of the LAST dimension.

    (torch.nn.PReLU puts channels on dim 1, which is the history axis for (B, L, H) inputs.)

    Shapes: x (..., C) -> (..., C); `mask` is accepted for Dice's signature and unused.
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
    """The activation `name` ("dice" or "prelu", see ACTIVATIONS) over `num_features` channels;
    `dice_momentum` is Dice's moving-average weight (ignored by PReLU)."""
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
        if not (self.training or torch.is_grad_enabled()):
            return self._evaluate(x)
        for linear, act in zip(self.linears, self.acts):
            x = self.dropout(act(linear(x), mask))
        return self.out(x)

    def _evaluate(self, x: Tensor) -> Tensor:
        """`forward` at evaluation without autograd (serving, validation): each layer one
        `addmm` on weights transposed once per weight version (`frozen`) and its activation in
        place (`_activate_inplace`); dropout is the identity there and Dice ignores the mask.
        x (..., in_dim) -> (..., out)"""
        layers, (w_out, b_out) = frozen(self, lambda: _stack_constants(self))
        h = x.reshape(-1, x.shape[-1])  # (N, in_dim)
        for w, b, act in layers:
            h = _activate_inplace(act, torch.addmm(b, h, w))
        return torch.addmm(b_out, h, w_out).view(*x.shape[:-1], w_out.shape[1])  # (..., out)


# --- evaluation constants -----------------------------------------------------------------------
T = TypeVar("T")

# Bumped whenever any module registers a parameter, buffer or submodule (assignment included):
# `frozen` then looks its module's tensors up again. Gathering them on every call instead
# (`module.parameters()`) took 50 µs per call, more than the constants it keeps save.
_registrations = [0]


def _count_registration(*_) -> None:
    _registrations[0] += 1


for _register in (nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook,
                  nn.modules.module.register_module_module_registration_hook):
    _register(_count_registration)


def frozen(module: nn.Module, build: Callable[[], T]) -> T:
    """`build()`, computed again only when a parameter or buffer of `module` has changed since
    the last call: an optimizer step, Dice's moving averages and `load_state_dict` write in place
    (each bumps the tensor's version counter); `.to()` changes a tensor's dtype or device;
    assigning a new parameter, buffer or layer is a registration (`_registrations`). (Assigning
    `tensor.data` directly on the same device and dtype is not seen: load weights with
    `load_state_dict` or `copy_`.) For the
    constants of an evaluation path (weights transposed, Dice's affine map), which would
    otherwise be rebuilt by a dozen small ops on every call. `build` runs without autograd and
    outside inference mode, so what it returns is usable in either."""
    cached = module.__dict__.get("_frozen")
    if cached is not None and cached[0] == _registrations[0]:
        _, state, key, value = cached
        if key == [(t._version, t.dtype, t.device) for t in state]:
            return value
    state = (*module.parameters(), *module.buffers())
    with torch.inference_mode(False), torch.no_grad():
        value = build()
    module.__dict__["_frozen"] = (_registrations[0], state,
                                  [(t._version, t.dtype, t.device) for t in state], value)
    return value


def _activation_constants(act: nn.Module) -> tuple[Tensor, ...]:
    """What `_activate_inplace` needs of `act` at evaluation: (α,) for PReLU; for Dice the
    folded affine map of Eq. (9), (a, b, α, 1 − α) with a = 1/sqrt(Var + ε), b = −E·a (C,)."""
    if isinstance(act, Dice):
        scale = torch.rsqrt(act.running_var + act.eps)
        return scale, -act.running_mean * scale, act.alpha.detach(), 1 - act.alpha.detach()
    assert isinstance(act, PReLU), type(act)
    return (act.alpha.detach(),)


def _activate_inplace(constants: tuple[Tensor, ...], x: Tensor) -> Tensor:
    """An activation at evaluation without autograd, from its `_activation_constants`,
    overwriting x (N, C) where it can: Dice's s·(α + (1 − α)·sigmoid(a·s + b)) in four passes
    over one extra buffer (`Dice._folded` takes five), PReLU as its one fused kernel."""
    if len(constants) == 1:
        return F.prelu(x, constants[0])
    scale, shift, alpha, one_minus_alpha = constants
    p = torch.addcmul(shift, x, scale).sigmoid_()  # (N, C)
    torch.addcmul(alpha, p, one_minus_alpha, out=p)  # α + p·(1 − α), in place
    return x.mul_(p)


Layer = tuple[Tensor, Tensor, tuple[Tensor, ...]]  # weight (in, out), bias (out,), activation


def _stack_constants(mlp: MLP) -> tuple[list[Layer], tuple[Tensor, Tensor]]:
    """An MLP's layers for `addmm(bias, h, weight)`: weights transposed to (in, out) and made
    contiguous once, with their activations' constants; and the output layer's weight and bias."""
    layers = [(lin.weight.detach().T.contiguous(), lin.bias.detach(), _activation_constants(act))
              for lin, act in zip(mlp.linears, mlp.acts)]
    return layers, (mlp.out.weight.detach().T.contiguous(), mlp.out.bias.detach())


@dataclass(frozen=True)
class _FirstLayer:
    """The attention unit's first layer regrouped for serving (`TargetAttention._one_history`), each
    part (D, H) contiguous: h = e·key + v·candidate + (e ⊙ v)·product + bias."""

    key: Tensor  # (W_e + W_d).T
    candidate: Tensor  # (W_v − W_d).T
    product: Tensor  # W_p.T
    bias: Tensor  # (H,)
    act: tuple[Tensor, ...]


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
        fused = len(query) and not (self.training or torch.is_grad_enabled())
        if fused and keys.shape[0] == 1:  # serving one request: owner is all zeros
            return self._one_history(query, keys[0], mask[0])
        consecutive = keys.shape[0] == 1 or bool((owner[1:] >= owner[:-1]).all())
        if fused and consecutive:
            # A batch of requests: each history's candidates are consecutive (as the Scorer
            # builds them).
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
          * [M; row] is built from the first layer's parts regrouped and transposed once per
            weight version (`frozen`, `_FirstLayer`): the (D, L, H) broadcast then reads
            contiguous rows, several times faster than from the (H, 4D) weight's column blocks;
          * each activation runs in place on its layer's output (`_activate_inplace`);
          * the weighted sum over the history is one (C, L) @ (L, D) matmul, instead of a
            (C, L, D) product and a sum.

        Shapes: query (C, D) candidates, keys (L, D), mask (L,) bool -> pooled (C, D),
        weights (C, L). Equals `forward(query, keys, mask)` with the history repeated per
        candidate, up to float rounding (tests/train/test_speed_equivalence.py)."""
        first, (layers, (w_out, b_out)) = frozen(self, self._serving_constants)
        C, (L, D), H = query.shape[0], keys.shape, first.bias.shape[0]  # shape, not len():
        # a symbolic size stays symbolic (the fake-device test's data-dependent splits)
        rhs = keys.new_empty(D + 1, L, H)  # [M; row], each part written once, in place
        torch.addcmul(first.candidate.unsqueeze(1), keys.T.unsqueeze(-1),
                      first.product.unsqueeze(1), out=rhs[:D])  # M (D, L, H)
        torch.addmm(first.bias, keys, first.key, out=rhs[D])  # row (L, H)
        lhs = torch.cat([query, query.new_ones(C, 1)], dim=1)  # (C, D + 1)
        h = (lhs @ rhs.view(D + 1, L * H)).view(C * L, H)  # (C·L, H)
        h = _activate_inplace(first.act, h)
        for w, b, act in layers:
            h = _activate_inplace(act, torch.addmm(b, h, w))
        scores = torch.addmm(b_out, h, w_out).view(C, L)
        weights = self._weights(scores, mask.expand(C, -1))  # (C, L)
        return weights @ keys, weights  # (C, D), (C, L)

    def _serving_constants(self) -> tuple[_FirstLayer, tuple[list[Layer], tuple[Tensor, Tensor]]]:
        """`_one_history`'s weights: the first layer regrouped (`_FirstLayer`), the rest as an MLP
        stack (`_stack_constants`)."""
        w_e, w_v, w_d, w_p = self.first.weight.detach().split(self.dim, dim=1)  # each (H, D)
        first = _FirstLayer(key=(w_e + w_d).T.contiguous(), candidate=(w_v - w_d).T.contiguous(),
                            product=w_p.T.contiguous(), bias=self.first.bias.detach(),
                            act=_activation_constants(self.first_act))
        return first, _stack_constants(self.rest)

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


# --- pooling ------------------------------------------------------------------------------------
def pool_history(keys: Tensor, mask: Tensor, mode: str = "sum") -> Tensor:
    """Candidate-blind pooling of a padded history (BaseModel, §4.2): the sum (paper) or the mean
    of the real behaviours; padded slots count for nothing, an empty history pools to zero.

    Args:
        keys: (B, L, D) behaviour vectors.
        mask: (B, L) bool, True where a slot holds a behaviour.
        mode: "sum" or "mean".
    Returns: (B, D).
    Example:
        >>> keys = torch.ones(1, 3, 2); mask = torch.tensor([[True, True, False]])
        >>> pool_history(keys, mask, "mean")
        tensor([[1., 1.]])
    """
    total = (keys * mask.unsqueeze(-1)).sum(1)  # (B, D)
    if mode == "mean":
        total = total / mask.sum(1, keepdim=True).clamp(min=1)
    return total
