"""`din-ray train` and `din-ray evaluate`."""

from __future__ import annotations

import argparse
import json

from din_ray.embeddings.regularization import REG_FORMS, REGULARIZERS
from din_ray.model import model_names
from din_ray.model.layers import ACTIVATIONS
from din_ray.train.loop import PRECISIONS, TrainConfig, evaluate_checkpoint, run_local


def _widths(text: str) -> tuple[int, ...]:
    return tuple(int(w) for w in text.split(",") if w)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Training options shared by `train`, `tune` and `reproduce`."""
    d = TrainConfig(data="")
    p.add_argument("--data", required=True, help="prepared data directory (din-ray prepare ...)")
    p.add_argument("--model", default=d.model, choices=model_names())
    p.add_argument("--activation", default=d.activation, choices=ACTIVATIONS)
    p.add_argument("--attention-activation", default=d.attention_activation,
                   choices=("", *ACTIVATIONS), help="the attention unit's ('' = --activation)")
    p.add_argument("--dice-momentum", type=float, default=d.dice_momentum,
                   help="Dice's moving-average weight after its first 1/momentum batches")
    p.add_argument("--zero-logit", type=int, choices=(0, 1), default=int(d.zero_logit),
                   help="1: the MLP's logit layer starts at zero (the logit is the ad bias)")
    p.add_argument("--init-std", type=float, default=d.init_std,
                   help="standard deviation of the initial embedding rows")
    p.add_argument("--reg", default=d.reg, choices=REGULARIZERS,
                   help="regularizer (paper §6.5; see din_ray.embeddings.regularization)")
    p.add_argument("--filter-top-k", type=int, default=d.filter_top_k,
                   help="--reg filter: ids kept per table, the most frequent")
    p.add_argument("--id-dropout", type=float, default=d.id_dropout,
                   help="--reg dropout: share of each training sample's ids discarded")
    p.add_argument("--lam", type=float, default=d.lam,
                   help="regularization strength λ, for a global batch of 256 samples")
    p.add_argument("--reg-form", default=d.reg_form, choices=REG_FORMS,
                   help="mba/difacto/l2 applied after the optimizer's update (decoupled, as "
                        "AdamW) or added to the gradient (coupled, Eq. 7); the same under SGD")
    p.add_argument("--optimizer", default=d.optimizer, choices=("adam", "sgd"))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-decay", type=float, default=d.lr_decay, help="per-epoch factor")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--patience", type=int, default=d.patience,
                   help="early stop after N epochs without validation gain (0 = off)")
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument("--attention-hidden", type=_widths, default=d.attention_hidden)
    p.add_argument("--mlp-hidden", type=_widths, default=d.mlp_hidden)
    p.add_argument("--softmax", action="store_true", help="softmax-normalise attention weights")
    p.add_argument("--pooling", default=d.pooling, choices=("sum", "mean"))
    p.add_argument("--no-ad-bias", action="store_true", help="drop the per-id ad bias terms")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--sparse-lr", type=float, default=d.sparse_lr,
                   help="learning rate of embedding rows (0 = --lr)")
    p.add_argument("--bias-init", default=d.bias_init, choices=("popularity", "zero"),
                   help="start ad bias rows at the smoothed training click rate, or at zero")
    p.add_argument("--eval-at-start", action="store_true",
                   help="evaluate the untrained model as epoch 0, a candidate for the best")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per worker")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="bf16: the attention unit and MLP under bf16 autocast (fp32 weights)")
    p.add_argument("--init-from", default=d.init_from, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights, rows and optimizer state (its "
                        "tables may be smaller: data prepared with --vocab-from)")


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    values = dict(
        data=args.data, model=args.model, activation=args.activation, reg=args.reg, lam=args.lam,
        reg_form=args.reg_form,
        filter_top_k=args.filter_top_k, id_dropout=args.id_dropout,
        optimizer=args.optimizer, lr=args.lr, lr_decay=args.lr_decay, batch_size=args.batch_size,
        epochs=args.epochs, patience=args.patience, embedding_dim=args.embedding_dim,
        attention_hidden=args.attention_hidden, mlp_hidden=args.mlp_hidden,
        attention_softmax=args.softmax, pooling=args.pooling, ad_bias=not args.no_ad_bias,
        dropout=args.dropout, seed=args.seed, threads=args.threads, sparse_lr=args.sparse_lr,
        bias_init=args.bias_init, eval_at_start=args.eval_at_start, precision=args.precision,
        init_from=str(args.init_from or ""), attention_activation=args.attention_activation,
        dice_momentum=args.dice_momentum, zero_logit=bool(args.zero_logit),
        init_std=args.init_std)
    if getattr(args, "output", None):
        values["output"] = args.output
    if getattr(args, "workers", None):
        values["workers"] = args.workers
    values.update(overrides)
    return TrainConfig(**values)


def _train(args: argparse.Namespace) -> int:
    """`--local`: this process, one worker, no Ray. Otherwise Ray Train with `--workers` workers
    (1 by default) on the cluster at --address / $RAY_ADDRESS, or on a local Ray it starts."""
    if args.local and args.workers != 1:
        raise ValueError(f"--local trains in one process; it cannot use --workers {args.workers}")
    if args.device and not args.local:
        raise ValueError(f"--device {args.device} is for --local runs; Ray workers take a GPU "
                         "each with --use-gpu")
    cfg = config_from_args(args, storage_path=args.storage_path, run_name=args.run_name,
                           address=args.address, max_failures=args.max_failures,
                           use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                           replicate_below=args.replicate_below,
                           cache_below_mb=args.cache_below_mb, device=args.device)
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
    p.add_argument("--output", required=True, help="run directory (metrics.json, checkpoint/)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    d = TrainConfig(data="")
    p.add_argument("--storage-path", default=d.storage_path,
                   help="Ray Train storage (dir or s3:// gs:// URI); default OUTPUT/ray")
    p.add_argument("--run-name", default=d.run_name,
                   help="Ray run name; rerunning with the same name and storage resumes")
    p.add_argument("--address", default=d.address, help="Ray cluster address (or $RAY_ADDRESS)")
    p.add_argument("--max-failures", type=int, default=d.max_failures,
                   help="worker-group restarts from the latest checkpoint")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker)
    p.add_argument("--replicate-below", type=int, default=d.replicate_below,
                   help="replicate embedding tables with fewer rows; shard the others row-wise")
    p.add_argument("--cache-below-mb", type=float, default=d.cache_below_mb,
                   help="keep splits smaller than this (Parquet MB) in Ray's object store "
                        "across epochs instead of streaming them from files each epoch (0 = never)")
    p.add_argument("--local", action="store_true",
                   help="train in this process without Ray (a single worker)")
    p.add_argument("--device", default=d.device,
                   help="with --local: the torch device to train on (cuda, cuda:1); default CPU")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="recompute a checkpoint's metrics on prepared data")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.set_defaults(func=_evaluate)
