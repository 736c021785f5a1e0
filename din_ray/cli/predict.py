"""`din-ray predict`: score a prepared split with a checkpoint (see din_ray.predict)."""

from __future__ import annotations

import argparse
import json

from din_ray.predict import ENGINES, PredictConfig, predict


def _predict(args: argparse.Namespace) -> int:
    cfg = PredictConfig(checkpoint=args.checkpoint, data=args.data, output=args.output,
                        split=args.split, engine=args.engine, batch_size=args.batch_size,
                        ray_above_mb=args.ray_above_mb, actors=args.actors,
                        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                        address=args.address, overwrite=args.overwrite)
    print(json.dumps(predict(cfg)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = PredictConfig(checkpoint="", data="", output="")
    p = sub.add_parser("predict", help="write the predicted CTR of every sample of a split")
    p.add_argument("--checkpoint", required=True, help="checkpoint or train output directory")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--split", default=d.split, choices=("train", "valid", "test"))
    p.add_argument("--output", required=True, help="directory of Parquet files to write")
    p.add_argument("--engine", default=d.engine, choices=ENGINES,
                   help="local: this process; ray: Ray Data actor pool; auto: ray for splits "
                        "of at least --ray-above-mb")
    p.add_argument("--ray-above-mb", type=float, default=d.ray_above_mb)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--actors", type=int, default=d.actors, help="Ray Data scoring actors")
    p.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor,
                   help="GPUs per scoring actor (0 = CPU actors)")
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor)
    p.add_argument("--address", default=d.address, help="Ray cluster address (or $RAY_ADDRESS)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.set_defaults(func=_predict)
