"""Adam for the dense parameters, without `torch.optim`'s import of `torch._dynamo`.

`torch.optim.Optimizer` wraps `step`, `zero_grad`, `add_param_group` (run by its constructor),
`state_dict` and `load_state_dict` in `torch._disable_dynamo` / `_use_grad_for_differentiable`,
which import `torch._dynamo` on first call: 2-3 s of every training process's start on a
2-core machine, for a compiler din-ray never uses. `DenseAdam` runs the same update through the
same fused kernel (`torch._fused_adam_`, which `torch.optim.Adam(fused=True)` calls) and keeps
`torch.optim.Adam`'s `state_dict` layout, so checkpoints load into either optimizer.

    opt = DenseAdam(list(model.parameters()), lr=1e-3)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    opt.param_groups[0]["lr"] = 5e-4  # the loop's per-epoch decay
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

# Device types with a fused Adam kernel: those torch.optim.Adam(fused=True) accepts
# (torch.utils._foreach_utils._get_fused_kernels_supported_devices, less the plug-in backends).
FUSED_DEVICES = frozenset({"cpu", "cuda", "mps", "xpu"})

# The group options torch.optim.Adam writes. DenseAdam implements the defaults of those it
# does not take as arguments, and refuses a saved group that sets them otherwise.
_FIXED_OPTIONS = {"amsgrad": False, "maximize": False, "differentiable": False,
                  "decoupled_weight_decay": False}


def has_fused_kernel(param: Tensor) -> bool:
    """Whether `torch._fused_adam_` can update `param` (its device type and a float dtype)."""
    return (hasattr(torch, "_fused_adam_") and param.device.type in FUSED_DEVICES
            and param.is_floating_point())


class DenseAdam:
    """Adam (Kingma & Ba, 2015; torch.optim.Adam's defaults) over one group of dense tensors.

    Parameters on a device and dtype with a fused kernel are updated by `torch._fused_adam_`
    in one call per (device, dtype); the rest by the same rule written out per tensor
    (torch.optim.Adam's single-tensor form). Either way the result equals torch.optim.Adam's
    up to float rounding.

    The attributes the training loop and checkpoints use are torch's: `param_groups` (one
    dict: "params", "lr", "betas", "eps", "weight_decay" and Adam's other options), `state`
    (per parameter: "step", a 0-dim float32 tensor, and "exp_avg", "exp_avg_sq" shaped as the
    parameter), `step()`, `zero_grad()`, `state_dict()`, `load_state_dict()`.

    Args:
        params: the tensors to optimise (requires_grad), any shapes.
        lr: learning rate; later changes go through `param_groups[0]["lr"]`.
        betas: decay rates of the first and second moment estimates.
        eps: added to the second moment's root in the denominator.
        weight_decay: L2 penalty added to the gradient (torch.optim.Adam's, not AdamW's).
        fused: use the fused kernel where one exists; False forces the per-tensor form.
    """

    def __init__(self, params: list[nn.Parameter] | list[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool = True) -> None:
        params = list(params)
        if not params:
            raise ValueError("DenseAdam got an empty parameter list")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("DenseAdam got the same parameter twice")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"DenseAdam: lr {lr}, eps {eps} and weight_decay {weight_decay} "
                             f"must be >= 0 and betas {betas} in [0, 1)")
        self.fused = fused and all(has_fused_kernel(p) for p in params)
        # The group as torch.optim.Adam writes it, so either optimizer loads the other's
        # state_dict; "fused" says which kernel ran (torch's Adam adopts a loaded group's
        # options, and must not be told to fuse on a device without the kernel).
        self.param_groups: list[dict[str, Any]] = [{
            "params": params, "lr": lr, "betas": tuple(betas), "eps": eps,
            "weight_decay": weight_decay, **_FIXED_OPTIONS, "foreach": None,
            "capturable": False, "fused": True if self.fused else None}]
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient (others keep their state)."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("DenseAdam takes dense gradients; sparse rows go through "
                                   "din_ray.embeddings.optim.RowWiseOptimizer")
            if p not in self.state:
                self.state[p] = self._fresh_state(p)
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        for ps in by_kind.values():
            states = [self.state[p] for p in ps]
            grads = [p.grad for p in ps]
            steps = [s["step"] for s in states]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            if self.fused:
                # The kernel reads the incremented step (bias corrections) from the device,
                # as torch.optim.adam._fused_adam does; no host round trip per step.
                torch._foreach_add_(steps, 1)
                torch._fused_adam_(ps, grads, exp_avgs, exp_avg_sqs, [], steps,
                                   lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                                   weight_decay=group["weight_decay"], eps=group["eps"],
                                   amsgrad=False, maximize=False)
            else:
                for p, g, m, v, t in zip(ps, grads, exp_avgs, exp_avg_sqs, steps):
                    _adam_update(p, g, m, v, t, group, beta1, beta2)

    def _fresh_state(self, p: Tensor) -> dict[str, Tensor]:
        return {"step": torch.zeros((), **self._placement(p, "step")),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _placement(self, p: Tensor, key: str) -> dict[str, Any]:
        """Where and in what dtype `self.state[p][key]` lives: the moments as `p`; "step" in
        float32 on `p`'s device for the fused kernel and on the host for the per-tensor form
        (which reads it as a Python number), as torch.optim.Adam keeps it."""
        if key == "step":
            return {"dtype": torch.float32, "device": p.device if self.fused else "cpu"}
        return {"dtype": p.dtype, "device": p.device}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero in place) every parameter's gradient, as torch.optim.Adam's."""
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.Adam's layout: {"state": {index: {"step", "exp_avg", "exp_avg_sq"}},
        "param_groups": [group options with "params": [0, 1, ...]]}, indices in parameter
        order, only parameters that have been stepped in "state". Tensors are the live ones,
        as torch's (callers copy them off the device)."""
        group = self.param_groups[0]
        index = {id(p): i for i, p in enumerate(group["params"])}
        packed = {k: v for k, v in group.items() if k != "params"}
        packed["params"] = list(range(len(group["params"])))
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()},
                "param_groups": [packed]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict` of this class or of torch.optim.Adam (fused or not) over the
        same parameters in the same order: the group's lr, betas, eps and weight_decay, and
        each parameter's moments (copied, cast to the parameter's device and dtype).

        Raises:
            ValueError: not one group, a different parameter count, or a group with an Adam
                option DenseAdam does not implement (amsgrad, maximize, ...).
        """
        groups = state_dict["param_groups"]
        params = self.param_groups[0]["params"]
        if len(groups) != 1:
            raise ValueError(f"DenseAdam holds one parameter group; the state_dict has "
                             f"{len(groups)}")
        saved = groups[0]
        if len(saved["params"]) != len(params):
            raise ValueError(f"the state_dict's group has {len(saved['params'])} parameters, "
                             f"this optimizer {len(params)}")
        for key, value in _FIXED_OPTIONS.items():
            if saved.get(key, value) != value:
                raise ValueError(f"the state_dict's group sets {key}={saved[key]!r}; DenseAdam "
                                 f"implements {key}={value!r} only")
        param_of = dict(zip(saved["params"], params))
        state = {}
        for key, moments in state_dict["state"].items():
            p = param_of[key]
            # Copies: the loaded dict (a checkpoint's, or another live optimizer's) stays
            # untouched by this optimizer's in-place updates.
            state[p] = {k: torch.as_tensor(moments[k]).to(**self._placement(p, k), copy=True)
                        for k in ("step", "exp_avg", "exp_avg_sq")}
        group = self.param_groups[0]
        for key in ("lr", "betas", "eps", "weight_decay"):
            group[key] = copy.deepcopy(saved[key])
        group["betas"] = tuple(group["betas"])
        self.state = state


def _adam_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor,
                 group: dict[str, Any], beta1: float, beta2: float) -> None:
    """One tensor's Adam update, as torch.optim.adam._single_tensor_adam (no amsgrad)."""
    if group["weight_decay"]:
        grad = grad.add(p, alpha=group["weight_decay"])
    step += 1
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = step.item()
    step_size = group["lr"] / (1 - beta1 ** t)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** t) ** 0.5).add_(group["eps"])
    p.addcdiv_(exp_avg, denom, value=-step_size)
