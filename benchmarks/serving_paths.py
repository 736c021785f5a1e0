"""One serving request's model time on this checkout's scoring path against another checkout's,
side by side in one process, as shares of the machine's single-thread matmul rate (issue 15,
goal 3: >= 50 %).

    git worktree add /tmp/before <commit>
    PYTHONPATH=$PWD python benchmarks/serving_paths.py --checkpoint <train output> \
        --before /tmp/before --output benchmarks/results/serving_paths.json

The other checkout's serving methods (`TargetAttention.shared` and `_one_history`,
`MLP.forward`, `Scorer.batch`: the ones issue 15's third round changed) are loaded from its
files under other module names and swapped in for its rounds; the embedding lookup and the rest
of `score_candidates` are this checkout's in both. Each of --rounds rounds times a 1024^3
`torch.mm` (the machine's rate now) and then each path (median of 5 `Scorer.logits` calls of
one request, 1 thread, the order flipped every round); a share is the request's matmul FLOPs
(counted as `serve_latency.matmul_profile` counts them) over its time over that round's mm rate,
and the figures are medians of the per-round values, so a load change between rounds cancels
out. The scores of both paths are checked equal first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's din_ray, installed or not
sys.path.insert(0, str(ROOT / "benchmarks"))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def serving_methods(layers, scoring) -> tuple:
    return (layers.TargetAttention.shared, layers.TargetAttention._one_history,
            layers.MLP.forward, scoring.Scorer.batch)


def install(methods: tuple) -> None:
    from din_ray.model import layers
    from din_ray.serve import scoring

    (layers.TargetAttention.shared, layers.TargetAttention._one_history, layers.MLP.forward,
     scoring.Scorer.batch) = methods


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--before", required=True, help="the other checkout (a git worktree)")
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/serving_paths.json"))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--candidates", type=int, default=200)
    args = p.parse_args(argv)

    import torch
    from serve_latency import make_bodies, unfused_matmul_flops

    from din_ray.checkpoint import resolve_checkpoint
    from din_ray.model import layers
    from din_ray.serve import scoring

    torch.set_num_threads(1)
    before = Path(args.before).resolve()
    old_layers = _load("before_layers", before / "din_ray/model/layers.py")
    old_layers.Dice, old_layers.PReLU = layers.Dice, layers.PReLU  # isinstance on our modules
    old_scoring = _load("before_scoring", before / "din_ray/serve/scoring.py")
    paths = {"before": serving_methods(old_layers, old_scoring),
             "now": serving_methods(layers, scoring)}

    checkpoint = resolve_checkpoint(args.checkpoint).resolve()
    served = scoring.ServedModel.load(checkpoint)
    body = make_bodies(checkpoint, 1, args.candidates, 0)[0]
    request = [served.parser.parse_body(json.dumps(body).encode())]
    scorer = served.scorer
    flops = unfused_matmul_flops(scorer, request)

    def run(name: str):
        def f():
            install(paths[name])
            return scorer.logits(request)
        return f

    fns = {name: run(name) for name in paths}
    want, got = fns["before"](), fns["now"]()
    diff = float((got[0] - want[0]).abs().max())
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    load_before = os.getloadavg()
    rates, ms = [], {name: [] for name in fns}
    for i in range(args.rounds):
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * 1024 ** 3 / (time.perf_counter() - t0) / 1e9)
        for name in (list(fns) if i % 2 else list(fns)[::-1]):
            passes = []
            for _ in range(5):
                t0 = time.perf_counter()
                fns[name]()
                passes.append(time.perf_counter() - t0)
            ms[name].append(float(np.median(passes)) * 1e3)
    install(paths["now"])
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "checkpoint": str(checkpoint), "before_checkout": str(before),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "loadavg_before": [round(x, 1) for x in load_before],
           "loadavg_after": [round(x, 1) for x in os.getloadavg()],
           "candidates": request[0].num_candidates, "history": request[0].history_length,
           "matmul_gflop": round(flops / 1e9, 4), "rounds": args.rounds,
           "max_abs_logit_diff": diff,
           "mm_1024_gflops_1_thread": round(float(np.median(rates)), 1),
           "now_over_before": round(float(np.median(
               [n / b for n, b in zip(ms["now"], ms["before"])])), 3)}
    for name in fns:
        shares = [flops / m / 1e6 / r for m, r in zip(ms[name], rates)]
        out[name] = {"model_ms": round(float(np.median(ms[name])), 2),
                     "share_of_mm_rate": round(float(np.median(shares)), 3)}
    print(json.dumps(out, indent=2))
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
