"""Cost of one embedding update step as the table grows: MBA (Eq. 7) vs L2 over whole tables.

    python benchmarks/mba_cost.py                       # 10^4 .. 10^7 rows, writes the JSON
    python benchmarks/mba_cost.py --rows 10000 100000 --repeats 5

The paper's point (§5.1): ordinary L2 needs every embedding row at every step, which is
impossible at Alibaba's scale; MBA regularizes only the rows a mini-batch touches, so a step
costs the same however large the table is. This times the real sparse step of din-ray
(`EmbeddingTables.lookup` -> backward -> `touched_gradients` -> `RowWiseOptimizer.step` with
the regularizer) for one batch shape (B samples × (1 + L) ids each) over tables of growing
size, and prints each regularizer's step time relative to the smallest table, and relative to
the unregularized step on the same table (the regularizer's own cost, which is less disturbed
by cache effects and by other load on the machine). Results go to
benchmarks/results/mba_cost.json. One torch thread; the fastest of `--repeats` steps is the
step's cost (on a shared, loaded machine the slower ones measure waiting for a CPU, not work);
the medians are recorded too. The ids of a batch are distinct, so every table size sees the
same number of touched rows (at 10^4 rows random ids would collide more often than at 10^7 and
the comparison would mix in a change of work). L2 steps on 10^7 rows take minutes on a loaded
machine, so those are repeated only twice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.regularization import MiniBatchAware, WholeTableL2
from din_ray.embeddings.tables import EmbeddingTables, TableSpec

RESULTS = Path(__file__).parent / "results" / "mba_cost.json"


def step_seconds(rows: int, reg: str, batch: int, history: int, dim: int, repeats: int,
                 seed: int = 0) -> tuple[float, float]:
    """(fastest, median) seconds of one sparse training step on a `rows`-row table."""
    spec = TableSpec("item_id", rows, dim)
    tables = EmbeddingTables({"item_id": spec}, seed=seed).train()
    opt = RowWiseOptimizer(tables, "adam", lr=1e-3)
    rng = np.random.default_rng(seed)
    counts = {"item_id": rng.integers(1, 1000, size=rows)}
    regularizer = {"none": None, "mba": MiniBatchAware(0.01, counts),
                   "l2": WholeTableL2(0.01, steps_per_epoch=100)}[reg]
    times = []
    if reg == "l2" and rows >= 10**7:
        repeats = min(repeats, 2)
    for step in range(repeats + 1):  # the first step warms up allocations
        # A fresh batch each step: B candidates and their B×L behaviours, distinct ids anywhere
        # in the table (Floyd-style sampling; no O(rows) permutation).
        n = batch * (1 + history)
        ids = torch.from_numpy(2 + rng.choice(rows - 2, size=n, replace=False)).view(batch, -1)
        t0 = time.perf_counter()
        emb = tables.lookup({"x": ("item_id", ids)})["x"]  # (B, 1+L, dim)
        emb.pow(2).mean().backward()
        gradients = tables.touched_gradients()
        if regularizer is not None and getattr(regularizer, "whole_tables", False):
            gradients = regularizer.expand(tables, gradients)
        opt.step(gradients, regularizer)
        if step:
            times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10**4, 10**5, 10**6, 10**7])
    p.add_argument("--regs", nargs="+", default=["none", "mba", "l2"])
    p.add_argument("--batch", type=int, default=128, help="samples (x (1 + history) ids)")
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--l2-max-rows", type=int, default=10**7,
                   help="skip L2 on larger tables (a step there takes minutes and GBs)")
    args = p.parse_args(argv)
    ids_per_batch = args.batch * (1 + args.history)
    if min(args.rows) - 2 < ids_per_batch:
        p.error(f"--rows {min(args.rows)} is too small for {ids_per_batch} distinct ids a batch "
                "(lower --batch or --history)")
    torch.set_num_threads(1)

    results: dict[str, dict[str, float]] = {r: {} for r in args.regs}
    medians: dict[str, dict[str, float]] = {r: {} for r in args.regs}
    for rows in args.rows:
        for reg in args.regs:
            if reg == "l2" and rows > args.l2_max_rows:
                continue
            fastest, median = step_seconds(rows, reg, args.batch, args.history, args.dim,
                                           args.repeats)
            results[reg][str(rows)], medians[reg][str(rows)] = fastest, median
            print(f"rows {rows:>10,}  reg {reg:<5} {fastest * 1e3:10.2f} ms/step "
                  f"(median {median * 1e3:.2f})", flush=True)
    smallest = str(args.rows[0])
    ratios = {reg: {r: t / by_rows[smallest] for r, t in by_rows.items()}
              for reg, by_rows in results.items()}

    def cell(table: dict, reg: str, rows: int) -> str:
        v = table.get(reg, {}).get(str(rows))
        return f"{v:>9.2f}x" if v is not None else "        --"

    print(f"\nstep time relative to {int(smallest):,} rows "
          f"(batch {args.batch} x {1 + args.history} ids, dim {args.dim}):")
    print("rows".rjust(12) + "".join(reg.rjust(10) for reg in args.regs))
    for rows in args.rows:
        print(f"{rows:>12,}" + "".join(cell(ratios, reg, rows) for reg in args.regs))
    over_none = {}
    if "none" in results:
        over_none = {reg: {r: t / results["none"][r] for r, t in by_rows.items()}
                     for reg, by_rows in results.items() if reg != "none"}
        print("\nstep time relative to the unregularized step on the same table:")
        print("rows".rjust(12) + "".join(reg.rjust(10) for reg in over_none))
        for rows in args.rows:
            print(f"{rows:>12,}" + "".join(cell(over_none, reg, rows) for reg in over_none))
    out = {"what": "fastest seconds per sparse embedding step (lookup, backward, regularizer, "
                   "lazy Adam) on one table", "batch": args.batch, "ids_per_sample":
           1 + args.history, "dim": args.dim, "repeats": args.repeats, "threads": 1,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared, loaded)",
           "l2_max_rows": args.l2_max_rows, "seconds": results, "median_seconds": medians,
           "ratio_to_smallest": ratios, "ratio_to_none_same_rows": over_none}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
