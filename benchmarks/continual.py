"""Continual training costs and gains on synthetic drifting days (issue 16).

    flock /tmp/heavy.lock python benchmarks/continual.py --days 5 --impressions 40000 \
        --out /tmp/continual-bench

Measures, on `--days` days written by `write_synthetic_days`:
1. prepare: day 2 prepared fresh vs with --vocab-from day 1 (the same raw logs, `--repeat`
   times each, interleaved; medians), for the log pipeline run in this process;
2. init-from: day 2 trained one epoch from scratch vs --init-from the day-1 checkpoint (the
   difference is the cost of loading the checkpoint);
3. the day-by-day run: `din_ray.continual.run_day` every day continued from the champion, and the
   same days each trained from scratch: candidate test GAUC per day and seconds per day.

Prints the figures and writes benchmarks/results/continual.json (and --markdown, a table).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from din_ray.continual import DayConfig, run_day
from din_ray.data.logs.pipeline import prepare_logs
from din_ray.data.logs.synthetic import write_synthetic_days
from din_ray.train.loop import TrainConfig, run_local

RESULTS = Path(__file__).parent / "results" / "continual.json"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_prepare(specs: list[Path], root: Path, repeat: int) -> dict:
    day1 = root / "prep-day1"
    prepare_logs(specs[0], day1, executor="local", overwrite=True)
    fresh, extended = [], []
    for _ in range(repeat):  # interleaved, so machine load hits both alike
        fresh.append(_timed(lambda: prepare_logs(specs[1], root / "prep-fresh", overwrite=True,
                                                 executor="local")))
        extended.append(_timed(lambda: prepare_logs(specs[1], root / "prep-ext", overwrite=True,
                                                    executor="local", vocab_from=day1)))
    f, e = statistics.median(fresh), statistics.median(extended)
    return {"fresh_s": fresh, "vocab_from_s": extended, "fresh_median_s": f,
            "vocab_from_median_s": e, "ratio": e / f}


def bench_init_from(root: Path, train: dict) -> dict:
    day1, day2 = root / "prep-day1", root / "prep-ext"
    run_local(TrainConfig(data=str(day1), output=str(root / "init-day1"), **train))
    ckpt = root / "init-day1" / "checkpoint"
    out = {}
    for name, init in (("scratch_s", ""), ("init_from_s", str(ckpt))):
        shutil.rmtree(root / f"init-{name}", ignore_errors=True)
        out[name] = _timed(lambda i=init, n=name: run_local(TrainConfig(
            data=str(day2), output=str(root / f"init-{n}"), init_from=i, **train)))
    out["added_s"] = out["init_from_s"] - out["scratch_s"]
    return out


def bench_days(specs: list[Path], root: Path, train: dict, margin: float) -> list[dict]:
    rows = []
    for mode in ("continued", "scratch"):
        out = root / f"days-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        for d, spec in enumerate(specs):
            t0 = time.perf_counter()
            r = run_day(DayConfig(output=str(out), day=f"day-{d + 1}", spec=str(spec),
                                  margin=margin, train=train, from_scratch=mode == "scratch"))
            rows.append({"mode": mode, "day": d + 1, "gauc": r["candidate"]["gauc"],
                         "auc": r["candidate"]["auc"], "promoted": r["promoted"],
                         "champion_gauc": (r["champion"] or {}).get("gauc"),
                         "seconds": time.perf_counter() - t0, **{
                             f"{k}_s": v for k, v in r["seconds"].items()}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result: dict) -> str:
    p, i = result["prepare"], result["init_from"]
    lines = [
        f"Prepare day 2 ({result['impressions']:,} impressions, median of {result['repeat']}): "
        f"fresh {p['fresh_median_s']:.2f} s, --vocab-from {p['vocab_from_median_s']:.2f} s "
        f"(ratio {p['ratio']:.3f}).",
        f"Train day 2, 1 epoch: from scratch {i['scratch_s']:.1f} s, --init-from "
        f"{i['init_from_s']:.1f} s (added {i['added_s']:+.1f} s).",
        "",
        "| day | continued GAUC | from-scratch GAUC | continued s | from-scratch s | promoted |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r["mode"], r["day"]): r for r in result["days"]}
    for d in range(1, result["num_days"] + 1):
        c, s = by[("continued", d)], by[("scratch", d)]
        lines.append(f"| {d} | {c['gauc']:.4f} | {s['gauc']:.4f} | {c['seconds']:.1f} | "
                     f"{s['seconds']:.1f} | {'yes' if c['promoted'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/continual-bench"))
    p.add_argument("--days", type=int, default=5)
    p.add_argument("--impressions", type=int, default=40_000, help="per day")
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--categories", type=int, default=40)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--drift", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--parts", default="prepare,init,days",
                   help="comma-separated subset of prepare,init,days (init needs prepare)")
    args = p.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    specs = write_synthetic_days(args.out / "raw", args.days, args.impressions, drift=args.drift,
                                 items=args.items, categories=args.categories, users=args.users)
    train = dict(epochs=args.epochs, batch_size=256, embedding_dim=16, threads=1,
                 sparse_lr=0.05, patience=0)
    result = {"days_args": vars(args) | {"out": str(args.out), "markdown": str(args.markdown)},
              "impressions": args.impressions, "repeat": args.repeat, "num_days": args.days}
    parts = set(args.parts.split(","))
    if parts - {"prepare", "init", "days"} or ("init" in parts and "prepare" not in parts):
        p.error(f"--parts: {args.parts!r}")
    if "prepare" in parts:
        result["prepare"] = bench_prepare(specs, args.out, args.repeat)
        print(json.dumps(result["prepare"]), flush=True)
    if "init" in parts:
        result["init_from"] = bench_init_from(args.out, train)
        print(json.dumps(result["init_from"]), flush=True)
    if "days" in parts:
        result["days"] = bench_days(specs, args.out, train, args.margin)
    RESULTS.parent.mkdir(exist_ok=True)
    name = "continual" if parts == {"prepare", "init", "days"} else "continual_" + "_".join(
        sorted(parts))
    RESULTS.with_name(f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if parts == {"prepare", "init", "days"}:
        table = markdown(result)
        print(table)
        if args.markdown:
            args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
