"""The default model through the user's command against deepctr-torch's DIN (issue 15, goal 1).

    python benchmarks/train_default.py           # everything, data under /tmp/train-default
    python benchmarks/train_default.py --sections default profile --rounds 3

din-ray's side is the command a user runs, `din-ray train --local --data D --output O` (a
subprocess, default configuration: DIN, Dice in the MLP, PReLU in the attention unit, MBA,
ad bias with the popularity start, batch 256, Adam 1e-3), for `--epochs` epochs with the
evaluation and checkpoints a user gets. Its figures: samples/s of the training epochs (the
`samples_per_s` of metrics.json: training steps and data loading, no evaluation) and the wall
time of the whole command (start-up, counts, evaluation and checkpoints included).

deepctr-torch 0.3.0's DIN (in this process) is configured to the same architecture: embedding
16 per field (item, category), attention unit 80-40 with the same activation as din-ray's
(PReLU by default), MLP 200-80 with Dice (deepctr's `Dice(dim=2)`, put in place of the
`Dice(dim=3)` its DIN builds for the MLP, which cannot take the 2-D MLP input), no batch norm,
no dropout, no L2, Adam at the same rate, batch 256. It trains on the same batches
(`iter_numpy_batches` of the same Parquet files with the same shuffle seed) through the inner
loop of its `fit`; its samples/s is that epoch's, data loading included, like din-ray's.

The two alternate (din-ray first in even rounds) for `--rounds` rounds; the figure is the
median of the per-round ratios. Datasets: the bundled MovieLens (`din-ray prepare movielens`),
a synthetic set as generated (`din-ray prepare synthetic`) and the same set with every padded
history slot filled (≥ 90 % fill; the worst case for din-ray's padding skipping).

Sections:
  default   the default configuration on each dataset, din-ray vs deepctr, --rounds rounds.
  ray       the same command with `--workers 2` (Ray Train), one round per dataset in
            `--ray-datasets`, beside a `--local` run of the same round.
  variants  din-ray alone on the bundled data: PReLU vs Dice, MBA off, ad bias off,
            batch 1024, PReLU + no MBA + no bias + batch 1024 (the old benchmark's setting),
            alternating with the default in each round.
  profile   torch.profiler over one epoch of the default configuration on the bundled data
            (in this process, through `run_local`): time per component (data loading, lookup,
            attention unit, MLP, Dice, backward, dense Adam, row-wise Adam, MBA, evaluation,
            checkpoints, start-up passes) and the top operators.
  roofline  FLOPs per sample of the default training step (FlopCounterMode: matmuls only), of
            deepctr's step too, and the machine's matmul rate at 1 and 2 threads (torch.mm
            1024²), so the achieved share of it at the measured samples/s, and the rate din-ray's
            matmuls would need for 3x deepctr's samples/s (goal 1).

The machine is shared: only ratios from rounds run side by side mean anything; the load average
is recorded at the start and end. Results: benchmarks/results/train_default.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import CATE, HIST_CATE, HIST_ITEM, ITEM, Arch, DeepCTRTrainer  # noqa: E402
from din_ray.data.format import DatasetWriter, PreparedDataset, iter_numpy_batches  # noqa: E402
from din_ray.schema import PAD_ID  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "train_default.json"
SECTIONS = ("default", "ray", "variants", "profile", "roofline")
log = logging.getLogger("train_default")

# Each variant: a name and the `din-ray train` flags that differ from the default.
VARIANTS = {
    "prelu": ["--activation", "prelu"],
    "no_mba": ["--reg", "none"],
    "no_ad_bias": ["--no-ad-bias"],
    "batch_1024": ["--batch-size", "1024"],
    "prelu_nomba_nobias_1024": ["--activation", "prelu", "--reg", "none", "--no-ad-bias",
                                "--batch-size", "1024"],
}


# --- data ---------------------------------------------------------------------------------------
def cli(*args: str, env: dict | None = None, code: Path = ROOT) -> subprocess.CompletedProcess:
    """`din-ray ARGS` with the code of the checkout `code` (this one by default), in a
    subprocess (the user's command)."""
    full_env = {**os.environ, "PYTHONPATH": str(code), **(env or {})}
    entry = "import sys; from din_ray.cli import main; sys.exit(main())"  # the console script
    done = subprocess.run([sys.executable, "-c", entry, *args], env=full_env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"din-ray {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def ensure_datasets(root: Path, synthetic_rows: int, names: list[str]) -> dict[str, Path]:
    """The bundled MovieLens, a synthetic set and its fully filled copy (those in `names`),
    prepared once."""
    paths = {"movielens": root / "ml", "synthetic": root / "syn",
             "synthetic_full": root / "syn-full"}
    if not (paths["movielens"] / "dataset.json").exists():
        cli("prepare", "movielens", "--output", str(paths["movielens"]), "--overwrite")
    if not {"synthetic", "synthetic_full"} & set(names):
        return {k: v for k, v in paths.items() if k in names}
    if not (paths["synthetic"] / "dataset.json").exists():
        cli("prepare", "synthetic", "--rows", str(synthetic_rows), "--output",
            str(paths["synthetic"]), "--overwrite")
    if not (paths["synthetic_full"] / "dataset.json").exists():
        fill_histories(paths["synthetic"], paths["synthetic_full"])
    return {k: v for k, v in paths.items() if k in names}


def fill_histories(source: Path, output: Path, seed: int = 0) -> None:
    """A copy of a prepared dataset with every padded history slot holding a random behaviour
    (item and category drawn independently from the vocabularies), in every split; counts
    recomputed by the writer."""
    ds = PreparedDataset.open(source)
    rng = np.random.default_rng(seed)
    items, cates = ds.schema.tables[ITEM][0], ds.schema.tables[CATE][0]
    with DatasetWriter(output, ds.schema, source="filled:" + str(source),
                       params={"from": str(source), "fill": "all padded slots"},
                       overwrite=True) as w:
        for split in ("train", "valid", "test"):
            for batch in iter_numpy_batches(ds.files(split), ds.schema, 65_536):
                pad = batch[HIST_ITEM] == PAD_ID
                batch = dict(batch)
                batch[HIST_ITEM] = np.where(pad, rng.integers(2, items, pad.shape),
                                            batch[HIST_ITEM]).astype(np.int32)
                batch[HIST_CATE] = np.where(pad, rng.integers(2, cates, pad.shape),
                                            batch[HIST_CATE]).astype(np.int32)
                w.write(split, batch)


def history_fill(path: Path) -> float:
    ds = PreparedDataset.open(path)
    fills = [(b[HIST_ITEM] != PAD_ID).mean()
             for b in iter_numpy_batches(ds.files("train"), ds.schema, 8192)]
    return float(np.mean(fills))


# --- the two sides ------------------------------------------------------------------------------
def din_ray_run(data: Path, epochs: int, flags: list[str], workers: int = 1,
                code: Path = ROOT) -> dict:
    """`din-ray train` on `data` (--local, or --workers N under Ray) with the code of checkout
    `code`; samples/s of its training epochs from metrics.json and the command's wall time."""
    out = Path(tempfile.mkdtemp(prefix="td-run-", dir="/tmp"))
    mode = ["--local"] if workers == 1 else ["--workers", str(workers),
                                             "--storage-path", str(out / "ray")]
    env = {"RAY_TMPDIR": str(out / "ray-tmp")} if workers > 1 else None
    args = ["train", "--data", str(data), "--output", str(out / "run"), "--epochs", str(epochs),
            "--patience", "0", *mode, *flags]
    t0 = time.perf_counter()
    cli(*args, env=env, code=code)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    history = [h for h in metrics["history"] if h["train_samples"]]
    samples = sum(h["train_samples"] for h in history)
    train_seconds = sum(h["train_seconds"] for h in history)
    shutil.rmtree(out, ignore_errors=True)
    return {"samples_per_s": samples / train_seconds, "wall_s": wall,
            "train_s": train_seconds,
            "data_wait_s": sum(h["data_wait_seconds"] for h in history),
            "outside_training_s": wall - train_seconds,
            "valid_gauc": metrics["valid_gauc"], "command": "din-ray " + " ".join(args)}


class DeepCTRDefault(DeepCTRTrainer):
    """deepctr's DIN at din-ray's default architecture: `Arch` plus Dice in the MLP."""

    def __init__(self, dataset: PreparedDataset, attention_activation: str, mlp_activation: str,
                 lr: float, seed: int = 0) -> None:
        super().__init__(dataset, Arch(activation=attention_activation, lr=lr), seed=seed)
        if mlp_activation == "dice":
            from deepctr_torch.layers.activation import Dice

            dnn = self.model.dnn
            dnn.activation_layers = torch.nn.ModuleList(
                Dice(layer.out_features, dim=2) for layer in dnn.linears)
            # The new layers' parameters join the optimizer (fit's would not see them otherwise).
            self.model.compile(torch.optim.Adam(self.model.parameters(), lr=lr),
                               "binary_crossentropy")


def deepctr_run(data: Path, epochs: int, batch_size: int, attention_activation: str,
                mlp_activation: str, lr: float = 1e-3, seed: int = 0) -> dict:
    """deepctr's DIN trained `epochs` epochs on the batches din-ray's `--local` run reads
    (same files, batch size and per-epoch shuffle seed). -> samples/s with data loading."""
    ds = PreparedDataset.open(data)
    torch.manual_seed(seed)
    trainer = DeepCTRDefault(ds, attention_activation, mlp_activation, lr, seed)
    samples, seconds, losses = 0, 0.0, []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for batch in iter_numpy_batches(ds.files("train"), ds.schema, batch_size, shuffle=True,
                                        seed=seed * 10_007 + epoch):
            losses.append(trainer.train_step(trainer.to_x(batch)))
            samples += len(batch["label"])
        seconds += time.perf_counter() - t0
    return {"samples_per_s": samples / seconds, "train_s": seconds,
            "last_loss_mean": float(np.mean(losses[-50:])), "deepctr_version": trainer.version}


def median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def default_section(paths: dict[str, Path], args, progress=lambda out: None) -> dict:
    """The default configuration on each dataset; `progress(out)` after each dataset."""
    out = {}
    for name, data in paths.items():
        rounds = []
        for r in range(args.rounds):
            row = {}
            sides = [("din_ray", lambda d=data: din_ray_run(d, args.epochs, [])),
                     ("deepctr", lambda d=data: deepctr_run(d, args.epochs, 256, "prelu",
                                                             "dice"))]
            if args.baseline and name == "movielens":  # the code before this work, same command
                sides.insert(1, ("din_ray_baseline", lambda d=data: din_ray_run(
                    d, args.epochs, [], code=args.baseline)))
            for who, run in (sides if r % 2 == 0 else sides[::-1]):
                row[who] = run()
            row["ratio"] = row["din_ray"]["samples_per_s"] / row["deepctr"]["samples_per_s"]
            if "din_ray_baseline" in row:
                row["speedup_over_baseline"] = (row["din_ray"]["samples_per_s"]
                                                / row["din_ray_baseline"]["samples_per_s"])
            row["load_avg"] = os.getloadavg()
            log.info("%s round %d: din-ray %.0f/s (wall %.1f s), deepctr %.0f/s, ratio %.2f",
                     name, r, row["din_ray"]["samples_per_s"], row["din_ray"]["wall_s"],
                     row["deepctr"]["samples_per_s"], row["ratio"])
            rounds.append(row)
        out[name] = {"history_fill": history_fill(data), "rounds": rounds,
                     "din_ray_samples_per_s_median": statistics.median(
                         r["din_ray"]["samples_per_s"] for r in rounds),
                     "deepctr_samples_per_s_median": statistics.median(
                         r["deepctr"]["samples_per_s"] for r in rounds),
                     "din_ray_wall_s_median": statistics.median(
                         r["din_ray"]["wall_s"] for r in rounds),
                     "ratio_median": median(rounds, "ratio")}
        if "speedup_over_baseline" in rounds[0]:
            out[name]["speedup_over_baseline_median"] = median(rounds, "speedup_over_baseline")
            out[name]["baseline_code"] = str(args.baseline)
        progress(out)
    return out


def ray_section(paths: dict[str, Path], args) -> dict:
    out = {}
    for name in args.ray_datasets:
        local = din_ray_run(paths[name], args.epochs, [])
        ray_run = din_ray_run(paths[name], args.epochs, [], workers=2)
        out[name] = {"local": local, "workers_2": ray_run,
                     "wall_ratio_ray_over_local": ray_run["wall_s"] / local["wall_s"],
                     "load_avg": os.getloadavg()}
        log.info("%s: --local wall %.1f s, --workers 2 wall %.1f s", name, local["wall_s"],
                 ray_run["wall_s"])
    return out


def variants_section(paths: dict[str, Path], args) -> dict:
    data = paths["movielens"]
    out = {}
    for name, flags in VARIANTS.items():
        rounds = []
        for r in range(args.variant_rounds):
            pair = [("default", []), (name, flags)]
            row = {who: din_ray_run(data, args.epochs, f)
                   for who, f in (pair if r % 2 == 0 else pair[::-1])}
            row["speedup"] = row[name]["samples_per_s"] / row["default"]["samples_per_s"]
            rounds.append(row)
            log.info("variant %s round %d: %.0f/s vs default %.0f/s (x%.2f)", name, r,
                     row[name]["samples_per_s"], row["default"]["samples_per_s"],
                     row["speedup"])
        out[name] = {"flags": flags, "rounds": rounds,
                     "speedup_over_default_median": median(rounds, "speedup")}
    return out


# --- where the time goes ------------------------------------------------------------------------
COMPONENTS = {  # label -> (module attribute path, what it covers)
    "data loading": ("din_ray.train.local:LocalEnv.train_batches", "Parquet -> numpy batches"),
    "lookup": ("din_ray.embeddings.tables:EmbeddingTables.lookup", "dedup, gather (forward)"),
    "attention unit": ("din_ray.model.layers:TargetAttention.forward", "forward"),
    "Dice": ("din_ray.model.layers:Dice.forward", "forward, inside attention / MLP"),
    "MLP (top)": ("din_ray.model.layers:MLP.forward", "forward (also attention's rest)"),
    "backward": ("torch:Tensor.backward", "all backward"),
    "row-wise Adam": ("din_ray.embeddings.optim:RowWiseOptimizer.step", "incl. MBA"),
    "MBA penalty": ("din_ray.embeddings.regularization:RowPenalty.penalty", ""),
    "touched gradients": ("din_ray.embeddings.tables:EmbeddingTables.touched_gradients", ""),
    "evaluation": ("din_ray.train.evaluate:evaluate_split", "valid + test"),
    "checkpoint": ("din_ray.train.local:LocalEnv.report", ""),
    "bias prior pass": ("din_ray.train.counts:bias_prior", "one pass over train"),
    "regularizer setup": ("din_ray.train.regularizers:embedding_regularizer", ""),
}


def _resolve(spec: str):
    import importlib

    module, attr = spec.split(":")
    owner = importlib.import_module(module)
    parts = attr.split(".")
    for p in parts[:-1]:
        owner = getattr(owner, p)
    return owner, parts[-1]


@contextlib.contextmanager
def labelled(components: dict):
    """Wrap each component's function in a profiler range of its label (restored after)."""
    saved = []
    for label, (spec, _) in components.items():
        owner, name = _resolve(spec)
        original = getattr(owner, name)
        if label == "data loading":
            def wrapped(*a, _f=original, _l=label, **k):
                it = iter(_f(*a, **k))
                while True:
                    with torch.profiler.record_function(_l):
                        batch = next(it, None)
                    if batch is None:
                        return
                    yield batch
        else:
            def wrapped(*a, _f=original, _l=label, **k):
                with torch.profiler.record_function(_l):
                    return _f(*a, **k)
        saved.append((owner, name, original))
        setattr(owner, name, wrapped)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def profile_section(paths: dict[str, Path], args) -> dict:
    """One epoch of the default configuration (`run_local`), profiled per component."""
    from torch.profiler import ProfilerActivity, profile

    from din_ray.config import TrainConfig
    from din_ray.train.local import run_local

    out_dir = Path(tempfile.mkdtemp(prefix="td-prof-", dir="/tmp"))
    cfg = TrainConfig.create(data=str(paths["movielens"]), output=str(out_dir), epochs=1)
    t0 = time.perf_counter()
    with labelled(COMPONENTS), profile(activities=[ProfilerActivity.CPU]) as prof:
        result = run_local(cfg)
    wall = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    events = prof.key_averages()
    by_key = {e.key: e for e in events}
    total_us = wall * 1e6
    comps = {}
    for label, (_, note) in COMPONENTS.items():
        e = by_key.get(label)
        us = e.cpu_time_total if e is not None else 0.0
        comps[label] = {"seconds": us / 1e6, "share_of_wall": us / total_us, "note": note,
                        "calls": e.count if e is not None else 0}
    top = sorted((e for e in events if e.key not in COMPONENTS),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    ops = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count,
            "share_of_wall": e.self_cpu_time_total / total_us} for e in top]
    epoch = result["history"][-1]
    log.info("profile: wall %.1f s, train %.1f s", wall, epoch["train_seconds"])
    for label, c in comps.items():
        log.info("  %-20s %6.2f s  %5.1f %%", label, c["seconds"], 100 * c["share_of_wall"])
    for o in ops[:12]:
        log.info("  op %-40s %6.2f s", o["op"], o["self_s"])
    return {"wall_s_profiled": wall, "train_seconds_profiled": epoch["train_seconds"],
            "components": comps, "top_ops_self": ops,
            "note": "inclusive CPU time of each labelled range (nested: Dice inside attention "
                    "and MLP, MBA inside row-wise Adam); profiler overhead included"}


def matmul_rate(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """Best torch.mm GFLOP/s at `threads` threads (n × n fp32)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    torch.set_num_threads(before)
    return best


def step_flops(data: Path) -> float:
    """Matmul FLOPs per sample of one default training step (forward, backward, updates)."""
    from torch.utils.flop_counter import FlopCounterMode

    from din_ray.config import TrainConfig
    from din_ray.embeddings.optim import RowWiseOptimizer
    from din_ray.embeddings.tables import EmbeddingTables
    from din_ray.model import build_model
    from din_ray.train.forward import to_torch
    from din_ray.train.loop import train_step

    cfg = TrainConfig.create(data=str(data))
    ds = PreparedDataset.open(data)
    model = build_model(cfg.training_schema(ds.schema), cfg.model)
    tables = EmbeddingTables(model.table_specs())
    dense = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    sparse = RowWiseOptimizer(tables, "adam", lr=cfg.optim.lr)
    batch = next(iter_numpy_batches(ds.files("train"), ds.schema, cfg.optim.batch_size))
    with FlopCounterMode(display=False) as counter:
        train_step(model, tables, to_torch(batch), ds.schema.label, dense, sparse)
    return counter.get_total_flops() / len(batch["label"])


def deepctr_step_flops(data: Path) -> float:
    """Matmul FLOPs per sample of one training step of deepctr's DIN (`DeepCTRDefault`, the
    architecture `default_section` races), counted the same way as `step_flops`."""
    from torch.utils.flop_counter import FlopCounterMode

    ds = PreparedDataset.open(data)
    trainer = DeepCTRDefault(ds, "prelu", "dice", lr=1e-3)
    batch = next(iter_numpy_batches(ds.files("train"), ds.schema, 256))
    x = trainer.to_x(batch)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(x)
    return counter.get_total_flops() / len(batch["label"])


def roofline_section(paths: dict[str, Path], measured: dict | None) -> dict:
    """Matmul FLOPs per sample of both sides, the rates they reach, and what goal 1 (din-ray at
    3x deepctr's samples/s) would ask of din-ray's matmuls: `needed_for_3x_gflops`, and that as
    a share of this machine's 1-thread torch.mm rate. din-ray does fewer FLOPs per sample (it
    skips padded slots and computes the candidate's part of the attention's first layer once
    per sample), so 3x needs its matmuls to run at 3 x (its FLOPs / deepctr's) x deepctr's
    rate."""
    out = {"matmul_gflops_1_thread": matmul_rate(1), "matmul_gflops_2_threads": matmul_rate(2)}
    for name, data in paths.items():
        row = {"flops_per_sample": step_flops(data),
               "deepctr_flops_per_sample": deepctr_step_flops(data)}
        if measured and name in measured:
            rate = measured[name]["din_ray_samples_per_s_median"]
            theirs = measured[name]["deepctr_samples_per_s_median"]
            row["achieved_gflops"] = row["flops_per_sample"] * rate / 1e9
            row["share_of_1_thread"] = row["achieved_gflops"] / out["matmul_gflops_1_thread"]
            row["share_of_2_threads"] = row["achieved_gflops"] / out["matmul_gflops_2_threads"]
            row["deepctr_achieved_gflops"] = row["deepctr_flops_per_sample"] * theirs / 1e9
            row["needed_for_3x_gflops"] = 3 * theirs * row["flops_per_sample"] / 1e9
            row["needed_for_3x_share_of_1_thread"] = (row["needed_for_3x_gflops"]
                                                      / out["matmul_gflops_1_thread"])
        out[name] = row
    log.info("roofline: %s", out)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path, default=Path("/tmp/train-default"))
    p.add_argument("--synthetic-rows", type=int, default=100_000)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--datasets", nargs="+", default=["movielens", "synthetic", "synthetic_full"])
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (each evaluated)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variant-rounds", type=int, default=1)
    p.add_argument("--ray-datasets", nargs="+", default=["movielens"])
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout (e.g. main before this work) run through the same "
                        "command on the bundled data in each round of the default section")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the deepctr side")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    paths = ensure_datasets(args.data_root, args.synthetic_rows, args.datasets)
    results: dict = {
        "command": "python benchmarks/train_default.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "epochs": args.epochs, "torch": torch.__version__,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                    "load_avg_start": os.getloadavg()},
        "datasets": {k: {"path": str(v), "rows": PreparedDataset.open(v).manifest["rows"]}
                     for k, v in paths.items()}}
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    def partial_default(out: dict) -> None:
        results["default"] = out
        write_results(args, previous, results)

    runs = {"default": lambda: default_section(paths, args, partial_default),
            "profile": lambda: profile_section(paths, args),
            "roofline": lambda: roofline_section(paths, results.get("default")),
            "variants": lambda: variants_section(paths, args),
            "ray": lambda: ray_section(paths, args)}
    for section in args.sections:  # in the order given; the file is rewritten after each
        if section in ("profile", "variants") and "movielens" not in paths:
            continue
        results[section] = runs[section]()
        write_results(args, previous, results)
    summary = {k: ({n: {kk: vv for kk, vv in v.items() if kk != "rounds"}
                    for n, v in results[k].items()} if k in ("default", "variants") else
                   results[k]) for k in results if k in SECTIONS}
    print(json.dumps(summary, indent=1, default=float)[:8000])
    return results


def write_results(args, previous: dict, results: dict) -> None:
    """Merge this run's sections so far into the results file (sections run separately
    accumulate in one file)."""
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    merged = {**previous, **results}
    merged["commands"] = [*previous.get("commands", []),
                          {"command": results["command"], "sections": args.sections,
                           "load_avg": [results["machine"]["load_avg_start"],
                                        results["machine"]["load_avg_end"]],
                           "finished": results["finished"]}]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(merged, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
