"""`din-ray continual`, `din-ray export` and `din-ray synthetic-days`.

    din-ray synthetic-days --output raw --days 3 --drift 0.2 --impressions 20000
    din-ray continual --spec raw/day-01/log_spec.yaml --output runs/cont --day day-01
    din-ray continual --spec raw/day-02/log_spec.yaml --output runs/cont --day day-02 --margin 0.002
    din-ray export --checkpoint runs/cont/champions/day-02 --output exported/day-02
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _continual(args: argparse.Namespace) -> int:
    from din_ray.cli.train import config_from_args
    from din_ray.continual import DayConfig, run_day

    train = config_from_args(args, output="unused", workers=args.workers).to_dict()
    for key in ("data", "output", "init_from"):
        train.pop(key)
    day = args.day or Path(args.spec).resolve().parent.name
    record = run_day(DayConfig(output=str(args.output), day=day, spec=str(args.spec),
                               margin=args.margin, train=train, from_scratch=args.from_scratch,
                               executor=args.executor))
    cand, champ = record["candidate"], record["champion"]
    print(json.dumps({"day": day, "promoted": record["promoted"], "reason": record["reason"],
                      "candidate_gauc": cand["gauc"],
                      "champion_gauc": champ["gauc"] if champ else None,
                      "champion": record["champion_checkpoint"]}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from din_ray.serve.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {out} (load with: python {out / 'load.py'})")
    return 0


def _synthetic_days(args: argparse.Namespace) -> int:
    from din_ray.data.logs.synthetic import write_synthetic_days

    specs = write_synthetic_days(args.output, args.days, args.impressions, drift=args.drift,
                                 items=args.items, categories=args.categories, users=args.users,
                                 seed=args.seed)
    for spec in specs:
        print(spec)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from din_ray.cli.train import add_train_arguments

    p = sub.add_parser("continual", help="one day of continual training: prepare --vocab-from, "
                                         "train --init-from the champion, gate, promote")
    add_train_arguments(p)
    p.set_defaults(data="-")  # the day's data is prepared here
    for action in p._actions:
        if action.dest == "data":
            action.required = False
            action.help = argparse.SUPPRESS
    p.add_argument("--spec", type=Path, required=True, help="the day's log spec YAML")
    p.add_argument("--output", type=Path, required=True, help="continual output directory")
    p.add_argument("--day", default=None, help="day name (default: the spec's directory name)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="GAUC the candidate must gain over the champion to be promoted")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the day without --init-from (baseline)")
    p.add_argument("--workers", type=int, default=1, help=">1: Ray Train workers")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="preparation: in this process, or the Ray Data pipeline")
    p.set_defaults(func=_continual)

    p = sub.add_parser("export", help="a checkpoint as a torch.export program + vocabularies, "
                                      "loadable with torch alone")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_export)

    p = sub.add_parser("synthetic-days", help="raw synthetic logs of N consecutive days with "
                                              "drifting ads")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--drift", type=float, default=0.2, help="share of ads replaced each day")
    p.add_argument("--impressions", type=int, default=20_000, help="per day")
    p.add_argument("--items", type=int, default=1000, help="ads running on any day")
    p.add_argument("--categories", type=int, default=20)
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synthetic_days)
