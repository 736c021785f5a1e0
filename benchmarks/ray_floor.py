"""Ray's floor under a 2-worker training run: what `din-ray train --workers 2` pays before and
after its first batch however small the job (issue 15, goal 2).

Each stage runs in a fresh Python process, as the CLI does, and is timed from the process's
start to its exit:

  * `import`      : `import din_ray.cli, torch` and nothing else (both kinds of run pay it);
  * `ray`         : + a local Ray started and stopped as `din-ray train --workers 2` starts
                    it (`din_ray.ray_session.connect`, no dashboard, the same logical CPUs);
  * `trainer`     : + a `TorchTrainer` with the run's scaling config (2 workers, 1 CPU each)
                    whose workers import din_ray's worker module and all-reduce one tensor over
                    gloo, then return: Ray Train's controller, placement group and worker group;
  * `trainer_ddp` : + in each worker what the training loop builds before its first batch
                    and that is not data: a DDP-wrapped model and a dense Adam step.

Beside them, `din-ray train --local` and `--workers 2` on the bundled data (1 epoch), alternated
with the stages round by round. Goal 2 asks `--workers 2` to take at most 1.3x `--local`; the
floor says how much of that budget Ray takes before any sample is trained.

    PYTHONPATH=$PWD python benchmarks/ray_floor.py --rounds 3

Writes benchmarks/results/ray_floor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "ray_floor.json"
RUN_CLI = "import sys; from din_ray.cli import main; sys.argv[0] = 'din-ray'; sys.exit(main())"

IMPORT = "import din_ray.cli, torch\n"
RAY = IMPORT + """
import ray
from din_ray.ray_session import connect
connect(None, 4, dashboard=False)  # what run_ray's _connect asks for 2 workers at 1 CPU
"""
TRAINER = RAY + """
from ray.train import ScalingConfig, RunConfig
from ray.train.torch import TorchTrainer

def work(config):
    import torch
    import torch.distributed as dist
    import din_ray.train.distributed  # noqa: F401  (the worker module a real run imports)
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == 2.0
    if config["ddp"]:
        import ray.train.torch
        from torch import nn
        from din_ray.train.loop import dense_adam
        model = ray.train.torch.prepare_model(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 1)))
        opt = dense_adam([p for p in model.parameters()], 1e-3)
        model(torch.ones(2, 8)).sum().backward()
        opt.step()

TorchTrainer(work, train_loop_config={"ddp": DDP},
             scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
             run_config=RunConfig(name="floor", storage_path=STORAGE)).fit()
ray.shutdown()
"""


def stage_code(stage: str, storage: Path) -> str:
    if stage == "import":
        return IMPORT
    if stage == "ray":
        return RAY + "ray.shutdown()\n"
    return (TRAINER.replace("DDP", str(stage == "trainer_ddp"))
            .replace("STORAGE", repr(str(storage))))


def timed(command: list[str], env: dict) -> float:
    """Wall seconds of a fresh process running `command` (raises on failure)."""
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


STAGES = ("import", "ray", "trainer", "trainer_ddp")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-train", action="store_true", help="the stages only")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="din-ray-floor-"))
    env = {**os.environ, "RAY_TMPDIR": str(root / "r"), "RAY_memory_monitor_refresh_ms": "0"}
    data = root / "ml"
    if not args.skip_train:
        timed([sys.executable, "-c", RUN_CLI, "prepare", "movielens", "--output", str(data)],
              env)
    train = ["train", "--data", str(data), "--epochs", "1", "--patience", "0"]
    seconds: dict[str, list[float]] = {}
    for r in range(args.rounds):
        order = list(STAGES) + ([] if args.skip_train else ["local", "workers_2"])
        if r % 2:
            order.reverse()  # no side always runs first (a warm page cache, the load)
        for name in order:
            if name == "local":
                cmd = [sys.executable, "-c", RUN_CLI, *train, "--local", "--output",
                       str(root / f"local{r}")]
            elif name == "workers_2":
                cmd = [sys.executable, "-c", RUN_CLI, *train, "--workers", "2", "--output",
                       str(root / f"ray{r}")]
            else:
                cmd = [sys.executable, "-c", stage_code(name, root / f"st{r}")]
            seconds.setdefault(name, []).append(timed(cmd, env))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items()),
              flush=True)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    result = {"rounds": args.rounds, "seconds": seconds, "median_s": median,
              "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at end"}
    if not args.skip_train:
        budget = 1.3 * median["local"]
        result.update(ratio_workers_2_to_local=median["workers_2"] / median["local"],
                      budget_1_3x_local_s=budget,
                      floor_share_of_budget=median["trainer_ddp"] / budget)
        print(f"--workers 2 / --local: {result['ratio_workers_2_to_local']:.2f}x; 1.3x local = "
              f"{budget:.1f} s, of which Ray's floor (trainer_ddp) {median['trainer_ddp']:.1f} s")
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.rename(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
