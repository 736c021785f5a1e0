"""The device check (issue 14): one command on a machine with one GPU, about 5 minutes.

    python benchmarks/gpu_check.py                      # on the GPU machine
    python benchmarks/gpu_check.py --dry-run-cpu        # the same script on the CPU, tiny sizes

Sections (all by default; `--sections` picks some):

  tests       the GPU-marked tests (`pytest -m gpu tests/train/test_device.py`), in a subprocess;
  ray_losses  a 1-worker `TorchTrainer` run (`din_ray.train.distributed.run_ray`) with
              use_gpu=True on a small synthetic set, and the same run on a CPU worker: their
              first 50 per-step losses (fp32) must agree within --loss-tol (TF32 matmuls and
              GPU reduction order make them differ in the last digits, not more);
  throughput  training samples/s of the device-aware step (`din_ray.train.loop.train_step`: host
              batch -> pinned copy -> lookup, DIN, dense Adam, row-wise Adam) at batch 8k, 32k
              and 64k, fp32 and bf16, at the benchmark's architecture (history 50, embedding 16
              per field, attention 80-40, MLP 200-80; `benchmarks.common.Arch`), with the peak
              GPU memory of each;
  serving     in-process scoring latency (`ServedModel` on the device: parse + score) of one
              request with 200 candidates and a full history, median and p99.

Writes --output (JSON) and prints a summary. With --dry-run-cpu every section runs on the CPU
with tiny sizes (the GPU run of ray_losses becomes a second CPU run), which tests/test_gpu_check
runs so that the script works before it ever meets a GPU. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Arch, load_batches  # noqa: E402
from din_ray.config import TrainConfig  # noqa: E402
from din_ray.data.format import PreparedDataset  # noqa: E402
from din_ray.embeddings.optim import RowWiseOptimizer  # noqa: E402
from din_ray.embeddings.tables import EmbeddingTables  # noqa: E402
from din_ray.model import ModelConfig, build_model  # noqa: E402
from din_ray.train.forward import enable_tf32, to_torch  # noqa: E402
from din_ray.train.local import run_local  # noqa: E402
from din_ray.train.loop import STEP_LOSSES_KEY, train_step  # noqa: E402

SECTIONS = ("tests", "ray_losses", "throughput", "serving")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of a run: the real check, or the CPU dry run."""

    batch_sizes: tuple[int, ...]
    throughput_rows: int  # synthetic rows for the throughput batches
    steps: int  # timed steps per configuration (after `warmup`)
    warmup: int
    loss_rows: int  # synthetic rows of the ray_losses set
    loss_batch: int
    loss_steps: int
    candidates: int
    serve_repeats: int


GPU_SIZES = Sizes(batch_sizes=(8192, 32768, 65536), throughput_rows=400_000, steps=20,
                  warmup=3, loss_rows=20_000, loss_batch=256, loss_steps=50, candidates=200,
                  serve_repeats=100)
CPU_SIZES = Sizes(batch_sizes=(64, 128), throughput_rows=1_000, steps=2, warmup=1,
                  loss_rows=1_000, loss_batch=64, loss_steps=10, candidates=200,
                  serve_repeats=5)


def synthetic(work: Path, rows: int) -> PreparedDataset:
    """The synthetic set of `rows` rows under `work`, generated once (sections share it)."""
    from din_ray.data.synthetic import prepare_synthetic

    path = work / f"synthetic-{rows}"
    if not (path / "schema.json").exists():
        prepare_synthetic(path, rows=rows, max_history=50, embedding_dim=16)
    return PreparedDataset.open(path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- sections -----------------------------------------------------------------------------------
def run_gpu_tests(dry_run: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_device.py")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr[-500:]
    # Skipped (no GPU) is the expected outcome of the dry run only.
    ok = proc.returncode == 0 and (dry_run or "skipped" not in summary)
    return {"ok": ok, "returncode": proc.returncode, "summary": summary,
            "seconds": round(time.perf_counter() - t0, 1)}


def run_ray_losses(work: Path, sizes: Sizes, dry_run: bool, tol: float) -> dict:
    """First `loss_steps` losses of a 1-worker Ray Train run on the GPU and on the CPU."""
    import ray

    from din_ray.ray_session import connect

    data = synthetic(work, sizes.loss_rows)
    losses = {}
    # One local Ray for both runs (run_ray joins it); it finds the machine's GPUs itself.
    # Its own short temp dir (unix socket paths are limited to about 100 characters).
    connected = connect(None, 4, temp_dir=tempfile.mkdtemp(prefix="ray-gc", dir="/tmp"))
    try:
        for name, use_gpu in (("gpu", not dry_run), ("cpu", False)):
            losses[name] = _ray_run(work, data, sizes, name, use_gpu)
    finally:
        if connected:
            ray.shutdown()
    a, b = np.array(losses["gpu"]["losses"]), np.array(losses["cpu"]["losses"])
    n = min(len(a), len(b))
    diff = float(np.abs(a[:n] - b[:n]).max()) if n else float("inf")
    return {"ok": n >= sizes.loss_steps and diff <= tol, "steps_compared": n,
            "max_abs_diff": diff, "tolerance": tol, **{f"{k}_run": v for k, v in losses.items()}}


def _ray_run(work: Path, data: PreparedDataset, sizes: Sizes, name: str, use_gpu: bool) -> dict:
    """One epoch on one Ray Train worker; its per-step losses from STEP_LOSSES_KEY's file."""
    from din_ray.train.distributed import run_ray

    log_file = work / f"losses-{name}.jsonl"
    log_file.unlink(missing_ok=True)
    cfg = TrainConfig.create(data=str(data.root), output=str(work / f"ray-{name}"), epochs=1,
                      batch_size=sizes.loss_batch, patience=0, use_gpu=use_gpu,
                      run_name=f"gpu-check-{name}", cpus_per_worker=1,
                      extra={STEP_LOSSES_KEY: str(log_file)})
    t0 = time.perf_counter()
    run_ray(cfg)
    first = json.loads(log_file.read_text().splitlines()[0])[:sizes.loss_steps]
    return {"losses": first, "seconds": round(time.perf_counter() - t0, 1)}


def run_throughput(work: Path, sizes: Sizes, device: torch.device, arch: Arch) -> dict:
    data = synthetic(work, sizes.throughput_rows)
    schema = data.schema.with_embedding_dim(arch.embedding_dim)
    largest = max(sizes.batch_sizes)
    pool = load_batches(data.root, largest, max(1, sizes.throughput_rows * 8 // 10 // largest))
    out = []
    for precision in ("fp32", "bf16"):
        for batch_size in sizes.batch_sizes:
            torch.manual_seed(0)
            model = build_model(schema, ModelConfig(
                model="din", activation=arch.activation, attention_hidden=arch.attention_hidden,
                mlp_hidden=arch.mlp_hidden, ad_bias=False)).to(device)
            tables = EmbeddingTables(model.table_specs(), init_std=arch.init_std).to(device)
            dense_opt = torch.optim.Adam(model.parameters(), lr=arch.lr)
            sparse_opt = RowWiseOptimizer(tables, "adam", lr=arch.lr)
            batches = [{k: v[lo:lo + batch_size] for k, v in b.items()}
                       for b in pool for lo in range(0, largest, batch_size)]
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)

            def step(i: int, model=model, tables=tables, dense_opt=dense_opt,
                     sparse_opt=sparse_opt, batches=batches, precision=precision):
                batch = to_torch(batches[i % len(batches)], device)
                return train_step(model, tables, batch, schema.label, dense_opt, sparse_opt,
                                  None, precision)

            for i in range(sizes.warmup):
                step(i)
            _sync(device)
            t0 = time.perf_counter()
            for i in range(sizes.steps):
                loss = step(sizes.warmup + i)
            _sync(device)
            seconds = time.perf_counter() - t0
            row = {"precision": precision, "batch_size": batch_size,
                   "samples_per_s": round(batch_size * sizes.steps / seconds),
                   "ms_per_step": round(1e3 * seconds / sizes.steps, 2),
                   "last_loss": float(loss.detach()),
                   "peak_gpu_memory_gb": (round(torch.cuda.max_memory_allocated(device) / 2**30,
                                                3) if device.type == "cuda" else None)}
            out.append(row)
            print(f"  {precision} batch {batch_size}: {row['samples_per_s']:,} samples/s",
                  flush=True)
    return {"ok": all(np.isfinite(r["last_loss"]) for r in out), "runs": out}


def run_serving(work: Path, sizes: Sizes, device: torch.device, arch: Arch) -> dict:
    """Latency of parse + score of one 200-candidate request, model on `device`."""
    from benchmarks.serve_latency import make_bodies
    from din_ray.serve.scoring import ServedModel

    # The CPU worker's checkpoint of ray_losses (TrainConfig's defaults are the benchmark
    # architecture with Dice) when that section ran; checkpoints are device-independent.
    checkpoint = work / "ray-cpu" / "checkpoint"
    if not checkpoint.exists():
        cfg = TrainConfig.create(data=str(synthetic(work, sizes.loss_rows).root),
                          output=str(work / "serve-model"), epochs=1, batch_size=sizes.loss_batch,
                          embedding_dim=arch.embedding_dim, attention_hidden=arch.attention_hidden,
                          mlp_hidden=arch.mlp_hidden)
        run_local(cfg)
        checkpoint = Path(cfg.output) / "checkpoint"
    served = ServedModel.load(checkpoint, device=device)
    raw = [json.dumps(b).encode() for b in
           make_bodies(served.path, 4, sizes.candidates, seed=0)]
    for body in raw:  # warm-up
        served.scorer.score([served.parser.parse_body(body)])
    times = []
    for i in range(sizes.serve_repeats):
        t0 = time.perf_counter()
        served.scorer.score([served.parser.parse_body(raw[i % len(raw)])])  # .tolist() syncs
        times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return {"ok": True, "device": str(device), "candidates": sizes.candidates,
            "median_ms": round(statistics.median(times), 3),
            "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3)}


# --- driver -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="run every section on the CPU with tiny sizes")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" /
                   "gpu_check.json")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: temp)")
    p.add_argument("--loss-tol", type=float, default=5e-3,
                   help="largest |loss_gpu - loss_cpu| accepted over the compared steps")
    args = p.parse_args(argv)

    if not args.dry_run_cpu and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run-cpu", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    sizes = CPU_SIZES if args.dry_run_cpu else GPU_SIZES
    if device.type == "cuda":
        enable_tf32()
    arch = Arch()
    result: dict = {"dry_run_cpu": args.dry_run_cpu, "device": str(device),
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "arch": {"history": 50, "embedding_dim": arch.embedding_dim,
                             "attention_hidden": arch.attention_hidden,
                             "mlp_hidden": arch.mlp_hidden, "activation": arch.activation},
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="din-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runners = {
            "tests": lambda: run_gpu_tests(args.dry_run_cpu),
            "ray_losses": lambda: run_ray_losses(work, sizes, args.dry_run_cpu, args.loss_tol),
            "throughput": lambda: run_throughput(work, sizes, device, arch),
            "serving": lambda: run_serving(work, sizes, device, arch),
        }
        for name in args.sections:
            print(f"[{name}]", flush=True)
            t0 = time.perf_counter()
            try:
                result[name] = runners[name]()
            except Exception as e:  # record and go on: one failed section must not hide the rest
                result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            result[name]["section_seconds"] = round(time.perf_counter() - t0, 1)
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    result["ok"] = all(result[n]["ok"] for n in args.sections)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.output.with_name(f".{args.output.name}.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.output)
    print(summary(result, args.sections))
    print(f"wrote {args.output}")
    return 0 if result["ok"] else 1


def summary(result: dict, sections: list[str]) -> str:
    lines = [f"gpu_check on {result['gpu'] or result['device']} "
             f"({'dry run' if result['dry_run_cpu'] else 'real'}), "
             f"{result['total_seconds']} s: {'OK' if result['ok'] else 'FAILED'}"]
    for name in sections:
        r = result[name]
        head = f"  {name:<11} {'ok' if r['ok'] else 'FAILED'}"
        if "error" in r:
            lines.append(f"{head}  {r['error']}")
        elif name == "tests":
            lines.append(f"{head}  {r['summary']}")
        elif name == "ray_losses":
            lines.append(f"{head}  {r['steps_compared']} steps, max |diff| "
                         f"{r['max_abs_diff']:.2e} (tol {r['tolerance']:.0e})")
        elif name == "throughput":
            lines.append(head)
            for row in r["runs"]:
                mem = row["peak_gpu_memory_gb"]
                lines.append(f"    {row['precision']} batch {row['batch_size']:>6}: "
                             f"{row['samples_per_s']:>12,} samples/s"
                             + (f", peak {mem} GB" if mem is not None else ""))
        elif name == "serving":
            lines.append(f"{head}  {r['candidates']} candidates: median {r['median_ms']} ms, "
                         f"p99 {r['p99_ms']} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
