"""Ray's fixed costs on a small job, through the commands a user runs (issue 15, goal 2).

Side by side, on the bundled MovieLens data (`din-ray prepare movielens`):
  * the same training with `din-ray train --local` and with `--workers 2`, alternated
    (local, Ray, local, Ray, ...): ratio of wall times, goal <= 1.3;
  * a 3-trial `din-ray tune` (one worker per trial) against the sum of its three trials' configs
    run with `--local`: ratio, goal <= 1.5.

Wall time is the whole command (process start, Ray start, evaluation, checkpoint), as a user
feels it. The machine is shared, so only the ratios mean anything; each A/B pair runs under
`--lock` (an flock file, taken per pair so no hold is long), and the pairs alternate.

    PYTHONPATH=$PWD python benchmarks/ray_overhead.py --lock /tmp/heavy.lock
    PYTHONPATH=$PWD python benchmarks/ray_overhead.py --pairs 1 --skip-tune   # quicker

Writes benchmarks/results/ray_overhead.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "ray_overhead.json"
SPACE = "default"  # lam, lr, activation: each trial is a --local command too
# `din-ray ARGS` with this interpreter and the PYTHONPATH given (the console script would take
# whichever din_ray is installed).
RUN_CLI = "import sys; from din_ray.cli import main; sys.argv[0] = 'din-ray'; sys.exit(main())"


@contextlib.contextmanager
def locked(path: str):
    """Hold the shared flock `path` (no-op when empty) so heavy runs do not overlap."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def din_ray(args: list[str], env: dict) -> float:
    """Run `din-ray ARGS` in a fresh process; its wall time in seconds (raises on failure)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, *args], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"din-ray {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return seconds


def epoch_seconds(output: Path) -> float:
    """The training epochs' own seconds in a run's metrics.json (evaluation excluded): what is
    left of the wall time is the run's fixed cost, a figure less exposed to a load spike that
    slows one run's epoch and not the other's."""
    return sum(h["train_seconds"] for h in json.loads((output / "metrics.json").read_text())
               ["history"])


def trial_timings(tune_output: Path) -> list[dict]:
    """Each trial's time as Tune recorded it (OUTPUT/ray/tune/<trial>/result.json, one line per
    epoch): from the trial function's start to its last report, and its training epochs' share.
    What the search's wall time holds beyond these is Ray's start, the trials' actor starts and
    the outputs."""
    out = []
    for path in sorted((tune_output / "ray" / "tune").glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out.append({"trial_id": rows[-1]["trial_id"], "epochs": len(rows),
                        "trial_s": rows[-1]["time_total_s"],
                        "epochs_s": sum(r.get("train_seconds") or 0.0 for r in rows)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--pairs", type=int, default=2, help="local/Ray pairs of the training")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--skip-tune", action="store_true")
    p.add_argument("--lock", default="", help="flock file held around each A/B pair")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="din-ray-overhead-"))
    env = {**os.environ, "RAY_TMPDIR": str(root / "r"),  # a Ray of its own (short socket paths)
           "RAY_memory_monitor_refresh_ms": "0"}
    data = root / "ml"
    din_ray(["prepare", "movielens", "--output", str(data)], env)
    train = ["train", "--data", str(data), "--epochs", str(args.epochs), "--patience", "0"]

    local_s, ray_s, local_fixed, ray_fixed, loads = [], [], [], [], []
    for i in range(args.pairs):
        with locked(args.lock):
            local_s.append(din_ray([*train, "--local", "--output", str(root / f"l{i}")], env))
            ray_s.append(din_ray([*train, "--workers", "2", "--output", str(root / f"r{i}")],
                                 env))
            loads.append(os.getloadavg())
        local_fixed.append(local_s[-1] - epoch_seconds(root / f"l{i}"))
        ray_fixed.append(ray_s[-1] - epoch_seconds(root / f"r{i}"))
        print(f"pair {i + 1}: local {local_s[-1]:.1f} s, 2 Ray workers {ray_s[-1]:.1f} s "
              f"({ray_s[-1] / local_s[-1]:.2f}x); outside the training epochs: local "
              f"{local_fixed[-1]:.1f} s, Ray {ray_fixed[-1]:.1f} s", flush=True)
    result = {"epochs": args.epochs, "local_s": local_s, "ray_2_workers_s": ray_s,
              "local_outside_epochs_s": local_fixed, "ray_outside_epochs_s": ray_fixed,
              "train_ratio": sum(ray_s) / sum(local_s), "train_goal": 1.3,
              "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at end",
              "train_load_averages": loads}
    print(f"2-worker Ray / local: {result['train_ratio']:.2f}x (goal <= 1.3)")

    if not args.skip_tune:
        out = root / "tune"
        trial_s = []
        with locked(args.lock):  # one hold: the search and its local runs back to back
            tune_s = din_ray(["tune", *train[1:], "--output", str(out), "--space", SPACE,
                              "--trials", str(args.trials), "--workers-per-trial", "1"], env)
            with open(out / "trials.csv") as f:
                trials = list(csv.DictReader(f))
            for i, t in enumerate(trials):
                trial_s.append(din_ray([*train, "--local", "--output", str(root / f"t{i}"),
                                        "--lam", t["lam"], "--lr", t["lr"],
                                        "--activation", t["activation"]], env))
        timings = trial_timings(out)
        result.update(tune_s=tune_s, trial_local_s=trial_s, tune_ratio=tune_s / sum(trial_s),
                      tune_goal=1.5, trials=args.trials, tune_trials=timings,
                      tune_load_average=os.getloadavg())
        for t in timings:
            print(f"  trial {t['trial_id']}: {t['trial_s']:.1f} s in its process "
                  f"({t['epochs']} reports), of which training epochs {t['epochs_s']:.1f} s")
        print(f"{args.trials}-trial tune {tune_s:.1f} s vs its trials --local "
              f"{' + '.join(f'{s:.1f}' for s in trial_s)} = {sum(trial_s):.1f} s: "
              f"{result['tune_ratio']:.2f}x (goal <= 1.5)")

    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
