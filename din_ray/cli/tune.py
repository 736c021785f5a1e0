"""`din-ray tune`: hyperparameter search with Ray Tune + Optuna (see din_ray.tune.run).

    din-ray tune --data runs/ml --output runs/tune --trials 12 --epochs 3
    din-ray serve --checkpoint runs/tune       # serves the best trial's best epoch
"""

from __future__ import annotations

import argparse
import json
import sys

from din_ray.cli.train import add_train_arguments, config_from_args
from din_ray.config import (
    LEARNING_KNOBS,
    add_arguments,
    add_settings_arguments,
    settings_from_args,
)
from din_ray.tune.results import NoResultError
from din_ray.tune.run import TuneSettings, run_tune, summarize_tune

# What a search fixes for every trial: the learning knobs and the workers' resources (where the
# trials' runs are stored and which cluster they join are the search's own settings).
TRIAL_KNOBS = (*LEARNING_KNOBS, "cpus_per_worker", "use_gpu")


def _tune(args: argparse.Namespace) -> int:
    settings = settings_from_args(TuneSettings, args)
    base = config_from_args(args, TRIAL_KNOBS, workers=args.workers_per_trial)
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
    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune (Optuna TPE + ASHA)")
    add_train_arguments(p)  # the fixed training options; the space overrides what it searches
    add_settings_arguments(p, TuneSettings, required={"output"})
    add_arguments(p, ("cpus_per_worker", "use_gpu"))
    p.add_argument("--summarize", action="store_true",
                   help="only write the outputs from the trials so far (an interrupted search, "
                        "or one still running); rerun without it to resume the search")
    p.set_defaults(func=_tune)
