"""`din-ray demo`: the whole pipeline on the bundled MovieLens data, on a local Ray.

    din-ray demo --output runs/demo      # what `make demo` runs

prepare bundled ml-latest-small -> train DIN with 2 Ray Train workers (row-sharded embeddings)
-> a short Ray Tune + Optuna search -> serve the best checkpoint with Ray Serve -> score a sample
request over HTTP -> shut everything down. Each step prints what it did and where its outputs are.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path

import pandas as pd

import din_ray
from din_ray.data.movielens import prepare_movielens

BUNDLED = Path(din_ray.__file__).parent / "bundled" / "ml-latest-small"


def sample_request(movies_dir: Path, user_id: int = 1,
                   history: int = 20) -> tuple[dict, dict[int, str]]:
    """A /v1/ctr request in raw MovieLens ids (one user's earliest rated movies as the history,
    candidates from two different genres) and the candidates' titles."""
    ratings = pd.read_csv(movies_dir / "ratings.csv")
    movies = pd.read_csv(movies_dir / "movies.csv").set_index("movieId")
    genre = movies["genres"].str.split("|").str[0]  # the prepared data's category
    seen = ratings[ratings.userId == user_id].sort_values("timestamp").movieId.tolist()
    hist = seen[:history]
    # Two comedies and two horror films the user has not rated yet.
    pool = [m for m in movies.index if m not in set(seen)]
    cands = [m for m in pool if genre[m] == "Comedy"][:2] + [m for m in pool
                                                             if genre[m] == "Horror"][:2]
    return {"history": {"item_id": hist, "cate_id": [genre[m] for m in hist]},
            "candidates": [{"item_id": int(m), "cate_id": genre[m]} for m in cands],
            "explain": True}, {m: movies.loc[m, "title"] for m in cands}


def step(n: int, text: str) -> float:
    print(f"\n[{n}/6] {text}", flush=True)
    return time.perf_counter()


def run(output: Path, workers: int, epochs: int, trials: int, port: int) -> int:
    import ray

    from din_ray.ray_session import start_local_ray
    from din_ray.train.distributed import run_ray
    from din_ray.train.loop import TrainConfig
    from din_ray.tune.run import TuneSettings, run_tune

    output = output.resolve()
    t = step(1, f"prepare bundled ml-latest-small -> {output / 'data'}")
    data = output / "data"
    if not (data / "dataset.json").exists():
        prepare_movielens(BUNDLED, data)
    print(f"    {json.loads((data / 'dataset.json').read_text())['rows']}"
          f"  ({time.perf_counter() - t:.0f}s)")

    # One local Ray for every step; logical CPUs oversubscribed so Ray Data always has some.
    start_local_ray(8, log_to_driver=False)
    try:
        t = step(2, f"train DIN with {workers} Ray Train workers -> {output / 'train'}")
        cfg = TrainConfig(data=str(data), output=str(output / "train"), model="din",
                          epochs=epochs, workers=workers, cpus_per_worker=1.0, threads=1)
        result = run_ray(cfg)
        print(f"    test GAUC {result['gauc']:.4f} (best epoch {result['best_epoch']}); "
              f"checkpoint {output / 'train' / 'checkpoint'}  ({time.perf_counter() - t:.0f}s)")

        t = step(3, f"tune lam, lr, activation: {trials} trials -> {output / 'tune'}")
        best = run_tune(TuneSettings(output=str(output / "tune"), trials=trials,
                                     space="default"),  # the packaged space
                        TrainConfig(data=str(data), output=str(output / "tune"), epochs=1,
                                    threads=1))
        metrics = {k: best.get("metrics", {}).get(k, float("nan"))
                   for k in ("valid_gauc", "test_gauc")}
        print(f"    best {best.get('config')}: valid GAUC {metrics['valid_gauc']:.4f}"
              f", test GAUC {metrics['test_gauc']:.4f}"
              f"  ({time.perf_counter() - t:.0f}s)")

        t = step(4, f"serve the best checkpoint on http://127.0.0.1:{port}")
        from din_ray.serve.deploy import app_config, deploy
        from din_ray.serve.scoring import resolve_checkpoint
        from din_ray.serve.settings import ServeArgs
        checkpoint = resolve_checkpoint(output / "tune")
        deploy(app_config(ServeArgs(checkpoint=str(checkpoint)), port=port))
        print(f"    serving {checkpoint}  ({time.perf_counter() - t:.0f}s)")

        step(5, "score a sample request over HTTP (POST /v1/ctr)")
        body, titles = sample_request(BUNDLED)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/ctr",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        for cand, score in zip(body["candidates"], answer["scores"]):
            print(f"    {score:.3f}  {titles[cand['item_id']]} ({cand['cate_id']})")
        (output / "sample_request.json").write_text(json.dumps(body, indent=2) + "\n")
        (output / "sample_response.json").write_text(json.dumps(answer, indent=2) + "\n")
        print(f"    request/response saved to {output}/sample_*.json")
    finally:
        step(6, "shut down Serve and Ray")
        try:
            from ray import serve
            serve.shutdown()
        finally:
            ray.shutdown()
    print(f"\ndone: outputs under {output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="prepare -> train (2 workers) -> tune -> serve -> request")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=lambda a: run(Path(a.output), a.workers, a.epochs, a.trials, a.port))
