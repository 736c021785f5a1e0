"""How good are Dice's evaluation statistics after training? (issue 12, item 1)

    python benchmarks/dice_statistics.py --data /tmp/ml --output /tmp/dice-stats --epochs 1

Trains one local run (`din_ray.train.loop.run_local`, defaults unless given) while recording every
Dice layer's batch statistics (mean and variance over the real rows, as Dice normalises with in
training) at every step. Training never reads the moving averages, so the recorded sequence lets
each way of keeping them be replayed after the fact on the same weights:

  * ema_from_start: mean 0 / var 1, then lerp with weight `momentum` (din-ray before issue 12);
  * cumulative_then_ema: weight max(momentum, 1/t): the plain average of the first 1/momentum
    batches (BatchNorm's momentum=None), then the moving average;
  * debiased_ema: weight momentum / (1 − (1 − momentum)^t), Adam's bias correction written as a
    recurrence;
  * reestimated: the average statistics of `--reestimate-batches` training batches under the
    final weights, the reference "real batch statistics";
  * saved: what the checkpoint holds (whatever the code that trained it does).

Each scheme is replayed with every momentum of `--momenta`.

For each layer it prints the ratio of running variance to the re-estimated variance (mean and
median over channels) and the validation GAUC of the same checkpoint evaluated with each set of
statistics, and writes them to benchmarks/results/dice_statistics.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import din_ray.train.loop.loop as train_module
import torch

from din_ray import checkpoint as ckpt
from din_ray.data.format import PreparedDataset, iter_numpy_batches
from din_ray.model.layers import Dice
from din_ray.train.loop import TrainConfig, WorkerEnv, evaluate_split, forward, run_local, to_torch

RESULTS = Path(__file__).parent / "results" / "dice_statistics.json"


class StatisticsRecorder:
    """Forward hooks on every Dice layer of a model: the batch statistics of each training call.

    `steps[name]` is a list of (mean (C,), var (C,)) in call order.
    """

    def __init__(self) -> None:
        self.steps: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def attach(self, model: torch.nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, Dice):
                self.steps[name] = []
                module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def record(module: Dice, args: tuple, output: torch.Tensor) -> None:
            if not module.training:
                return
            x, mask = args[0], args[1] if len(args) > 1 else None
            rows = x.detach().reshape(-1, x.shape[-1])  # (N, C)
            if mask is not None:
                rows = rows[mask.reshape(-1)]
            if rows.shape[0] > 1:  # Dice does not update from a single real row
                self.steps[name].append((rows.mean(0), rows.var(0, unbiased=False)))
        return record


def replay(steps: list[tuple[torch.Tensor, torch.Tensor]], weight) -> tuple[torch.Tensor, ...]:
    """Moving averages after `steps` with update weight `weight(t)` at step t (1-based)."""
    mean = torch.zeros_like(steps[0][0])
    var = torch.ones_like(steps[0][1])
    for t, (m, v) in enumerate(steps, start=1):
        mean = torch.lerp(mean, m, weight(t))
        var = torch.lerp(var, v, weight(t))
    return mean, var


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default="din")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reestimate-batches", type=int, default=100)
    parser.add_argument("--momenta", type=float, nargs="+", default=[0.01, 0.1],
                        help="momenta to replay each scheme with")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)

    recorder = StatisticsRecorder()
    build = train_module.build_model

    def build_and_record(*a, **kw):
        model = build(*a, **kw)
        recorder.attach(model)
        return model

    train_module.build_model = build_and_record
    try:
        cfg = TrainConfig(data=args.data, output=args.output, epochs=args.epochs,
                          model=args.model, seed=args.seed, patience=0)
        run_local(cfg)
    finally:
        train_module.build_model = build

    model, tables, _ = ckpt.load_model(Path(args.output) / "checkpoint")
    dataset = PreparedDataset.open(args.data)
    momentum = next(m for m in model.modules() if isinstance(m, Dice)).momentum  # the run's
    variants = {"saved": {n: (m.running_mean.clone(), m.running_var.clone())
                          for n, m in model.named_modules() if isinstance(m, Dice)}}
    schemes = {"ema_from_start": lambda t, m: m,
               "cumulative_then_ema": lambda t, m: max(m, 1 / t),
               "debiased_ema": lambda t, m: m / (1 - (1 - m) ** t)}
    for m in args.momenta:
        for scheme, weight in schemes.items():
            variants[f"{scheme}@{m:g}"] = {n: replay(s, lambda t, w=weight, m=m: w(t, m))
                                           for n, s in recorder.steps.items()}
    # Re-estimation: training-mode Dice (batch statistics) under the final weights, no updates
    # kept; everything else as in evaluation.
    again = StatisticsRecorder()
    again.attach(model)
    model.train()
    with torch.no_grad():
        batches = iter_numpy_batches(dataset.files("train"), dataset.schema, cfg.batch_size,
                                     shuffle=True, seed=1)
        for i, batch in enumerate(batches):
            if i == args.reestimate_batches:
                break
            forward(model, tables, to_torch(batch))
    model.eval()
    variants["reestimated"] = {n: (torch.stack([m for m, _ in s]).mean(0),
                                   torch.stack([v for _, v in s]).mean(0))
                               for n, s in again.steps.items()}

    reference = variants["reestimated"]
    report: dict = {"config": {"data": args.data, "epochs": args.epochs, "model": args.model,
                               "seed": args.seed,
                               "steps": {n: len(s) for n, s in recorder.steps.items()},
                               "momentum": momentum}, "variants": {}}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Dice)}
    for name, stats in variants.items():
        for layer, (mean, var) in stats.items():
            layers[layer].running_mean.copy_(mean)
            layers[layer].running_var.copy_(var)
        metrics = {}
        for split in ("valid", "test"):
            batches = iter_numpy_batches(dataset.files(split), dataset.schema, 8192)
            out = evaluate_split(model, tables, batches, dataset.schema, WorkerEnv())
            metrics.update({f"{split}_gauc": out["gauc"], f"{split}_logloss": out["logloss"]})
        ratios = {}
        for layer, (mean, var) in stats.items():
            ref_mean, ref_var = reference[layer]
            r = var / ref_var
            ratios[layer] = {"var_ratio_mean": float(r.mean()),
                             "var_ratio_median": float(r.median()),
                             "mean_shift_in_sd": float(((mean - ref_mean).abs()
                                                        / ref_var.sqrt()).mean())}
        report["variants"][name] = {**metrics, "layers": ratios}
        print(f"{name:26s} valid GAUC {metrics['valid_gauc']:.4f}  test GAUC "
              f"{metrics['test_gauc']:.4f}  var ratio (mean/median per layer): "
              + ", ".join(f"{v['var_ratio_mean']:.2f}/{v['var_ratio_median']:.2f}"
                          for v in ratios.values()))
    print("layers:", ", ".join(layers))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
