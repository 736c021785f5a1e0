"""`din-ray train` and `din-ray evaluate`."""

from __future__ import annotations

import argparse
import json

from din_ray.config import (
    EXECUTION_KNOBS,
    KNOB_SECTION,
    LEARNING_KNOBS,
    TrainConfig,
    add_arguments,
    knobs_from_args,
)
from din_ray.train.evaluate import evaluate_checkpoint
from din_ray.train.local import run_local
from din_ray.train.outputs import clear_output


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The learning knobs `train`, `tune` and `reproduce` share, generated from their
    declarations in din_ray.config (flag, type, default, help, choices)."""
    add_arguments(p, LEARNING_KNOBS, required={"data"})


def config_from_args(args: argparse.Namespace, names=tuple(KNOB_SECTION), **overrides
                     ) -> TrainConfig:
    """The TrainConfig the parsed flags of the knobs `names` describe, with `overrides`."""
    return TrainConfig.create(**{**knobs_from_args(args, names), **overrides})


def _train(args: argparse.Namespace) -> int:
    """`--local`: this process, one worker, no Ray. Otherwise Ray Train with `--workers` workers
    (1 by default) on the cluster at --address / $RAY_ADDRESS, or on a local Ray it starts."""
    if args.local and args.workers != 1:
        raise ValueError(f"--local trains in one process; it cannot use --workers {args.workers}")
    if args.device and not args.local:
        raise ValueError(f"--device {args.device} is for --local runs; Ray workers take a GPU "
                         "each with --use-gpu")
    cfg = config_from_args(args)
    if args.overwrite:
        clear_output(cfg)
    if args.local:
        result = run_local(cfg)
    else:
        from din_ray.train.distributed import run_ray  # imports Ray: only when it is used

        result = run_ray(cfg)
    print(json.dumps({k: result[k] for k in ("best_epoch", "gauc", "auc", "logloss")}))
    print(f"wrote {cfg.output}/metrics.json and {cfg.output}/checkpoint")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.data), indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on prepared data")
    add_train_arguments(p)
    add_arguments(p, ("output", *EXECUTION_KNOBS), required={"output"})
    p.add_argument("--local", action="store_true",
                   help="train in this process without Ray (a single worker)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --output (and its Ray run) and start fresh; "
                        "without it a rerun of the same configuration resumes there")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="recompute a checkpoint's metrics on prepared data")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint, a train output or a tune output (as `din-ray serve`)")
    p.add_argument("--data", required=True)
    p.set_defaults(func=_evaluate)
