"""The device-aware path without a GPU: device mixing caught on a fake device, bf16 on the CPU,
and the GPU-only checks (skipped here, run by benchmarks/gpu_check.py on a GPU machine).

The device-mixing check runs the real training step and the serving scorer with every tensor
on a second device under `FakeTensorMode`, which raises `FakeTensorDeviceMismatchError` when an
op mixes that device with the CPU, e.g. a `torch.arange(n)` without `device=` meeting a table's
ids. The fake device is `meta`, not `cuda`: on a CPU-only build fake `cuda` tensors fail in the
Python bindings' device guards (`x[:, 0]`, `.contiguous()`: "PyTorch is not linked with support
for cuda devices"), while fake `meta` tensors run everything; the check is the same (any device
other than the CPU's).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import random_columns, tiny_config, tiny_schema, write_tiny_dataset
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from din_ray.config import TrainConfig
from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.regularization import MiniBatchAware
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import ModelConfig, build_model
from din_ray.serve.request import ParsedRequest
from din_ray.serve.scoring import Scorer
from din_ray.train.forward import to_torch
from din_ray.train.local import run_local
from din_ray.train.loop import train_step

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
FAKE = torch.device("meta")


class HintedShapeEnv(ShapeEnv):
    """A ShapeEnv whose data-dependent sizes (the outputs of unique, nonzero, boolean masks)
    carry a made-up example value, so Python branches on them (`if rows.shape[0] > 1`) and
    autograd's shape checks can be decided instead of raising GuardOnDataDependentSymNode.
    Shapes stay symbolic; the example value only picks the branch. (This uses the hook that
    torch's own propagate_real_tensors mode fills with real values.)"""

    def create_unbacked_symint(self, source=None):
        size = super().create_unbacked_symint(source)
        self.set_real_tensor_prop_unbacked_vals(size.node.expr, 5)
        return size


def fake_mode() -> FakeTensorMode:
    logging.getLogger("torch.fx.experimental.symbolic_shapes").setLevel(logging.ERROR)
    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=HintedShapeEnv())


def tiny_parts(model: str = "din"):
    schema = tiny_schema()
    # PReLU: Dice's fused addcmul has no fake kernel for a data-dependent row count (the
    # attention unit packs the real behaviours) in torch 2.13; Dice creates no tensors itself.
    net = build_model(schema, ModelConfig.from_dict({"model": model, "activation": "prelu"}))
    tables = EmbeddingTables(net.table_specs())
    counts = {t: np.arange(s.num_rows) % 7 + 1 for t, s in tables.specs.items()}
    batch = random_columns(schema, 16, 0)
    batch["label"] = batch["label"].astype(np.float32)
    return schema, net, tables, counts, batch


def fake_train_step(model: str = "din") -> None:
    """One training step (lookup, forward, backward, dense and row-wise Adam with MBA) with the
    model, tables, optimizer state, counts and batch on the fake device."""
    _, net, tables, counts, batch = tiny_parts(model)
    with fake_mode():
        net.to(FAKE)
        tables.to(FAKE)
        dense_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        sparse_opt = RowWiseOptimizer(tables, "adam")
        mba = MiniBatchAware(0.01, counts).to(FAKE)
        loss = train_step(net, tables, to_torch(batch, FAKE), "label", dense_opt, sparse_opt,
                          mba)
        assert loss.device == FAKE
        assert all(p.device == FAKE for p in net.parameters())
        for state in sparse_opt.state.values():
            assert all(v.device == FAKE for v in state.values())


@pytest.mark.parametrize("model", ["din", "base", "lr", "wide_deep", "pnn", "deepfm"])
def test_training_step_stays_on_the_device(model):
    fake_train_step(model)


def test_serving_scores_on_the_device():
    schema, net, tables, _, _ = tiny_parts()
    requests = [ParsedRequest({}, {"hist_item_id": np.array([3, 4, 0, 0, 0]),
                                   "hist_cate_id": np.array([2, 3, 0, 0, 0])}, 2, 0,
                              {"item_id": np.array([5, 6, 7]), "cate_id": np.array([2, 4, 5])},
                              True)]
    with fake_mode():
        scorer = Scorer(net, tables, schema, FAKE)
        logits, weights = scorer.logits(requests)
        assert logits.device == FAKE and weights.device == FAKE


def test_the_check_catches_a_host_tensor_in_the_step(monkeypatch):
    """A planted bug (the tables' row-wise step indexing with a CPU arange) must fail."""
    original = RowWiseOptimizer.step

    def step_with_host_ids(self, gradients, regularizer=None):
        gradients = {t: (torch.arange(len(ids)) + ids, g) for t, (ids, g) in gradients.items()}
        return original(self, gradients, regularizer)

    monkeypatch.setattr(RowWiseOptimizer, "step", step_with_host_ids)
    # FakeTensorDeviceMismatchError, or the same check from a decomposition; both RuntimeErrors
    with pytest.raises(RuntimeError, match="device"):
        fake_train_step()


def _train(tmp_path: Path, precision: str) -> dict:
    data = tmp_path / "data"
    if not data.exists():
        write_tiny_dataset(data, rows=512)
    cfg = tiny_config(data, tmp_path / precision, precision=precision)
    return run_local(cfg)


def test_bf16_trains_on_the_cpu_close_to_fp32(tmp_path):
    fp32 = _train(tmp_path, "fp32")["history"][0]
    bf16 = _train(tmp_path, "bf16")["history"][0]
    assert math.isfinite(bf16["train_loss"])
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], abs=0.02)
    assert bf16["valid_auc"] == pytest.approx(fp32["valid_auc"], abs=0.05)


def test_bad_precision_and_device_are_refused(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig.create(data="x", precision="fp16")
    with pytest.raises(ValueError, match="device='cuda' is for local runs"):
        TrainConfig.create(data="x", device="cuda", use_gpu=True)
    with pytest.raises(RuntimeError):
        TrainConfig.create(data="x", device="gpu")


@gpu
@pytest.mark.gpu
def test_training_step_on_cuda_matches_cpu():
    """The same step on the GPU and on the CPU gives the same loss and rows (fp32)."""
    results = []
    for device in (torch.device("cpu"), torch.device("cuda")):
        torch.manual_seed(0)
        _, net, tables, counts, batch = tiny_parts()
        net.to(device)
        tables.to(device)
        dense_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        sparse_opt = RowWiseOptimizer(tables, "adam")
        mba = MiniBatchAware(0.01, counts).to(device)
        losses = [float(train_step(net, tables, to_torch(batch, device), "label", dense_opt,
                                   sparse_opt, mba)) for _ in range(3)]
        results.append((losses, tables.weight("item_id").cpu()))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-4)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


@gpu
@pytest.mark.gpu
def test_bf16_step_runs_on_cuda():
    _, net, tables, counts, batch = tiny_parts()
    device = torch.device("cuda")
    net.to(device)
    tables.to(device)
    sparse_opt = RowWiseOptimizer(tables, "adam")
    loss = train_step(net, tables, to_torch(batch, device), "label",
                      torch.optim.Adam(net.parameters()), sparse_opt, None, "bf16")
    assert torch.isfinite(loss) and tables.weight("item_id").dtype == torch.float32


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
