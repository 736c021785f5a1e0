"""`din-ray tune`: hyperparameter search with Ray Tune + Optuna (see din_ray.tune.run).

    din-ray tune --data runs/ml --output runs/tune --trials 12 --epochs 3
    din-ray serve --checkpoint runs/tune       # serves the best trial's best epoch
"""

from __future__ import annotations

import argparse
import json
import sys

from din_ray.cli.train import add_train_arguments, config_from_args
from din_ray.tune.run import NoResultError, TuneSettings, run_tune, summarize_tune


def _tune(args: argparse.Namespace) -> int:
    settings = TuneSettings(
        output=args.output, space=args.space, trials=args.trials,
        workers_per_trial=args.workers_per_trial, max_concurrent=args.max_concurrent,
        seed=args.seed, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        startup_trials=args.startup_trials, default_trial=not args.no_default_trial,
        storage_path=args.storage_path, name=args.name, address=args.address,
        num_cpus=args.num_cpus)
    base = config_from_args(args, workers=args.workers_per_trial,
                            cpus_per_worker=args.cpus_per_worker, use_gpu=args.use_gpu)
    try:
        result = (summarize_tune if args.summarize else run_tune)(settings, base)
    except NoResultError as e:
        print(f"din-ray tune: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: result[k] for k in ("trial_id", "config", "metrics", "statuses",
                                              "checkpoint")}, indent=2))
    print("wrote " + ", ".join(result["paths"].values()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = TuneSettings(output="-")
    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune (Optuna TPE + ASHA)")
    add_train_arguments(p)  # the fixed training options; the space overrides what it searches
    p.add_argument("--output", required=True,
                   help="directory for trials.csv, best.json, best_checkpoint/, tune.png; "
                        "rerunning the same command resumes the search there")
    p.add_argument("--space", default=d.space,
                   help="search space: a YAML file, or a packaged space's name (default, "
                        "extended: din_ray/resources/tune_spaces/)")
    p.add_argument("--trials", type=int, default=d.trials, help="configurations to try")
    p.add_argument("--workers-per-trial", type=int, default=d.workers_per_trial,
                   help="Ray Train workers of each trial")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs each training worker requests")
    p.add_argument("--use-gpu", action="store_true",
                   help="one GPU per training worker of every trial")
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                   help="trials at once (0 = as many as the cluster's CPUs hold)")
    p.add_argument("--grace-period", type=int, default=d.grace_period,
                   help="epochs before ASHA may stop a trial")
    p.add_argument("--reduction-factor", type=int, default=d.reduction_factor,
                   help="ASHA's η: a trial goes on past a rung only in the top 1/η")
    p.add_argument("--startup-trials", type=int, default=d.startup_trials,
                   help="random trials before TPE models the results (0 = a third of --trials)")
    p.add_argument("--no-default-trial", action="store_true",
                   help="do not spend the first trial on the untuned defaults")
    p.add_argument("--storage-path", default=d.storage_path,
                   help="Ray storage (local dir or s3:// / gs:// URI); default OUTPUT/ray")
    p.add_argument("--name", default=d.name, help="experiment name under the storage")
    p.add_argument("--address", default=d.address,
                   help="Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=d.num_cpus,
                   help="logical CPUs of a local Ray (0 = enough for the concurrent trials)")
    p.add_argument("--summarize", action="store_true",
                   help="only write the outputs from the trials so far (an interrupted search, "
                        "or one still running); rerun without it to resume the search")
    p.set_defaults(func=_tune)
