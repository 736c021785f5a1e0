"""The paper's competitors on a hand-built padded batch: shape, PAD invariance, gradients."""

import pytest
import torch
from builders import tiny_schema

from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import ModelConfig, build_model, model_names
from din_ray.model.baselines import CROSS_ROWS, WideDeep
from din_ray.model.layers import MLP
from din_ray.schema import PAD_ID

MODELS = ("lr", "base", "wide_deep", "pnn", "deepfm", "din")


def batch(pad: int = 0, garbage_cates: bool = False) -> dict[str, torch.Tensor]:
    """Three samples: a 3-behaviour history, a 1-behaviour history and an empty one; `pad` more
    PAD slots appended; `garbage_cates` writes categories into slots whose item is PAD."""
    hist_item = torch.tensor([[3, 6, 9, 0], [7, 0, 0, 0], [0, 0, 0, 0]])
    hist_cate = torch.tensor([[2, 5, 2, 0], [3, 0, 0, 0], [0, 0, 0, 0]])
    if garbage_cates:
        hist_cate = torch.where(hist_item == PAD_ID, torch.full_like(hist_cate, 4), hist_cate)
    if pad:
        hist_item = torch.cat([hist_item, torch.zeros(3, pad, dtype=torch.long)], dim=1)
        hist_cate = torch.cat([hist_cate, torch.zeros(3, pad, dtype=torch.long)], dim=1)
    return {"item_id": torch.tensor([3, 4, 5]), "cate_id": torch.tensor([2, 3, 4]),
            "hist_item_id": hist_item, "hist_cate_id": hist_cate,
            "label": torch.tensor([1.0, 0.0, 1.0]), "user": torch.tensor([0, 1, 2])}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    schema = tiny_schema(max_len=4)
    model = build_model(schema, ModelConfig(model=name, activation="prelu",
                                            attention_hidden=(8, 4), mlp_hidden=(8, 4)))
    # A larger init so every term visibly contributes to the logit.
    tables = EmbeddingTables(model.table_specs(), seed=seed, init_std=0.5)
    # DIN-family output layers start at zero (the logit starts as the ad bias), which blocks every
    # gradient below them at step 0; these structural checks want a model past its first step.
    for module in model.modules():
        if isinstance(module, MLP):
            torch.nn.init.normal_(module.out.weight, std=0.5)
    return model, tables


def logits(model, tables, b):
    return model(tables.lookup(model.sparse_inputs(b)), b)


@pytest.mark.parametrize("name", model_names())
def test_every_mlp_logit_layer_starts_at_zero(name):
    """With `zero_logit` the logit starts as the ad bias alone in every model with an MLP (PNN
    rebuilds its MLP for the wider product-layer input, which once lost the zero start)."""
    schema = tiny_schema(max_len=4)
    model = build_model(schema, ModelConfig(model=name, mlp_hidden=(8, 4), zero_logit=True))
    if not hasattr(model, "mlp"):
        pytest.skip(f"{name} has no MLP")
    assert (model.mlp.out.weight == 0).all() and (model.mlp.out.bias == 0).all()


def test_every_competitor_is_selectable_by_name():
    assert set(MODELS) <= set(model_names())


@pytest.mark.parametrize("name", MODELS)
def test_output_is_one_logit_per_sample(name):
    model, tables = make(name)
    out = logits(model.eval(), tables.eval(), batch())
    assert out.shape == (3,)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_padding_does_not_change_the_output(name):
    model, tables = make(name)
    model.eval()
    tables.eval()
    with torch.no_grad():
        ref = logits(model, tables, batch())
        # Longer padding (the schema length is irrelevant to the model) ...
        longer = logits(model, tables, batch(pad=3))
        # ... and values in slots that the item history marks as padding are ignored.
        garbage = logits(model, tables, batch(garbage_cates=True))
    torch.testing.assert_close(longer, ref)
    torch.testing.assert_close(garbage, ref)


@pytest.mark.parametrize("name", MODELS)
def test_the_history_matters(name):
    model, tables = make(name)
    model.eval()
    tables.eval()
    b = batch()
    other = dict(b, hist_item_id=b["hist_item_id"].clone())
    other["hist_item_id"][0, 0] = 11
    with torch.no_grad():
        a, c = logits(model, tables, b), logits(model, tables, other)
    assert a[0] != c[0]
    torch.testing.assert_close(a[1:], c[1:])


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_table_and_dense_parameter(name):
    model, tables = make(name)
    model.train()
    tables.train()
    b = batch()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(model, tables, b),
                                                                b["label"])
    loss.backward()
    grads = tables.touched_gradients()
    assert set(grads) == set(model.table_specs())
    for table, (ids, g) in grads.items():
        assert PAD_ID not in ids.tolist(), table
        assert torch.isfinite(g).all() and g.abs().sum() > 0, table
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    # Every parameter gets a gradient (Dice/PReLU slopes may legitimately be zero for a batch).
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert sum(float(p.grad.abs().sum()) for p in params) > 0


def test_lr_is_linear_in_the_ids():
    model, tables = make("lr")
    b = batch()
    with torch.no_grad():
        out = logits(model, tables, b)
        w = {t: tables.weight(t).squeeze(-1) for t in model.table_specs()}
    expected = (model.bias + w["item_id.w_item_id"][b["item_id"]]
                + w["cate_id.w_cate_id"][b["cate_id"]]
                + w["item_id.w_hist_item_id"][b["hist_item_id"]].sum(1)
                + w["cate_id.w_hist_cate_id"][b["hist_cate_id"]].sum(1))
    torch.testing.assert_close(out, expected)


def test_wide_deep_crosses_are_pad_aware_and_in_range():
    model, _ = make("wide_deep")
    assert isinstance(model, WideDeep)
    b = batch()
    ids = model.cross_ids(b["hist_item_id"], b["item_id"], 30)  # (3, 4)
    assert ids.shape == (3, 4)
    assert torch.equal(ids == PAD_ID, b["hist_item_id"] == PAD_ID)
    assert int(ids.max()) < CROSS_ROWS and int(ids[ids != PAD_ID].min()) >= 2
    # The same behaviour crossed with two different candidates lands in different buckets.
    a = model.cross_ids(torch.tensor([[3]]), torch.tensor([4]), 30)
    c = model.cross_ids(torch.tensor([[3]]), torch.tensor([5]), 30)
    assert a.item() != c.item()


def test_deepfm_pairwise_term_equals_the_explicit_sum():
    model, tables = make("deepfm")
    b = batch()
    with torch.no_grad():
        emb = tables.lookup(model.sparse_inputs(b))
        fields = model.fields(emb, b)  # (B, F, d)
        explicit = sum((fields[:, i] * fields[:, k]).sum(-1)
                       for i in range(fields.shape[1]) for k in range(i + 1, fields.shape[1]))
        identity = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(-1)
    torch.testing.assert_close(identity, explicit)


def test_pnn_rejects_mixed_embedding_widths():
    from din_ray.schema import Feature, Schema

    schema = Schema((
        Feature("item_id", "ad", "item_id", 30, 4),
        Feature("cate_id", "ad", "cate_id", 6, 3),
        Feature("hist_item_id", "behavior", "item_id", 30, 4, 4, "item_id"),
        Feature("hist_cate_id", "behavior", "cate_id", 6, 3, 4, "cate_id"),
    ))
    with pytest.raises(ValueError, match="one embedding_dim"):
        build_model(schema, ModelConfig(model="pnn"))
