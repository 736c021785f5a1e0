"""`din-ray reproduce`: the paper's model and regularizer comparison on prepared data."""

from __future__ import annotations

import argparse
import json

from din_ray.paper.reproduce import ENTRIES, REG_ORDER, ReproduceConfig, reproduce


def _names(text: str) -> tuple[str, ...]:
    return tuple(n for n in text.split(",") if n)


def _setting(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, true, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _reproduce(args: argparse.Namespace) -> int:
    train = {k: v for k, v in (("lr", args.lr), ("lam", args.lam), ("batch_size", args.batch_size),
                               ("embedding_dim", args.embedding_dim)) if v is not None}
    train.update(dict(args.set))
    cfg = ReproduceConfig(
        data=args.data, output=args.output, seeds=args.seeds, models=args.models, regs=args.regs,
        model_reg=args.model_reg, cross=args.cross,
        epochs=args.epochs if args.epochs is not None else (2 if args.quick else 4),
        patience=args.patience, filter_top_k=args.filter_top_k, jobs=args.jobs, quick=args.quick,
        report_only=args.report_only, train=train)
    result = reproduce(cfg)
    print(json.dumps(result["paths"], indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="train the paper's models x regularizers x seeds and "
                                         "write its tables and figures")
    p.add_argument("--data", required=True, help="prepared data directory (din-ray prepare ...)")
    p.add_argument("--output", required=True, help="directory for runs/, table.md/.csv, *.png")
    p.add_argument("--seeds", type=int, default=3, help="runs per cell (tables show mean ± std)")
    p.add_argument("--models", type=_names, default=tuple(ENTRIES),
                   help=f"comma-separated Table 3 rows from {','.join(ENTRIES)}")
    p.add_argument("--regs", type=_names, default=REG_ORDER,
                   help=f"comma-separated Table 4 regularizers from {','.join(REG_ORDER)}")
    p.add_argument("--model-reg", default="none", help="regularizer of the Table 3 runs")
    p.add_argument("--cross", action="store_true",
                   help="train every model with every regularizer (not just the two tables)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4; quick 2)")
    p.add_argument("--patience", type=int, default=0,
                   help="early stop after N epochs without validation gain (0 = off)")
    p.add_argument("--filter-top-k", type=int, default=None,
                   help="ids kept by --reg filter (default: a quarter of the largest table)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lam", type=float, default=None, help="λ of MBA, DiFacto and L2")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--embedding-dim", type=int, default=None)
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrainConfig field for every run, e.g. --set bias_init=zero")
    p.add_argument("--quick", action="store_true", help="tiny widths and batches, for tests")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: tables and figures from the runs finished so far (and "
                        "unfinished ones from their latest epoch checkpoint, marked †)")
    p.set_defaults(func=_reproduce)
