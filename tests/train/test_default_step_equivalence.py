"""The training step of the default model (DIN, Dice in the MLP, MBA, ad bias, Adam) against a
reference step written the plain way (issue 15, goal 4).

The reference looks every request up with advanced indexing in whole-table leaves, updates the
dense part with torch's default Adam, and the touched rows with lazy Adam and the decoupled MBA
penalty written from their formulas. `train_step` (split lookup, fused dense Adam, row-wise Adam
by index_select / addcdiv / index_copy_) must give the same losses, dense weights, rows and
optimizer moments to float tolerance over several steps.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from builders import random_columns, tiny_schema

from din_ray.config import TrainConfig
from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.regularization import build_regularizer
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import build_model
from din_ray.schema import PAD_ID
from din_ray.train.forward import to_torch
from din_ray.train.loop import dense_adam, train_step

TOL = {"rtol": 1e-5, "atol": 1e-6}
LR, STEPS, BATCH = 1e-2, 4, 32  # a larger rate than the default, so rows move visibly


def default_setup(seed: int = 0):
    # The default step, with the ad bias on (off by default since the comparison with a plain
    # DIN): MBA's centred bias rows are the part of the step most worth checking.
    cfg = TrainConfig.create(data="unused", ad_bias=True, zero_logit=True)
    assert (cfg.model.model, cfg.model.activation, cfg.regularization.reg) == ("din", "dice",
                                                                              "mba")
    schema = tiny_schema(items=40, cates=7, max_len=6)
    torch.manual_seed(seed)
    model = build_model(schema, cfg.model)
    torch.nn.init.normal_(model.mlp.out.weight, std=0.1)  # zero_logit: no gradient upstream
    tables = EmbeddingTables(model.table_specs(), seed=seed, init_std=0.1)
    rng = np.random.default_rng(seed)
    counts = {t: rng.integers(0, 20, spec.num_rows) for t, spec in tables.specs.items()}
    centers = {"item_id.bias": torch.from_numpy(rng.normal(size=(40, 1))).float()}
    tables.set_rows("item_id.bias", centers["item_id.bias"])
    reg = build_regularizer("mba", 0.5, counts, global_batch=BATCH, centers=centers)
    batches = [random_columns(schema, BATCH, seed + s) for s in range(STEPS)]
    return schema, model, tables, reg, batches


def reference_run(schema, model, tables, reg, batches):
    """Plain form: whole-table leaves, default Adam, lazy Adam + MBA from the formulas."""
    weights = {t: tables.weight(t).clone() for t in tables.specs}
    m = {t: torch.zeros_like(w) for t, w in weights.items()}
    v = {t: torch.zeros_like(w) for t, w in weights.items()}
    opt = torch.optim.Adam(model.parameters(), lr=LR)  # torch's default (foreach) Adam
    b1, b2, eps = 0.9, 0.999, 1e-8
    losses = []
    for step, batch in enumerate(batches, start=1):
        t = to_torch(batch)
        leaves = {k: w.clone().requires_grad_(True) for k, w in weights.items()}
        requests = model.sparse_inputs(t)
        emb = {key: leaves[table][ids.long()] for key, (table, ids) in requests.items()}
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(emb, t), t[schema.label].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        with torch.no_grad():
            for table, leaf in leaves.items():
                ids = torch.unique(torch.cat([ids.reshape(-1).long() for tb, ids in
                                              requests.values() if tb == table]))
                ids = ids[ids != PAD_ID]
                g, w = leaf.grad[ids], weights[table][ids]
                m[table][ids] = b1 * m[table][ids] + (1 - b1) * g
                v[table][ids] = b2 * v[table][ids] + (1 - b2) * g * g
                m_hat = m[table][ids] / (1 - b1 ** step)
                v_hat = v[table][ids] / (1 - b2 ** step)
                penalty = reg.penalty(table, ids, w)  # λ·s·(w − centre)/n_j, pre-step rows
                weights[table][ids] = w - LR * m_hat / (v_hat.sqrt() + eps) - LR * penalty
    return losses, model, weights, m, v


def production_run(schema, model, tables, reg, batches):
    dense = dense_adam(list(model.parameters()), LR)
    sparse = RowWiseOptimizer(tables, "adam", lr=LR)
    model.train()
    tables.train()
    losses = [train_step(model, tables, to_torch(b), schema.label, dense, sparse, reg).detach()
              for b in batches]
    return losses, model, tables, sparse


def test_default_training_step_equals_reference():
    schema, model, tables, reg, batches = default_setup()
    ref_losses, ref_model, ref_w, ref_m, ref_v = reference_run(
        schema, copy.deepcopy(model).train(), copy.deepcopy(tables), reg, batches)
    losses, model, tables, sparse = production_run(schema, model, tables, reg, batches)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **TOL)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=f"dense parameter {name}")
    for (name, b), c in zip(model.named_buffers(), ref_model.buffers()):
        torch.testing.assert_close(b, c, **TOL, msg=f"buffer {name}")  # Dice's statistics
    for table in tables.specs:
        torch.testing.assert_close(tables.weight(table), ref_w[table], **TOL, msg=table)
        torch.testing.assert_close(sparse.state[table]["exp_avg"], ref_m[table], **TOL)
        torch.testing.assert_close(sparse.state[table]["exp_avg_sq"], ref_v[table], **TOL)
    # The run moved things: rows, MBA's pull and the dense weights are all exercised.
    start = EmbeddingTables(model.table_specs(), init_std=0.1)
    assert not torch.allclose(tables.weight("item_id"), start.weight("item_id"))


def test_dense_adam_is_fused_on_cpu_and_equals_default_adam():
    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    fused, plain = dense_adam(a, 1e-2), torch.optim.Adam(b, lr=1e-2)
    assert fused.fused
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL)
    plain.load_state_dict(fused.state_dict())  # same state layout: checkpoints load either way
