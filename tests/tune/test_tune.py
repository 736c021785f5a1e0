"""`din-ray tune` on a real local Ray: Optuna + ASHA over distributed trials, outputs, resume.

One Ray instance for the module, started like the CLI starts it (dashboard on, its address known
to every Ray process: Ray 2.60 needs both to release the placement group of a trial that ASHA
stops); each search writes its own output directory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import tiny_config, write_tiny_dataset

from din_ray.checkpoint import load_model, resolve_checkpoint
from din_ray.config import TrainConfig
from din_ray.data.format import PreparedDataset, iter_numpy_batches
from din_ray.resources import tune_space_path
from din_ray.train.forward import forward, to_torch
from din_ray.train.local import run_local
from din_ray.tune.results import write_outputs
from din_ray.tune.run import TuneSettings, run_tune
from din_ray.tune.space import load_space

ray = pytest.importorskip("ray")

# Each search takes 4-7 min on 2 quiet cores; allow a loaded CI machine more than the default.
pytestmark = pytest.mark.timeout(1800)

SPACE = tune_space_path("default")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tune") / "data", rows=600, seed=0)


def small_config(data: Path) -> TrainConfig:
    return tiny_config(data, epochs=3, threads=1)


def wait_for_released_placement_groups(timeout_s: float = 120.0) -> list[str]:
    """States of the placement groups still held, after waiting for the cleanup to land."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = [pg["state"] for pg in ray.util.placement_group_table().values()
                if pg["state"] != "REMOVED"]
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(1.0)


def test_search_stops_trials_early_and_hands_over_a_loadable_best(ray_tune_cluster, data, tmp_path):
    # One trial at a time: ASHA compares each trial at a rung with those that reached it
    # before, so with trials running together whether one is stopped depends on which reports
    # first (a CI run once had none stopped). In order, the first is the untuned default and a
    # later, worse one is stopped at the first rung.
    settings = TuneSettings(output=str(tmp_path / "tune"), space=str(SPACE), trials=4,
                            workers_per_trial=1, reduction_factor=2, sampler_seed=0,
                            max_concurrent=1)
    result = run_tune(settings, small_config(data))
    out = Path(settings.output)

    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"completed", "early-stopped"}, trials
    stopped = trials[trials["status"] == "early-stopped"]
    assert len(stopped) >= 1, trials  # ASHA (η=2) stopped at least one trial at a rung
    assert (stopped["epochs_run"] < 3).all()
    assert (trials.loc[trials["status"] == "completed", "epochs_run"] == 3).all()
    assert {"lam", "lr", "activation", "best_valid_gauc", "test_gauc_at_best"} <= set(trials)
    # The first trial is the untuned default.
    assert (trials["lam"] == 0.01).any() and (trials["lr"] == 1e-3).any()

    best = json.loads((out / "best.json").read_text())
    assert best["trial_id"] == result["trial_id"] and best["metrics"] == result["metrics"]
    assert math.isclose(best["metrics"]["valid_gauc"], trials["best_valid_gauc"].max())
    assert set(best["config"]) == {"lam", "lr", "activation"}
    assert 0 <= best["metrics"]["test_gauc"] <= 1
    assert Path(best["checkpoint"]).is_absolute()
    assert resolve_checkpoint(out) == Path(best["checkpoint"])  # what `din-ray serve` loads

    # The best checkpoint loads, carries the winning config and predicts.
    model, tables, c = load_model(best["checkpoint"])
    assert c.train_config().regularization.lam == best["config"]["lam"]
    assert c.model_config().activation == best["config"]["activation"]
    assert c.metrics["epoch"] == best["metrics"]["epoch"]
    dataset = PreparedDataset.open(data)
    batch = next(iter_numpy_batches(dataset.files("test"), dataset.schema, 32))
    with torch.no_grad():
        probs = torch.sigmoid(forward(model, tables, to_torch(batch))).numpy()
    assert probs.shape == (32,) and np.all((probs > 0) & (probs < 1))
    assert len(np.unique(probs)) > 1

    assert (out / "tune.png").stat().st_size > 10_000
    assert wait_for_released_placement_groups() == []

    # The same command again restores the finished experiment: no new trials, same winner.
    again = run_tune(settings, small_config(data))
    assert again["trial_id"] == best["trial_id"]
    assert len(pd.read_csv(out / "trials.csv")) == 4

    # A different search in the same output is refused before any work, naming what differs.
    with pytest.raises(ValueError, match="trials differs"):
        run_tune(replace(settings, trials=5), small_config(data))
    with pytest.raises(ValueError, match=r"train\.lr_decay differs"):
        run_tune(settings, small_config(data).replace(lr_decay=0.5))


def test_two_worker_trials_run_one_after_another(ray_tune_cluster, data, tmp_path):
    # One trial at a time: each one's two workers must give their CPUs back (also when ASHA
    # stops it) before the next can start, or this search never finishes.
    settings = TuneSettings(output=str(tmp_path / "tune2"), space=str(SPACE), trials=2,
                            workers_per_trial=2, max_concurrent=1, reduction_factor=2,
                            sampler_seed=1)
    cfg = small_config(data).replace(epochs=2, cpus_per_worker=0.5)
    result = run_tune(settings, cfg)
    trials = pd.read_csv(Path(settings.output) / "trials.csv")
    assert len(trials) == 2
    assert set(trials["status"]) <= {"completed", "early-stopped"}, trials
    best = load_model(result["checkpoint"])[2]
    assert best.manifest["world_size"] == 2  # written by the two workers' row blocks
    assert wait_for_released_placement_groups() == []


def test_outputs_rank_trials_and_copy_the_best_epoch(data, tmp_path):
    # Trial records as `run_tune` builds them from Tune's results, around a real checkpoint.
    trained = run_local(small_config(data).replace(epochs=1, output=str(tmp_path / "run")))
    ckpt_dir = str(tmp_path / "run" / "checkpoint")
    epoch = {k: v for k, v in trained["history"][0].items()}

    def row(e: int, gauc: float) -> dict:
        return {**epoch, "epoch": e, "valid_gauc": gauc, "test_gauc": gauc - 0.01,
                "checkpoint_path": ckpt_dir}

    records = [
        {"trial_id": "a", "config": {"lam": 0.01, "lr": 1e-3, "activation": "dice"},
         "history": [row(1, 0.60), row(2, 0.62), row(3, 0.61)], "error": None,
         "status": "completed"},
        {"trial_id": "b", "config": {"lam": 0.1, "lr": 3e-3, "activation": "prelu"},
         "history": [row(1, 0.55)], "error": None, "status": "early-stopped"},
        {"trial_id": "c", "config": {"lam": 1e-3, "lr": 1e-4, "activation": "dice"},
         "history": [], "error": "WorkerGroupError: boom", "status": "errored"},
    ]
    out = tmp_path / "tune"
    out.mkdir()
    cfg = small_config(data).replace(epochs=3)
    best = write_outputs(out, load_space(SPACE), cfg, records)

    assert best["trial_id"] == "a" and best["metrics"]["epoch"] == 2
    assert math.isclose(best["metrics"]["test_gauc"], 0.61)
    assert best["statuses"]["early-stopped"] == 1 and best["statuses"]["errored"] == 1
    trained = TrainConfig.from_dict(best["train_config"])
    assert trained.regularization.lam == 0.01 and trained.optim.epochs == 3
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["trial_id"]) == ["a", "b", "c"]
    assert list(trials["epochs_run"]) == [3, 1, 0]
    assert trials.loc[2, "error"] == "WorkerGroupError: boom"
    assert resolve_checkpoint(out) == out / "best_checkpoint"
    assert load_model(out / "best_checkpoint")[2].metrics["epoch"] == 1
    assert (out / "tune.png").stat().st_size > 10_000

    # A tie goes to the smallest trial id in any order (a restored search reorders its trials).
    tied = [dict(records[0], trial_id="z"), dict(records[0], trial_id="m")]
    for order in (tied, tied[::-1]):
        tie_out = tmp_path / f"tie-{order[0]['trial_id']}"
        tie_out.mkdir()
        assert write_outputs(tie_out, load_space(SPACE), cfg,
                             [dict(r) for r in order])["trial_id"] == "m"
