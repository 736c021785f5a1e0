"""`din-ray prepare <source>`: raw data -> prepared Parquet + schema + counts.

    din-ray prepare movielens --output out/ml-small            # bundled ml-latest-small
    din-ray prepare movielens --input ~/ml-25m --output out/ml-25m --split time
    din-ray prepare synthetic --rows 30000 --output out/synthetic --signal 1.0
    din-ray prepare log --spec examples/log_spec.yaml --output out/logs
    din-ray prepare taobao --input data/taobao --output out/taobao
    din-ray prepare amazon --reviews reviews_Electronics_5.json.gz \
        --meta meta_Electronics.json.gz --output out/amazon
    din-ray prepare log --spec day2/log_spec.yaml --output out/day2 --vocab-from out/day1

Every source takes --vocab-from PREVIOUS_DATASET: known raw ids keep their dense ids, new ones
are appended, vocabularies never shrink (`din_ray.data.vocab_extend`).

Adding a source: write `_add_<source>(sources)` that adds a parser with `_add_common`, its own
arguments and `set_defaults(func=...)`, and list it in `SOURCES`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import din_ray

BUNDLED_MOVIELENS = Path(din_ray.__file__).parent / "bundled" / "ml-latest-small"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare", help="prepare a dataset (raw files -> Parquet, schema, id counts)",
        description=__doc__.splitlines()[0])
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for add in SOURCES:
        add(sources)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, required=True, help="prepared dataset directory")
    parser.add_argument("--max-history", type=int, default=50,
                        help="behaviour sequence length (most recent kept)")
    parser.add_argument("--valid-frac", type=float, default=0.1)
    parser.add_argument("--test-frac", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedding-dim", type=int, default=16,
                        help="embedding width recorded in the schema (training may override)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _add_vocab_from(parser)


def _add_vocab_from(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab-from", type=Path, default=None, metavar="PREVIOUS_DATASET",
                        help="extend this earlier prepared dataset's vocabularies (same schema): "
                             "known ids keep their dense ids, new ids are appended")
    parser.add_argument("--count-decay", type=float, default=None, metavar="D",
                        help="with --vocab-from: MBA counts = round(new + D * earlier) instead "
                             "of the new period's alone")


def _prepared(args: argparse.Namespace, source: str, prepare: Callable[..., Path]) -> Path:
    """Run `prepare(output, overwrite=...)`, onto --vocab-from's vocabularies when given."""
    if args.vocab_from is None:
        if args.count_decay is not None:
            raise ValueError("--count-decay needs --vocab-from")
        return prepare(args.output, overwrite=args.overwrite)
    from din_ray.data.vocab_extend import prepare_onto

    return prepare_onto(args.vocab_from, args.output, lambda tmp: prepare(tmp, overwrite=False),
                        source=source, overwrite=args.overwrite, count_decay=args.count_decay)


def _add_history_ties(parser: argparse.ArgumentParser) -> None:
    # The choices of din_ray.data.common.HISTORY_TIES (not imported: it would load numpy
    # for every command).
    parser.add_argument("--history-ties", choices=("exclude", "keep"), default="exclude",
                        help="behaviours with the sample's own timestamp: exclude (default: "
                             "histories strictly earlier, as the log pipeline) or keep those "
                             "earlier in the file")


def _common_kwargs(args: argparse.Namespace) -> dict:
    return {"max_history": args.max_history, "valid_frac": args.valid_frac,
            "test_frac": args.test_frac, "seed": args.seed, "embedding_dim": args.embedding_dim}


def _summary(source: str, out: Path) -> int:
    from din_ray.data.format import PreparedDataset

    ds = PreparedDataset.open(out)
    rows = ", ".join(f"{s} {ds.num_rows(s):,}" for s in ("train", "valid", "test"))
    print(f"prepared {source}: {rows} rows -> {out}")
    return 0


# --- sources ----------------------------------------------------------------------------------
def _add_movielens(sources: argparse._SubParsersAction) -> None:
    p = sources.add_parser("movielens", help="MovieLens ratings (paper §6.1 protocol)")
    p.add_argument("--input", type=Path, default=BUNDLED_MOVIELENS,
                   help="release directory: ratings.csv+movies.csv, ratings.dat+movies.dat or "
                        "u.data+u.item (default: the bundled ml-latest-small)")
    p.add_argument("--split", choices=("user", "time"), default="user",
                   help="user: random users per split (paper); time: each user's ratings in "
                        "time order")
    _add_common(p)
    _add_history_ties(p)
    p.set_defaults(func=_run_movielens)


def _run_movielens(args: argparse.Namespace) -> int:
    from din_ray.data.movielens import prepare_movielens

    out = _prepared(args, "movielens", lambda output, overwrite: prepare_movielens(
        args.input, output, split=args.split, history_ties=args.history_ties,
        overwrite=overwrite, **_common_kwargs(args)))
    return _summary("movielens", out)


def _add_synthetic(sources: argparse._SubParsersAction) -> None:
    p = sources.add_parser("synthetic",
                           help="generated clicks with planted diverse interests and local "
                                "activation")
    p.add_argument("--rows", type=int, default=100_000, help="samples over all splits")
    p.add_argument("--users", type=int, default=None, help="default: rows / 16")
    p.add_argument("--items", type=int, default=None, help="default: rows / 100, at least 200")
    p.add_argument("--categories", type=int, default=None,
                   help="default: items / 10, at least 20")
    p.add_argument("--interests", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"),
                   help="interest categories per user")
    p.add_argument("--signal", type=float, default=1.0,
                   help="strength of the planted effect; 0 = labels ignore the history")
    p.add_argument("--chunk-rows", type=int, default=200_000,
                   help="samples generated in memory at once")
    _add_common(p)
    p.set_defaults(func=_run_synthetic)


def _run_synthetic(args: argparse.Namespace) -> int:
    from din_ray.data.synthetic import prepare_synthetic

    out = _prepared(args, "synthetic", lambda output, overwrite: prepare_synthetic(
        output, rows=args.rows, users=args.users, items=args.items, categories=args.categories,
        interests_per_user=tuple(args.interests), signal=args.signal, chunk_rows=args.chunk_rows,
        overwrite=overwrite, **_common_kwargs(args)))
    return _summary("synthetic", out)


def _add_log(sources: argparse._SubParsersAction) -> None:
    p = sources.add_parser("log", help="impression + behaviour logs described by a YAML spec "
                                       "(Ray Data pipeline; see din_ray.data.logs.spec)")
    p.add_argument("--spec", type=Path, required=True, help="log spec YAML (examples/*.yaml)")
    p.add_argument("--output", type=Path, required=True, help="prepared dataset directory")
    _add_ray(p)
    p.set_defaults(func=_run_log)


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster to join (default: local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _add_vocab_from(p)


def _log_summary(report) -> int:
    rows = ", ".join(f"{s} {n:,}" for s, n in report.rows.items())
    print(f"prepared {report.input_rows['impressions']:,} impressions and "
          f"{report.input_rows['behaviors']:,} behaviours: {rows} rows -> {report.output} "
          f"({report.malformed:,} malformed rows skipped)")
    return 0


def _run_log(args: argparse.Namespace) -> int:
    from din_ray.data.logs.pipeline import prepare_logs

    return _log_summary(prepare_logs(args.spec, args.output, overwrite=args.overwrite,
                                     address=args.address, num_cpus=args.num_cpus,
                                     vocab_from=args.vocab_from, count_decay=args.count_decay))


def _add_taobao(sources: argparse._SubParsersAction) -> None:
    p = sources.add_parser("taobao", help="Taobao display-ad click log (raw_sample, ad_feature, "
                                          "user_profile, behavior_log CSVs)")
    p.add_argument("--input", type=Path, required=True, help="directory of the four CSV files")
    p.add_argument("--output", type=Path, required=True, help="prepared dataset directory")
    p.add_argument("--max-history", type=int, default=50)
    p.add_argument("--valid-frac", type=float, default=0.1, help="share of impressions, by time")
    p.add_argument("--test-frac", type=float, default=0.1)
    p.add_argument("--valid-start", type=int, default=None,
                   help="timestamp cutoff instead of fractions (with --test-start)")
    p.add_argument("--test-start", type=int, default=None)
    p.add_argument("--min-count", type=int, default=1, help="rarer ids become OOV")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    _add_ray(p)
    p.set_defaults(func=_run_taobao)


def _run_taobao(args: argparse.Namespace) -> int:
    from din_ray.data.logs.taobao import prepare_taobao

    return _log_summary(prepare_taobao(
        args.input, args.output, overwrite=args.overwrite, address=args.address,
        num_cpus=args.num_cpus, max_history=args.max_history, valid=args.valid_frac,
        test=args.test_frac, valid_start=args.valid_start, test_start=args.test_start,
        min_count=args.min_count, embedding_dim=args.embedding_dim, seed=args.seed,
        vocab_from=args.vocab_from, count_decay=args.count_decay))


def _add_amazon(sources: argparse._SubParsersAction) -> None:
    p = sources.add_parser("amazon", help="Amazon reviews + meta (paper §6.1 protocol), or "
                                          "processed hist;hist_cates;item;cate;label text")
    p.add_argument("--reviews", type=Path, help="reviews_<Category>_5.json[.gz]")
    p.add_argument("--meta", type=Path,
                   help="meta_<Category>.json[.gz] (one Python literal per line)")
    p.add_argument("--processed", type=Path,
                   help="already processed samples instead of --reviews/--meta")
    p.add_argument("--processed-test", type=Path,
                   help="processed test samples (default: --test-frac of --processed)")
    _add_common(p)
    _add_history_ties(p)  # raw reviews only: processed text has no timestamps
    p.set_defaults(func=_run_amazon)


def _run_amazon(args: argparse.Namespace) -> int:
    from din_ray.data.amazon import prepare_amazon, prepare_amazon_processed

    if args.processed:
        if args.reviews or args.meta:
            raise ValueError("give --processed or --reviews with --meta, not both")
        out = _prepared(args, "amazon-processed", lambda output, overwrite:
                        prepare_amazon_processed(args.processed, output,
                                                 processed_test=args.processed_test,
                                                 overwrite=overwrite, **_common_kwargs(args)))
    elif args.reviews and args.meta:
        out = _prepared(args, "amazon", lambda output, overwrite: prepare_amazon(
            args.reviews, args.meta, output, history_ties=args.history_ties,
            overwrite=overwrite, **_common_kwargs(args)))
    else:
        raise ValueError("prepare amazon needs --reviews and --meta (raw files) or --processed")
    return _summary("amazon", out)


# `din-ray prepare --help` lists them in this order.
SOURCES: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_movielens,
    _add_synthetic,
    _add_log,
    _add_taobao,
    _add_amazon,
)
