"""The speed work must not change the maths: each optimised block against a plain reference.

References are written the slow, obvious way (the paper's concatenated attention input over every
history slot, Dice from its formula with masked statistics, PReLU as a select) and compared on
values and on gradients of every input and parameter, in training mode (batch statistics) and in
evaluation mode (moving averages).
"""

from __future__ import annotations

import copy

import pytest
import torch

from din_ray.embeddings.tables import EmbeddingTables, TableSpec, gather_rows, unique_ids
from din_ray.model.layers import (
    MLP,
    Dice,
    PReLU,
    TargetAttention,
    _activate_inplace,
    _activation_constants,
)
from din_ray.schema import PAD_ID

TOL = {"rtol": 1e-5, "atol": 1e-6}


def ref_activation(act: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None):
    """Eq. (8) / Eq. (9) written out; Dice's statistics over the rows where `mask` is True."""
    if isinstance(act, PReLU):
        return torch.where(x > 0, x, act.alpha * x)
    assert isinstance(act, Dice)
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    if act.training and rows.shape[0] > 1:  # one row has no variance: moving averages instead
        mean, var = rows.mean(0), rows.var(0, unbiased=False)
        with torch.no_grad():  # the plain average over the first 1/momentum batches, then EMA
            act.num_batches_tracked += 1
            weight = max(act.momentum, 1 / int(act.num_batches_tracked))
            act.running_mean.lerp_(mean, weight)
            act.running_var.lerp_(var, weight)
    else:
        mean, var = act.running_mean, act.running_var
    p = torch.sigmoid((x - mean) / torch.sqrt(var + act.eps))
    return p * x + (1 - p) * act.alpha * x


def ref_attention(att: TargetAttention, query, keys, mask):
    """The local activation unit over all B·L slots with the paper's input [e, v, e−v, e⊙v]."""
    v = query.unsqueeze(1).expand_as(keys)  # (B, L, D)
    h = ref_activation(att.first_act, att.first(torch.cat([keys, v, keys - v, keys * v], -1)),
                       mask)  # (B, L, H)
    for linear, act in zip(att.rest.linears, att.rest.acts):
        h = ref_activation(act, linear(h), mask)
    scores = att.rest.out(h).squeeze(-1)  # (B, L)
    if att.softmax:
        weights = torch.nan_to_num(torch.softmax(scores.masked_fill(~mask, float("-inf")), 1))
    else:
        weights = scores * mask
    return (weights.unsqueeze(-1) * keys).sum(1), weights


def padded_inputs(B: int = 6, L: int = 7, D: int = 8, seed: int = 0):
    """Random query/keys with histories of lengths 0..L (one empty, one full)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, L, 1, 3, L - 1, 2])[:B]
    mask = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)
    query = torch.randn(B, D, generator=g)
    keys = torch.randn(B, L, D, generator=g) * mask.unsqueeze(-1)  # padded slots embed to 0
    return query, keys, mask


def grads(outputs, tensors):
    weights = torch.linspace(-1, 1, outputs[0].numel()).reshape(outputs[0].shape)
    loss = (outputs[0] * weights).sum() + (outputs[1] ** 2).sum()
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("activation", ["dice", "prelu"])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_packed_attention_equals_reference(activation, softmax, training):
    torch.manual_seed(3)
    att = TargetAttention(dim=8, hidden=(10, 5), activation=activation, softmax=softmax)
    for m in att.modules():  # non-trivial slopes and moving averages
        if isinstance(m, (Dice, PReLU)):
            m.alpha.data.uniform_(-0.5, 0.5)
        if isinstance(m, Dice):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    att.train(training)
    ref = copy.deepcopy(att)
    query, keys, mask = padded_inputs()
    query.requires_grad_(True)
    keys.requires_grad_(True)

    got = att(query, keys, mask)
    want = ref_attention(ref, query, keys, mask)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)

    g_got = grads(got, [query, keys, *att.parameters()])
    g_want = grads(want, [query, keys, *ref.parameters()])
    for name, a, b in zip(["query", "keys", *dict(att.named_parameters())], g_got, g_want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
    for (name, a), b in zip(att.named_buffers(), ref.buffers()):  # Dice moving averages
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"buffer {n}: {m}")


def test_packed_attention_gives_zero_weight_and_gradient_to_padding():
    att = TargetAttention(dim=8, hidden=(10, 5), activation="dice")
    query, keys, mask = padded_inputs()
    keys.requires_grad_(True)
    pooled, weights = att(query, keys, mask)
    assert (weights[~mask] == 0).all()
    (g,) = torch.autograd.grad(pooled.sum() + weights.sum(), keys)
    assert (g[~mask] == 0).all()
    assert (g[mask] != 0).any()


@pytest.mark.parametrize("shape", [(50, 6), (4, 9, 6), (1, 6)])
def test_dice_fused_statistics_equal_formula(shape):
    torch.manual_seed(4)
    dice = Dice(6)
    dice.alpha.data.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(dice)
    x = (torch.randn(*shape) * 3 + 1).requires_grad_(True)
    got, want = dice(x), ref_activation(ref, x, None)
    torch.testing.assert_close(got, want, **TOL)
    upstream = torch.randn(shape)
    for a, b in zip(torch.autograd.grad(got, [x, dice.alpha], upstream),
                    torch.autograd.grad(want, [x, ref.alpha], upstream)):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(dice.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(dice.running_var, ref.running_var, **TOL)


def test_prelu_fused_equals_select():
    torch.manual_seed(5)
    prelu = PReLU(6)
    prelu.alpha.data.uniform_(-1, 1)
    x = torch.randn(3, 4, 6, requires_grad=True)
    got, want = prelu(x), ref_activation(prelu, x, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    upstream = torch.randn(3, 4, 6)
    for a, b in zip(torch.autograd.grad(got, [x, prelu.alpha], upstream),
                    torch.autograd.grad(want, [x, prelu.alpha], upstream)):
        torch.testing.assert_close(a, b, **TOL)


def test_mlp_with_fused_activations_equals_reference():
    torch.manual_seed(6)
    mlp = MLP(12, (9, 7), "dice")
    ref = copy.deepcopy(mlp)
    x = torch.randn(20, 12, requires_grad=True)
    got = mlp(x)
    h = x
    for linear, act in zip(ref.linears, ref.acts):
        h = ref_activation(act, linear(h), None)
    want = ref.out(h)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(torch.autograd.grad(got.sum(), [x, *mlp.parameters()]),
                    torch.autograd.grad(want.sum(), [x, *ref.parameters()])):
        torch.testing.assert_close(a, b, **TOL)


def ref_mlp(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """The MLP through its Linear modules and the activations' formulas."""
    h = x
    for linear, act in zip(mlp.linears, mlp.acts):
        h = ref_activation(act, linear(h), None)
    return mlp.out(h)


def trained_looking(module: torch.nn.Module, mean: float = 0.5) -> torch.nn.Module:
    """Non-trivial slopes and moving averages in every activation of `module` (Dice's running
    means drawn from [-mean, mean])."""
    for m in module.modules():
        if isinstance(m, (Dice, PReLU)):
            m.alpha.data.uniform_(-0.5, 0.5)
        if isinstance(m, Dice):
            m.running_mean.uniform_(-mean, mean)
            m.running_var.uniform_(0.5, 2.0)
    return module


@pytest.mark.parametrize("activation", ["dice", "prelu"])
@pytest.mark.parametrize("shape", [(20, 12), (3, 5, 12), (0, 12)])
def test_mlp_evaluation_without_autograd_equals_reference(activation, shape):
    """`MLP._evaluate` (addmm on weights transposed once, activations in place) against the
    Linear modules and the formulas, for a batch, a (B, L, ·) input and an empty one."""
    torch.manual_seed(7)
    mlp = trained_looking(MLP(12, (9, 7), activation)).eval()
    x = torch.randn(shape)
    with torch.inference_mode():
        got = mlp(x)
    with torch.enable_grad():
        want = ref_mlp(mlp, x).detach()
    assert got.shape == (*shape[:-1], 1)
    torch.testing.assert_close(got, want, **TOL)


def test_evaluation_constants_follow_the_weights():
    """The constants `frozen` keeps are rebuilt whenever the weights they come from change: an
    optimizer step, load_state_dict, Dice's moving averages updated by a training pass, a layer
    or a parameter replaced, a dtype change; the attention unit's as well as the MLP's."""
    torch.manual_seed(8)
    mlp = trained_looking(MLP(6, (5, 3), "dice")).eval()
    att = trained_looking(TargetAttention(dim=4, hidden=(6, 3), activation="dice")).eval()
    x, (query, keys, mask) = torch.randn(4, 6), padded_inputs(B=2, L=5, D=4, seed=1)
    keys, mask = keys[1], mask[1]  # one full history

    def check():
        with torch.inference_mode():
            got, got_pooled = mlp(x), att.shared(query, keys[None], mask[None],
                                                  torch.zeros(2, dtype=torch.long))[0]
        with torch.enable_grad():
            want = ref_mlp(mlp, x).detach()
            want_pooled = ref_attention(att, query, keys.expand(2, -1, -1),
                                        mask.expand(2, -1))[0].detach()
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(got_pooled, want_pooled, **TOL)

    check()
    params = [*mlp.parameters(), *att.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5)
    (mlp(x).sum() + att(query, keys.expand(2, -1, -1), mask.expand(2, -1))[0].sum()).backward()
    optimizer.step()
    check()
    mlp.load_state_dict(trained_looking(MLP(6, (5, 3), "dice")).state_dict())
    att.load_state_dict(trained_looking(TargetAttention(4, (6, 3), "dice")).state_dict())
    check()
    mlp.train(), att.train()
    mlp(x), att(query, keys.expand(2, -1, -1), mask.expand(2, -1))  # moving averages move
    mlp.eval(), att.eval()
    check()
    mlp.out = torch.nn.Linear(3, 1)
    att.first.weight = torch.nn.Parameter(torch.randn(6, 16))
    check()
    mlp.double(), att.double()
    x, query, keys = x.double(), query.double(), keys.double()
    check()


def ref_lookup(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return weight[ids]


@pytest.mark.parametrize("rows", [40, 5000])  # few ids per row, and many more rows than ids
def test_lookup_dedup_matches_plain_indexing_and_gradients(rows):
    g = torch.Generator().manual_seed(7)
    tables = EmbeddingTables({"t": TableSpec("t", rows, 4)}, seed=1).train()
    hist = torch.randint(0, rows, (8, 5), generator=g)
    hist[:, 3:] = PAD_ID
    cand = torch.randint(2, rows, (8,), generator=g)
    out = tables.lookup({"hist": ("t", hist), "cand": ("t", cand)})
    w = tables.weight("t")
    torch.testing.assert_close(out["hist"], ref_lookup(w, hist), rtol=0, atol=0)
    torch.testing.assert_close(out["cand"], ref_lookup(w, cand), rtol=0, atol=0)
    (out["hist"].sum(1) * 2 + out["cand"] * 3).sum().backward()
    ids, grad = tables.touched_gradients()["t"]
    dense = torch.zeros(rows, 4)
    dense.index_add_(0, hist.reshape(-1), torch.full((hist.numel(), 4), 2.0))
    dense.index_add_(0, cand, torch.full((8, 4), 3.0))
    dense[PAD_ID] = 0
    expected_ids = torch.unique(torch.cat([hist.reshape(-1), cand]))
    expected_ids = expected_ids[expected_ids != PAD_ID]
    torch.testing.assert_close(ids, expected_ids, rtol=0, atol=0)
    torch.testing.assert_close(grad, dense[expected_ids], rtol=0, atol=0)


def test_gather_rows_equals_index_select_with_repeated_indices():
    torch.manual_seed(8)
    src = torch.randn(6, 3, 2, requires_grad=True)
    index = torch.tensor([5, 0, 0, 2, 5, 5, 1])
    got = gather_rows(src, index)
    want = src.index_select(0, index)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    upstream = torch.randn(7, 3, 2)
    (g_got,) = torch.autograd.grad(got, src, upstream)
    (g_want,) = torch.autograd.grad(want, src, upstream)
    torch.testing.assert_close(g_got, g_want, **TOL)
    assert (g_got[[3, 4]] == 0).all()  # rows never gathered get no gradient


@pytest.mark.parametrize("rows", [3, 50, 10_000])  # bitmap (few rows per id) and sort paths
def test_unique_ids_equals_torch_unique(rows):
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, rows, (200,), generator=g)
    ids[:50] = PAD_ID
    unique, inverse = unique_ids(ids, rows)
    want_unique, want_inverse = torch.unique(ids, return_inverse=True)
    assert torch.equal(unique, want_unique)
    assert torch.equal(inverse, want_inverse)
    assert torch.equal(unique_ids(ids[:0], rows)[0], ids[:0])


@pytest.mark.parametrize("grad", [True, False])  # autograd form, and the in-place one without
def test_dice_folded_evaluation_equals_formula(grad):
    torch.manual_seed(10)
    dice = Dice(6).eval()
    dice.alpha.data.uniform_(-0.5, 0.5)
    dice.running_mean.uniform_(-1, 1)
    dice.running_var.uniform_(0.2, 3.0)
    x = (torch.randn(5, 7, 6) * 2).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        got, want = dice(x), ref_activation(dice, x, None)
    torch.testing.assert_close(got, want, **TOL)
    if grad:
        upstream = torch.randn(5, 7, 6)
        for a, b in zip(torch.autograd.grad(got, [x, dice.alpha], upstream),
                        torch.autograd.grad(want, [x, dice.alpha], upstream)):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("users,order", [(1, "grouped"), (3, "grouped"), (3, "mixed")])
@pytest.mark.parametrize("grad", [True, False])
def test_shared_attention_equals_reference_on_the_repeated_batch(users, order, grad):
    torch.manual_seed(11)
    att = TargetAttention(dim=8, hidden=(10, 5), activation="dice").eval()
    for m in att.modules():
        if isinstance(m, Dice):
            m.alpha.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    _, keys, mask = padded_inputs(B=6)
    keys, mask = keys[1:1 + users].clone(), mask[1:1 + users]  # non-empty histories
    owner = torch.arange(users).repeat_interleave(4)  # 4 candidates per user, consecutive
    if order == "mixed":  # the gathered path: candidates of several users interleaved
        owner = owner[torch.randperm(len(owner))]
    query = torch.randn(len(owner), 8)
    query.requires_grad_(grad)
    keys.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        got = att.shared(query, keys, mask, owner)
        want = ref_attention(att, query, keys[owner], mask[owner])
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    if grad:
        for a, b in zip(grads(got, [query, keys, *att.parameters()]),
                        grads(want, [query, keys, *att.parameters()])):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("activation", ["dice", "prelu"])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("users", [1, 3])
def test_fused_one_history_attention_equals_reference(activation, softmax, users):
    """Serving's fused path (`_one_history`: the first layer with its bias through a column of
    ones, activations in place, the pooling as one matmul) against the paper's form, per
    activation and normalisation, for one history and a batch of several; an empty history
    gets zero weights."""
    torch.manual_seed(5)
    att = trained_looking(TargetAttention(dim=8, hidden=(10, 6, 5), activation=activation,
                                          softmax=softmax).eval(), mean=0.2)
    _, keys, mask = padded_inputs(B=6)
    keys, mask = keys[:users].clone(), mask[:users]  # row 0 is the empty history
    owner = torch.arange(users).repeat_interleave(torch.tensor([4, 1, 3][:users]))
    query = torch.randn(len(owner), 8)
    with torch.inference_mode():
        got = att.shared(query, keys, mask, owner)
        want = ref_attention(att, query, keys[owner], mask[owner])
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    assert bool((got[1][~mask[owner]] == 0).all())


def test_fused_path_is_only_taken_without_autograd():
    """With autograd on, `shared` keeps the differentiable form (its gradients are tested in
    test_shared_attention_equals_reference_on_the_repeated_batch); the in-place activations
    would break the graph."""
    att = TargetAttention(dim=8, hidden=(10, 5), activation="dice").eval()
    _, keys, mask = padded_inputs(B=6)
    query = torch.randn(4, 8, requires_grad=True)
    pooled, _ = att.shared(query, keys[1:2], mask[1:2], torch.zeros(4, dtype=torch.long))
    assert pooled.requires_grad
    pooled.sum().backward()
    assert query.grad is not None and bool(query.grad.abs().sum() > 0)


@pytest.mark.parametrize("activation", ["dice", "prelu"])
def test_activate_inplace_equals_formula(activation):
    torch.manual_seed(2)
    act = (Dice(6) if activation == "dice" else PReLU(6)).eval()
    act.alpha.data.uniform_(-0.5, 0.5)
    if isinstance(act, Dice):
        act.running_mean.uniform_(-0.5, 0.5)
        act.running_var.uniform_(0.5, 2.0)
    x = torch.randn(40, 6)
    want = ref_activation(act, x, None)
    with torch.inference_mode():
        got = _activate_inplace(_activation_constants(act), x.clone())
    torch.testing.assert_close(got, want, **TOL)
