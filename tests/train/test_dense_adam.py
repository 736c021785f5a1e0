"""DenseAdam against torch.optim.Adam: the same updates (fused and per-tensor forms, with the
loop's lr changes), state_dicts that load both ways, the fallback where there is no fused
kernel, and a real `din-ray train --local` run that never imports torch._dynamo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from builders import write_tiny_dataset

from din_ray.train.dense_adam import DenseAdam

EXACT = {"rtol": 0.0, "atol": 0.0}
TOL = {"rtol": 1e-5, "atol": 1e-6}  # fused vs foreach: the same rule in a different order
REPO = Path(__file__).resolve().parents[2]


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    """A weight (5, 3), a bias (3,) and a scalar: the shapes of the dense part."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((5, 3), (3,), ())]


def copies(ps: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def run(opts_and_params, steps: int, seed: int, lrs=(1e-2, 5e-3, 2e-3)) -> None:
    """`steps` steps of each (optimizer, params) on the same gradients; the lr changes each
    step through param_groups as the loop's decay does; the scalar skips every third step
    (no gradient: no update and no step count, as torch's)."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in opts_and_params[0][1]]
        for opt, ps in opts_and_params:
            opt.zero_grad(set_to_none=True)
            for i, (p, grad) in enumerate(zip(ps, grads)):
                if not (i == 2 and step % 3 == 2):
                    p.grad = grad.clone()
            for group in opt.param_groups:
                group["lr"] = lrs[step % len(lrs)]
            opt.step()


def assert_same(ps, qs, opt_p, opt_q, tol) -> None:
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **tol)
    sp, sq = opt_p.state_dict()["state"], opt_q.state_dict()["state"]
    assert sp.keys() == sq.keys()
    for k in sp:
        assert float(sp[k]["step"]) == float(sq[k]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sp[k][key], sq[k][key], **tol)


@pytest.mark.parametrize("torch_kwargs, tol", [({"fused": True}, EXACT), ({}, TOL)],
                         ids=["torch-fused", "torch-default"])
def test_equals_torch_adam_over_steps_with_lr_changes(torch_kwargs, tol):
    a = params()
    b = copies(a)
    ours, theirs = DenseAdam(a, lr=1e-2), torch.optim.Adam(b, lr=1e-2, **torch_kwargs)
    assert ours.fused  # CPU float32 has the kernel
    run([(ours, a), (theirs, b)], steps=7, seed=1)
    assert_same(a, b, ours, theirs, tol)
    assert not torch.equal(a[0], params()[0])  # the run moved the weights


def test_state_dict_layout_is_torch_adams():
    a = params()
    b = copies(a)
    ours, theirs = DenseAdam(a, lr=1e-2), torch.optim.Adam(b, lr=1e-2, fused=True)
    run([(ours, a), (theirs, b)], steps=2, seed=1)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours["param_groups"] == sd_theirs["param_groups"]
    for k, s in sd_theirs["state"].items():
        mine = sd_ours["state"][k]
        assert mine.keys() == s.keys()
        for key, v in s.items():
            assert (mine[key].dtype, mine[key].device, mine[key].shape) == (v.dtype, v.device,
                                                                            v.shape)


@pytest.mark.parametrize("torch_kwargs", [{"fused": True}, {}], ids=["fused", "default"])
def test_state_dict_round_trips_both_ways(torch_kwargs, tmp_path):
    """Ours -> torch's and torch's -> ours, through torch.save/torch.load as a checkpoint's
    dense.pt; the loaded optimizer then continues as the one that wrote the state."""
    tol = EXACT if torch_kwargs else TOL
    # ours -> torch's: continue both from the same state, on the same gradients.
    a = params()
    ours = DenseAdam(a, lr=1e-2)
    run([(ours, a)], steps=4, seed=1)
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    b = copies(a)
    theirs = torch.optim.Adam(b, lr=1.0, **torch_kwargs)  # lr comes from the state
    theirs.load_state_dict(torch.load(tmp_path / "ours.pt"))
    assert theirs.param_groups[0]["lr"] == ours.param_groups[0]["lr"]
    run([(ours, a), (theirs, b)], steps=4, seed=2)
    assert_same(a, b, ours, theirs, tol)

    # torch's -> ours.
    c = params(seed=3)
    theirs = torch.optim.Adam(c, lr=1e-2, **torch_kwargs)
    run([(theirs, c)], steps=4, seed=4)
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    d = copies(c)
    ours = DenseAdam(d, lr=1.0)
    ours.load_state_dict(torch.load(tmp_path / "theirs.pt"))
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    assert all(s["step"].dtype == torch.float32 for s in ours.state.values())
    run([(theirs, c), (ours, d)], steps=4, seed=5)
    assert_same(c, d, theirs, ours, tol)


def test_loaded_state_is_a_copy():
    """Loading another live optimizer's state must not make the two share moments."""
    a = params()
    first = DenseAdam(a, lr=1e-2)
    run([(first, a)], steps=2, seed=1)
    saved = {k: {n: t.clone() for n, t in s.items()} for k, s in
             first.state_dict()["state"].items()}
    second = DenseAdam(copies(a), lr=1e-2)
    second.load_state_dict(first.state_dict())
    run([(second, second.param_groups[0]["params"])], steps=2, seed=2)
    for k, s in first.state_dict()["state"].items():
        for n, t in s.items():
            torch.testing.assert_close(t, saved[k][n], **EXACT)


def test_per_tensor_form_equals_torchs_single_tensor_adam():
    """The form used without a fused kernel, against torch's own for-loop Adam."""
    a = params()
    b = copies(a)
    ours, theirs = DenseAdam(a, lr=1e-2, fused=False), torch.optim.Adam(b, lr=1e-2,
                                                                        foreach=False)
    assert not ours.fused and ours.param_groups[0]["fused"] is None
    run([(ours, a), (theirs, b)], steps=7, seed=1)
    assert_same(a, b, ours, theirs, EXACT)
    assert all(s["step"].device.type == "cpu" for s in ours.state.values())


def test_falls_back_where_there_is_no_fused_kernel(monkeypatch):
    """A build without torch._fused_adam_ (the op is absent, so it is removed here) and a
    device without the kernel (meta) both take the per-tensor form."""
    meta = DenseAdam([torch.nn.Parameter(torch.zeros(3, device="meta"))])
    assert not meta.fused
    monkeypatch.delattr(torch, "_fused_adam_")
    a = params()
    b = copies(a)
    ours, theirs = DenseAdam(a, lr=1e-2), torch.optim.Adam(b, lr=1e-2, foreach=False)
    assert not ours.fused
    run([(ours, a), (theirs, b)], steps=4, seed=1)
    assert_same(a, b, ours, theirs, EXACT)


def test_zero_grad_and_bad_states():
    a = params()
    opt = DenseAdam(a)
    for p in a:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in a)
    opt.zero_grad()
    assert all(p.grad is None for p in a)

    amsgrad = torch.optim.Adam(copies(a), amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad=True"):
        opt.load_state_dict(amsgrad.state_dict())
    fewer = torch.optim.Adam(copies(a)[:2])
    with pytest.raises(ValueError, match="2 parameters, this optimizer 3"):
        opt.load_state_dict(fewer.state_dict())
    with pytest.raises(ValueError, match="empty parameter list"):
        DenseAdam([])


# Trains, then trains again into the same output for one more epoch (which resumes: the dense
# optimizer's load_state_dict), then fails if anything in the process imported torch._dynamo.
_NO_DYNAMO = textwrap.dedent("""
    import sys
    from din_ray.cli import main
    data, out = sys.argv[1:3]
    args = ["train", "--local", "--threads", "1", "--data", data, "--output", out,
            "--embedding-dim", "4", "--batch-size", "64", "--patience", "0"]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2"]) == 0
    loaded = sorted(m for m in sys.modules if m.startswith("torch._dynamo"))
    assert not loaded, loaded[:3]
""")


def test_local_training_never_imports_torch_dynamo(tmp_path):
    """torch._dynamo costs 2-3 s of a process's start; nothing on the `--local` path needs
    it. A fresh interpreter, since this test process may have imported it already."""
    data = write_tiny_dataset(tmp_path / "data", rows=400)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", _NO_DYNAMO, str(data), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr  # the second call loaded the dense optimizer's state
