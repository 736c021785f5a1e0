"""Training and inference throughput of din-ray against deepctr-torch's DIN (issue 9).

    python benchmarks/train_throughput.py --data /tmp/syn300k            # prepares it if missing
    python benchmarks/train_throughput.py --data /tmp/syn300k --sections throughput loss
    python benchmarks/train_throughput.py --data /tmp/syn300k --sections scaling

Same data and architecture in both: synthetic data (`din_ray.data.synthetic`, history length
50), embedding 16 per field (item, category), attention 80-40, MLP 200-80, batch 1024, Adam at
1e-3, `--threads` torch threads (2), one process. Sections (all by default except scaling):

  throughput  din-ray's training step (`EmbeddingTables.lookup` + DIN + dense Adam + row-wise
              Adam, as `train_loop` runs it) and deepctr-torch's (its `fit` inner loop), run
              alternately `--repeats` times over the same in-memory batches; medians of each and
              the median of the per-round ratios. Then inference (forward only), the same way.
              Twice: on the data as generated (variable history lengths) and with every history
              slot filled (`full_history`), the worst case for din-ray's padding skipping.
  loss        both trained `--loss-steps` steps on the same batch sequence from their own
              initialisation: the loss curve (per-sample mean log loss) and the validation log
              loss / AUC afterwards, so the speed is not bought with less learning.
  ablation    the attention unit alone (forward + backward) in three forms: the paper's
              concatenated input, first-layer algebra over all slots, algebra + packing.
  roofline    FLOPs per sample of each model's forward + backward (FlopCounterMode), the
              achieved GFLOP/s at the measured throughput, and dense matmul GFLOP/s of this
              machine (torch.mm, 2048², same threads).
  data        rows/s of din-ray's Parquet reader (`iter_numpy_batches`) and of Ray Data
              (`read_parquet(...).iter_batches`, pyarrow batches then `to_numpy`, as the
              distributed workers read), against the trainer's samples/s.
  scaling     `din_ray.train.distributed.run_ray` (Ray Train, sharded embeddings) with 1 and 2
              workers for one epoch, alternately, samples/s from the epoch metrics.

The machine is shared: absolute numbers move with the load, so ratios are taken from rounds run
back to back, and every round is recorded. Results: benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Arch,
    DeepCTRTrainer,
    DinRayTrainer,
    attention_concat,
    attention_decomposed,
    attention_packed,
    load_batches,
    time_steps,
)
from din_ray.data.format import PreparedDataset, iter_numpy_batches, to_numpy  # noqa: E402
from din_ray.model.layers import TargetAttention  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"
SECTIONS = ("throughput", "loss", "ablation", "roofline", "data", "scaling")
log = logging.getLogger("train_throughput")


def median_ratio(rounds: list[dict], num: str, den: str) -> float:
    return statistics.median(r[num] / r[den] for r in rounds)


def alternate(name_a, run_a, name_b, run_b, repeats: int) -> dict:
    """Run a and b alternately `repeats` times; each returns samples/s."""
    rounds = []
    for r in range(repeats):
        first, second = ((name_a, run_a), (name_b, run_b)) if r % 2 == 0 else \
            ((name_b, run_b), (name_a, run_a))
        row = {first[0]: first[1](), second[0]: second[1]()}
        rounds.append(row)
        log.info("round %d: %s", r, {k: round(v) for k, v in row.items()})
    return {"rounds": rounds,
            f"{name_a}_median": statistics.median(r[name_a] for r in rounds),
            f"{name_b}_median": statistics.median(r[name_b] for r in rounds),
            "ratio_median": median_ratio(rounds, name_a, name_b)}


def throughput(ds, arch, args, full_history: bool) -> dict:
    batches = load_batches(ds.root, args.batch_size, args.batches, full_history=full_history)
    fill = float(np.mean([(b["hist_item_id"] != 0).mean() for b in batches]))
    din = DinRayTrainer(ds, arch)
    dc = DeepCTRTrainer(ds, arch)
    xs = [dc.to_x(b) for b in batches]
    for i in range(args.warmup):
        din.train_step(batches[i % len(batches)])
        dc.train_step(xs[i % len(xs)])
    n = args.steps * args.batch_size
    train = alternate("din_ray", lambda: n / time_steps(din.train_step, batches, args.steps),
                      "deepctr", lambda: n / time_steps(dc.train_step, xs, args.steps),
                      args.repeats)
    infer = alternate("din_ray", lambda: n / time_steps(din.predict, batches, args.steps),
                      "deepctr", lambda: n / time_steps(dc.predict, xs, args.steps),
                      args.repeats)
    return {"history_fill": fill, "train": train, "inference": infer,
            "deepctr_version": dc.version}


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def loss_curves(ds, arch, args) -> dict:
    from sklearn.metrics import roc_auc_score

    batches = load_batches(ds.root, args.batch_size, args.loss_steps)
    valid = list(iter_numpy_batches(ds.files("valid"), ds.schema, 8192))
    din = DinRayTrainer(ds, arch)
    dc = DeepCTRTrainer(ds, arch)
    out = {}
    for name, trainer, prep in (("din_ray", din, lambda b: b), ("deepctr", dc, dc.to_x)):
        t0 = time.perf_counter()
        curve = [trainer.train_step(prep(b)) for b in batches]
        seconds = time.perf_counter() - t0
        y = np.concatenate([b["label"] for b in valid])
        p = np.concatenate([trainer.predict(prep(b)).numpy() for b in valid])
        out[name] = {"curve": curve, "train_seconds": seconds,
                     "first_20_mean": float(np.mean(curve[:20])),
                     "last_20_mean": float(np.mean(curve[-20:])),
                     "valid_logloss": log_loss(y, p), "valid_auc": float(roc_auc_score(y, p))}
        log.info("%s: loss %.4f -> %.4f, valid logloss %.4f auc %.4f", name,
                 out[name]["first_20_mean"], out[name]["last_20_mean"],
                 out[name]["valid_logloss"], out[name]["valid_auc"])
    out["steps"] = args.loss_steps
    return out


def ablation(ds, args) -> dict:
    """Attention unit forward + backward on a synthetic padded batch shaped like the data."""
    g = torch.Generator().manual_seed(0)
    B, L, D = args.batch_size, 50, 2 * 16
    lengths = torch.randint(0, L + 1, (B,), generator=g)  # fill ~ 50 %
    mask = torch.arange(L)[None, :] < lengths[:, None]
    query = torch.randn(B, D, generator=g)
    keys = torch.randn(B, L, D, generator=g) * mask.unsqueeze(-1)
    out = {"history_fill": float(mask.float().mean())}
    for act in ("prelu", "dice"):
        att = TargetAttention(D, (80, 40), act)
        forms = {"concat": attention_concat, "decomposed": attention_decomposed,
                 "packed": attention_packed}
        times: dict[str, list[float]] = {k: [] for k in forms}
        for r in range(args.repeats + 1):
            for name, f in forms.items():
                q, k = query.clone().requires_grad_(True), keys.clone().requires_grad_(True)
                t0 = time.perf_counter()
                f(att, q, k, mask).sum().backward()
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[act] = {"seconds_median": med,
                    "speedup_decomposed_vs_concat": med["concat"] / med["decomposed"],
                    "speedup_packed_vs_decomposed": med["decomposed"] / med["packed"]}
        log.info("ablation %s: %s", act, out[act])
    # Dense Adam over DIN's dense parameters: torch's default (foreach) vs fused=True.
    params = list(DinRayTrainer(ds, Arch(activation=args.activation)).model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    adam = {}
    for fused in (False, True):
        opt = torch.optim.Adam(params, lr=1e-3, fused=fused or None)
        opt.step()
        t0 = time.perf_counter()
        for _ in range(20):
            opt.step()
        adam["fused" if fused else "foreach"] = (time.perf_counter() - t0) / 20
    out["dense_adam_seconds"] = adam
    out["dense_params"] = sum(p.numel() for p in params)
    return out


def flops_per_sample(step, batch) -> float:
    """FLOPs of one training step `step(batch)` (forward + backward + optimizer) per sample,
    counted by FlopCounterMode (matmuls and convolutions; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    rows = len(batch[1]) if isinstance(batch, tuple) else len(batch["label"])
    return counter.get_total_flops() / rows


def roofline(ds, arch, args, measured: dict | None) -> dict:
    batches = load_batches(ds.root, args.batch_size, 1)
    full = load_batches(ds.root, args.batch_size, 1, full_history=True)
    out = {}
    for tag, b in (("data", batches[0]), ("full_history", full[0])):
        din = DinRayTrainer(ds, arch)
        dc = DeepCTRTrainer(ds, arch)
        x = dc.to_x(b)
        out[tag] = {"din_ray_flops_per_sample": flops_per_sample(din.train_step, b),
                    "deepctr_flops_per_sample": flops_per_sample(dc.train_step, x)}
    n = 2048
    a, c = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, c)
    rates = []
    for _ in range(max(args.repeats, 3)):
        t0 = time.perf_counter()
        for _ in range(3):
            torch.mm(a, c)
        rates.append(3 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    out["matmul_gflops_best"] = max(rates)
    out["matmul_gflops_median"] = statistics.median(rates)
    if measured:
        for tag in ("data", "full_history"):
            if tag not in measured:
                continue
            train = measured[tag]["train"]
            for who in ("din_ray", "deepctr"):
                flops = out[tag][f"{who}_flops_per_sample"]
                out[tag][f"{who}_achieved_gflops"] = flops * train[f"{who}_median"] / 1e9
    log.info("roofline: %s", out)
    return out


def data_rates(ds, args, trainer_rate: float | None) -> dict:
    files = ds.files("train")
    rows = ds.num_rows("train")
    out = {"rows": rows}
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        n = sum(len(b["label"]) for b in iter_numpy_batches(files, ds.schema, args.batch_size,
                                                             shuffle=True))
        rates.append(n / (time.perf_counter() - t0))
    out["iter_numpy_batches_rows_per_s"] = statistics.median(rates)
    import ray

    from din_ray.ray_session import start_local_ray

    tmp = tempfile.mkdtemp(prefix="ray-tt-", dir="/tmp")
    start_local_ray(4, temp_dir=tmp, dashboard=False, log_to_driver=False)
    try:
        ray_rates, ray_np_rates = [], []
        for _ in range(3):
            dataset = ray.data.read_parquet([str(f) for f in files])
            t0 = time.perf_counter()
            n = 0
            for b in dataset.iter_batches(batch_size=args.batch_size, batch_format="pyarrow"):
                n += b.num_rows
            ray_rates.append(n / (time.perf_counter() - t0))
            dataset = ray.data.read_parquet([str(f) for f in files])
            t0 = time.perf_counter()
            n = 0
            for b in dataset.iter_batches(batch_size=args.batch_size, batch_format="pyarrow"):
                n += len(to_numpy(ds.schema, b)[ds.schema.label])
            ray_np_rates.append(n / (time.perf_counter() - t0))
        out["ray_data_rows_per_s"] = statistics.median(ray_rates)
        out["ray_data_to_numpy_rows_per_s"] = statistics.median(ray_np_rates)
    finally:
        ray.shutdown()
    if trainer_rate:
        out["trainer_samples_per_s"] = trainer_rate
        out["ray_data_over_trainer"] = out["ray_data_to_numpy_rows_per_s"] / trainer_rate
        out["iter_numpy_over_trainer"] = out["iter_numpy_batches_rows_per_s"] / trainer_rate
    log.info("data: %s", out)
    return out


def scaling(ds, args) -> dict:
    """Epoch throughput of Ray Train with 1 and 2 workers (global batch fixed), alternately."""
    import ray

    # One local Ray for all runs (run_ray joins it): its own temp dir on this shared machine, and
    # logical CPUs beyond the workers' so Ray Data has some to read with.
    from din_ray.ray_session import start_local_ray

    start_local_ray(4, temp_dir=tempfile.mkdtemp(prefix="ray-tts-", dir="/tmp"), dashboard=False)
    try:
        runs = _scaling_rounds(ds, args)
    finally:
        ray.shutdown()
    return {"rounds": runs, "global_batch": args.batch_size,
            "workers_1_median": statistics.median(r["workers_1"] for r in runs),
            "workers_2_median": statistics.median(r["workers_2"] for r in runs),
            "speedup_median": median_ratio(runs, "workers_2", "workers_1")}


def _scaling_rounds(ds, args) -> list[dict]:
    from din_ray.train.distributed import run_ray
    from din_ray.train.loop import TrainConfig

    runs = []
    for r in range(args.scaling_repeats):
        row = {}
        for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
            out = Path(tempfile.mkdtemp(prefix=f"tt-scale{workers}-", dir="/tmp"))
            cfg = TrainConfig(data=str(ds.root), output=str(out), model="din",
                              activation=args.activation, batch_size=args.batch_size // workers,
                              epochs=1, reg="none", ad_bias=False, threads=1, workers=workers,
                              cpus_per_worker=1.0, run_name=f"scale{workers}",
                              storage_path=str(out / "ray"))
            result = run_ray(cfg)
            row[f"workers_{workers}"] = result["history"][0]["samples_per_s"]
            log.info("scaling round %d: %d workers %.0f samples/s", r, workers,
                     row[f"workers_{workers}"])
        runs.append(row)
    return runs


def ensure_data(path: Path, rows: int) -> PreparedDataset:
    if not (path / "dataset.json").exists():
        from din_ray.data.synthetic import prepare_synthetic

        log.info("preparing %d synthetic rows in %s", rows, path)
        prepare_synthetic(path, rows=rows, max_history=50, embedding_dim=16)
    return PreparedDataset.open(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="prepared synthetic dataset")
    p.add_argument("--rows", type=int, default=300_000, help="rows to generate if --data is new")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS[:-1]))
    p.add_argument("--activation", choices=("prelu", "dice"), default="prelu")
    p.add_argument("--scenarios", nargs="+", choices=("data", "full_history"),
                   default=["data", "full_history"],
                   help="histories as generated, and/or every slot filled")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=16, help="distinct batches cycled through")
    p.add_argument("--steps", type=int, default=16, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    p.add_argument("--loss-steps", type=int, default=120)
    p.add_argument("--scaling-repeats", type=int, default=2)
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    ds = ensure_data(args.data, args.rows)
    arch = Arch(activation=args.activation)
    results: dict = {"command": "python benchmarks/train_throughput.py " + " ".join(
        argv if argv is not None else sys.argv[1:]),
        "arch": {**arch.__dict__}, "batch_size": args.batch_size, "threads": args.threads,
        "torch": torch.__version__, "machine": {"cpus": os.cpu_count(),
                                                 "processor": platform.processor(),
                                                 "load_avg_start": os.getloadavg()},
        "data": {"path": str(ds.root), "rows": ds.manifest["rows"],
                 "tables": {k: list(v) for k, v in ds.schema.tables.items()}}}
    measured = {}
    if "throughput" in args.sections:
        for scenario in args.scenarios:
            measured[scenario] = throughput(ds, arch, args, full_history=scenario != "data")
        results["throughput"] = measured
    if "loss" in args.sections:
        results["loss"] = loss_curves(ds, arch, args)
    if "ablation" in args.sections:
        results["ablation"] = ablation(ds, args)
    if "roofline" in args.sections:
        results["roofline"] = roofline(ds, arch, args, measured)
    if "data" in args.sections:
        rate = measured["data"]["train"]["din_ray_median"] if measured else None
        results["data_loading"] = data_rates(ds, args, rate)
    if "scaling" in args.sections:
        results["scaling"] = scaling(ds, args)
    results["machine"]["load_avg_end"] = os.getloadavg()
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    merged = {**previous, **results}  # sections run separately accumulate in one file
    merged["commands"] = [*previous.get("commands", []),
                          {"command": results["command"], "sections": args.sections,
                           "load_avg": [results["machine"]["load_avg_start"],
                                        results["machine"]["load_avg_end"]],
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=1, default=float) + "\n")
    tmp.replace(args.output)
    print(json.dumps({k: v for k, v in results.items() if k != "loss"}, indent=1, default=float)
          [:6000])
    return results


if __name__ == "__main__":
    main()
