"""DIN, BaseModel and their layers on hand-built padded batches."""

import pytest
import torch
from builders import tiny_schema

from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import DIN, BaseModel, ModelConfig, build_model, model_names
from din_ray.model.layers import Dice, PReLU, TargetAttention
from din_ray.schema import PAD_ID

# Two users, history length 4: user 0 has 3 behaviours, user 1 has 1 (PAD = 0 after them).
HIST_ITEM = torch.tensor([[5, 7, 9, PAD_ID], [4, PAD_ID, PAD_ID, PAD_ID]])
HIST_CATE = torch.tensor([[2, 3, 3, PAD_ID], [5, PAD_ID, PAD_ID, PAD_ID]])


def padded_batch() -> dict[str, torch.Tensor]:
    return {"item_id": torch.tensor([7, 11]), "cate_id": torch.tensor([3, 4]),
            "hist_item_id": HIST_ITEM.clone(), "hist_cate_id": HIST_CATE.clone(),
            "label": torch.tensor([1.0, 0.0]), "user": torch.tensor([0, 1])}


def build(model: str, activation: str = "prelu", **kw):
    torch.manual_seed(0)
    schema = tiny_schema(items=16, cates=6, max_len=4, dim=3)
    m = build_model(schema, ModelConfig(model=model, activation=activation, **kw))
    tables = EmbeddingTables(m.table_specs(), init_std=0.5)
    return m.eval(), tables.eval()


def run(m, tables, batch):
    return m(tables.lookup(m.sparse_inputs(batch)), batch)


@pytest.mark.parametrize("model", ["din", "base"])
@pytest.mark.parametrize("activation", ["dice", "prelu"])
def test_output_shape_and_padding_invariance(model, activation):
    m, tables = build(model, activation)
    batch = padded_batch()
    logits = run(m, tables, batch)
    assert logits.shape == (2,)
    assert torch.isfinite(logits).all()
    # Changing what sits in padded slots of the other behaviour fields must not change the output
    # (the mask comes from the first behaviour feature, which keeps PAD there).
    other = padded_batch()
    other["hist_cate_id"][HIST_ITEM == PAD_ID] = 4
    torch.testing.assert_close(run(m, tables, other), logits)


def test_padding_gets_zero_attention_weight_and_candidate_matters():
    m, tables = build("din")
    batch = padded_batch()
    emb = tables.lookup(m.sparse_inputs(batch))
    _, weights = m.user_interest(emb, batch)
    assert weights.shape == (2, 4)
    assert (weights[HIST_ITEM == PAD_ID] == 0).all()
    assert (weights[HIST_ITEM != PAD_ID] != 0).all()
    # The local activation: a different candidate gives different weights for the same history.
    swapped = padded_batch()
    swapped["item_id"] = torch.tensor([9, 4])
    swapped["cate_id"] = torch.tensor([2, 5])
    _, weights2 = m.user_interest(tables.lookup(m.sparse_inputs(swapped)), swapped)
    assert not torch.allclose(weights, weights2)


def test_attention_decomposed_first_layer_equals_concatenated_input():
    torch.manual_seed(1)
    att = TargetAttention(dim=6, hidden=(8, 4), activation="prelu").eval()
    q, k = torch.randn(3, 6), torch.randn(3, 5, 6)
    mask = torch.ones(3, 5, dtype=torch.bool)
    # Reference: the paper's form, MLP over [e, v, e - v, e * v].
    v = q.unsqueeze(1).expand_as(k)
    h = att.first_act(att.first(torch.cat([k, v, k - v, k * v], dim=-1)))
    expected = att.rest(h).squeeze(-1)
    torch.testing.assert_close(att.scores(q, k, mask), expected, rtol=1e-5, atol=1e-5)


def test_softmax_option_normalises_over_real_behaviours():
    torch.manual_seed(2)
    att = TargetAttention(dim=4, hidden=(8,), activation="prelu", softmax=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    pooled, w = att(torch.randn(2, 4), torch.randn(2, 3, 4), mask)
    torch.testing.assert_close(w[0].sum(), torch.tensor(1.0))
    assert w[0, 2] == 0 and (w[1] == 0).all() and (pooled[1] == 0).all()


def test_base_model_sum_and_mean_pooling():
    m, tables = build("base", pooling="sum")
    batch = padded_batch()
    emb = tables.lookup(m.sparse_inputs(batch))
    pooled, weights = m.user_interest(emb, batch)
    keys = torch.cat([emb["hist_item_id"], emb["hist_cate_id"]], -1)
    torch.testing.assert_close(pooled, keys.sum(1))  # PAD rows are zero vectors
    assert weights is None
    m2, _ = build("base", pooling="mean")
    pooled_mean, _ = m2.user_interest(emb, batch)
    torch.testing.assert_close(pooled_mean[0], keys[0, :3].mean(0))
    torch.testing.assert_close(pooled_mean[1], keys[1, 0])


def test_dice_train_uses_batch_statistics_and_eval_moving_averages():
    torch.manual_seed(3)
    dice = Dice(4)
    dice.alpha.data.fill_(0.3)
    x = torch.randn(64, 4) * 3 + 5
    dice.train()
    y = dice(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + 1e-8))
    torch.testing.assert_close(y, p * x + (1 - p) * 0.3 * x)
    # After one batch the running statistics are that batch's: evaluating it reproduces training.
    torch.testing.assert_close(dice.running_mean, mean)
    torch.testing.assert_close(dice.running_var, var)
    dice.eval()
    torch.testing.assert_close(dice(x), y)
    # Evaluation normalises with the running statistics, not with the batch's own.
    x2 = torch.randn(64, 4)
    p_eval = torch.sigmoid((x2 - mean) / torch.sqrt(var + 1e-8))
    torch.testing.assert_close(dice(x2), p_eval * x2 + (1 - p_eval) * 0.3 * x2)


@pytest.mark.parametrize("masked", [False, True])
def test_dice_running_statistics_hold_no_share_of_the_start_values(masked):
    """The first 1/momentum updates average the batch statistics (no share of the start values
    mean 0 / var 1 remains), later ones are a moving average with weight `momentum`."""
    torch.manual_seed(6)
    dice = Dice(3, momentum=0.25).train()
    means, variances = [], []
    for step in range(6):
        x = torch.randn(2, 8, 3) * (step + 2) + 10 * step  # (B, L, C), far from mean 0 / var 1
        mask = torch.rand(2, 8) < 0.7 if masked else None
        rows = x[mask] if masked else x.reshape(-1, 3)
        means.append(rows.mean(0))
        variances.append(rows.var(0, unbiased=False))
        dice(x, mask)
        if step == 3:  # 1/momentum = 4 updates: the plain average of the four batches
            torch.testing.assert_close(dice.running_mean, torch.stack(means).mean(0))
            torch.testing.assert_close(dice.running_var, torch.stack(variances).mean(0))
    expect_mean, expect_var = torch.stack(means[:4]).mean(0), torch.stack(variances[:4]).mean(0)
    for mean, var in zip(means[4:], variances[4:]):
        expect_mean, expect_var = 0.75 * expect_mean + 0.25 * mean, 0.75 * expect_var + 0.25 * var
    torch.testing.assert_close(dice.running_mean, expect_mean)
    torch.testing.assert_close(dice.running_var, expect_var)
    assert int(dice.num_batches_tracked) == 6


def test_dice_loads_state_saved_without_the_batch_counter():
    old = {"alpha": torch.zeros(2), "running_mean": torch.ones(2), "running_var": torch.ones(2)}
    dice = Dice(2)
    dice.load_state_dict(old)
    assert int(dice.num_batches_tracked) == 0
    torch.testing.assert_close(dice.running_mean, torch.ones(2))


def test_dice_with_zero_mean_unit_variance_equals_formula():
    dice = Dice(2)
    dice.alpha.data = torch.tensor([0.1, -0.2])
    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # per channel: mean 0, variance 1
    dice.train()
    s = x / torch.sqrt(torch.tensor(1.0 + 1e-8))
    p = 1 / (1 + torch.exp(-s))
    torch.testing.assert_close(dice(x), p * x + (1 - p) * dice.alpha * x)


def test_dice_masked_rows_do_not_affect_statistics():
    dice = Dice(3).train()
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    y = dice(x, mask)
    x2 = x.clone()
    x2[~mask] = 1000.0
    torch.testing.assert_close(dice.train()(x2, mask)[mask], y[mask])


def test_prelu_channels_are_last_dimension():
    act = PReLU(3, init=0.5)
    x = -torch.ones(2, 4, 3)
    torch.testing.assert_close(act(x), -0.5 * torch.ones(2, 4, 3))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="relu")
    with pytest.raises(ValueError, match="model must be one of"):
        build_model(tiny_schema(), ModelConfig(model="nope"))
    assert isinstance(build_model(tiny_schema(), ModelConfig(model="din")), DIN)
    assert isinstance(build_model(tiny_schema(), ModelConfig(model="base")), BaseModel)


def test_model_config_knobs_reach_the_layers():
    """dice_momentum, attention_activation and zero_logit are honoured by DIN, not just
    recorded: each of them changes the built modules."""
    m, _ = build("din", "dice", dice_momentum=0.1, attention_activation="prelu")
    dices = [mod for mod in m.modules() if isinstance(mod, Dice)]
    assert dices and all(d.momentum == 0.1 for d in dices)
    assert not any(isinstance(mod, Dice) for mod in m.attention.modules())
    assert any(isinstance(mod, PReLU) for mod in m.attention.modules())
    assert m.mlp.out.weight.abs().sum() > 0
    zero, _ = build("din", "dice", zero_logit=True)
    assert zero.mlp.out.weight.abs().sum() == 0
    with pytest.raises(ValueError, match="dice_momentum"):
        ModelConfig(dice_momentum=0.0)
    with pytest.raises(ValueError, match="attention_activation"):
        ModelConfig(attention_activation="relu")


def test_checkpoints_saved_before_attention_activation_rebuild_as_trained():
    """A config without the field (saved before it existed) had Dice in the attention unit when
    `activation` was Dice; a new config puts PReLU there."""
    assert ModelConfig.from_dict({"activation": "dice"}).attention_activation == "dice"
    assert ModelConfig.from_dict({"activation": "dice"}).dice_momentum == 0.01
    assert ModelConfig(activation="dice").attention_activation == "prelu"
    assert ModelConfig(activation="prelu", attention_activation="").attention_activation == "prelu"


# --- capabilities: the shared-user-side fast path ---------------------------------------------
class ScaledDIN(DIN):
    """A DIN whose own pooling doubles the interest: redefines `pool` but not `pool_shared`."""

    def pool(self, query, keys, mask):
        pooled, weights = super().pool(query, keys, mask)
        return 2 * pooled, weights


class ShiftedInterestDIN(DIN):
    """A DIN that changes the interest in `user_interest`, a step the fast path replaces."""

    def user_interest(self, emb, batch):
        pooled, weights = super().user_interest(emb, batch)
        return pooled + 1.0, weights


class DeclaredScaledDIN(ScaledDIN):
    """Redefines both steps and declares the fast path again: it keeps it."""

    shares_user_side = True

    def pool_shared(self, query, keys, mask, owner):
        pooled, weights = self.attention.shared(query, keys, mask, owner)
        return 2 * pooled, weights


def fast_path_check(model) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(score_candidates over 2 users x 3 candidates, forward on the repeated batch), or None
    when the model declares no fast path (serving then runs `forward` itself)."""
    if not model.shares_user_side:
        return None
    torch.manual_seed(1)
    model.eval()
    tables = EmbeddingTables(model.table_specs(), init_std=0.5).eval()
    for p in model.parameters():  # trained-looking weights: the zero logit layer included
        torch.nn.init.normal_(p, std=0.5)
    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    users = {"hist_item_id": HIST_ITEM, "hist_cate_id": HIST_CATE}
    ads = {"item_id": torch.tensor([7, 11, 3, 5, 9, 2]),
           "cate_id": torch.tensor([3, 4, 2, 5, 3, 1])}
    shared = {**users, **ads}
    repeated = {**{k: v[owner] for k, v in users.items()}, **ads}
    with torch.no_grad():
        fast, _ = model.score_candidates(tables.lookup(model.sparse_inputs(shared)), shared, owner)
        full = model(tables.lookup(model.sparse_inputs(repeated)), repeated)
    return fast, full


@pytest.mark.parametrize("cls", [ScaledDIN, ShiftedInterestDIN])
def test_a_subclass_that_redefines_a_step_of_forward_has_no_inherited_fast_path(cls):
    """DIN's fast path pools through `pool_shared`, not `pool` or `user_interest`: a subclass
    that redefines either alone would be served scores its own `forward` never gives."""
    model = cls(tiny_schema(items=16, cates=6, max_len=4, dim=3),
                ModelConfig(attention_hidden=(8, 4), mlp_hidden=(8, 4)))
    assert not model.shares_user_side
    with pytest.raises(NotImplementedError, match=cls.__name__):
        model.score_candidates({}, {}, torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("cls", [DIN, BaseModel, DeclaredScaledDIN])
def test_a_declared_fast_path_equals_forward_on_the_repeated_batch(cls):
    model = cls(tiny_schema(items=16, cates=6, max_len=4, dim=3),
                ModelConfig(model="base" if cls is BaseModel else "din",
                            attention_hidden=(8, 4), mlp_hidden=(8, 4)))
    assert model.shares_user_side
    fast, full = fast_path_check(model)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_either_has_no_fast_path_or_one_that_equals_forward(name):
    model = build_model(tiny_schema(items=16, cates=6, max_len=4, dim=3),
                        ModelConfig(model=name, attention_hidden=(8, 4), mlp_hidden=(8, 4)))
    check = fast_path_check(model)
    if check is not None:
        torch.testing.assert_close(*check, rtol=1e-5, atol=1e-5)
