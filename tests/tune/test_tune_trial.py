"""1-worker Tune trials trained in the trial's process (`din_ray.tune_trial`), on a real Ray
that `run_tune` starts itself, without the dashboard (in-process trials hold no Train placement
group for an ASHA stop to leave behind)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pandas as pd
import pytest
from builders import tiny_config, write_tiny_dataset

from din_ray import checkpoint as ckpt
from din_ray.train.local import run_local
from din_ray.tune.run import TuneSettings, run_tune

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(1200)

SPACE = "default"  # the packaged space
COMPARED = ("epoch", "train_loss", "train_samples", "valid_gauc", "valid_auc", "valid_logloss",
            "test_gauc", "test_auc", "test_logloss", "new_best")


@pytest.fixture
def own_ray_tmpdir(monkeypatch):
    # run_tune starts the local Ray here; its own temp dir keeps it apart from other clusters.
    monkeypatch.setenv("RAY_TMPDIR", f"/tmp/ray-tp{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")  # see tests/test_tune.py
    assert not ray.is_initialized()


def test_in_process_trial_trains_as_local_and_stopped_trials_free_their_cpus(
        own_ray_tmpdir, tmp_path):
    data = write_tiny_dataset(tmp_path / "data", rows=600, seed=0)
    base = tiny_config(data, epochs=3, threads=1)
    # One trial at a time on 1 CPU: a trial ASHA stops must give its CPU back, or the search
    # never finishes; with no dashboard (see din_ray.ray_session) nothing else releases it.
    settings = TuneSettings(output=str(tmp_path / "tune"), space=str(SPACE), trials=4,
                            workers_per_trial=1, max_concurrent=1, reduction_factor=2,
                            sampler_seed=0, num_cpus=1)
    run_tune(settings, base)
    assert not ray.is_initialized()  # run_tune started its own Ray and stopped it
    trials = pd.read_csv(Path(settings.output) / "trials.csv")
    assert len(trials) == 4 and set(trials["status"]) <= {"completed", "early-stopped"}, trials
    assert (trials["status"] == "early-stopped").any(), trials

    # The first trial is the untuned default: the same config and seed as this --local run.
    default = trials[(trials["lam"] == base.get("lam")) & (trials["lr"] == base.get("lr"))
                     & (trials["activation"] == base.get("activation"))]
    assert len(default) == 1 and default["status"].item() == "completed", trials
    run_dir = Path(settings.output) / "ray" / "tune-runs" / f"trial-{default['trial_id'].item()}"
    kept = sorted(p.name for p in run_dir.glob("epoch-*"))
    assert "epoch-0003" in kept and len(kept) <= 2  # the latest and the best epoch
    trial_history = json.loads(ckpt.Checkpoint.open(run_dir / "epoch-0003").dense_state()
                               ["history"])

    local = run_local(base.replace(output=str(tmp_path / "local")))
    assert len(trial_history) == len(local["history"]) >= 3
    for in_trial, in_local in zip(trial_history, local["history"], strict=True):
        assert {k: _comparable(in_trial[k]) for k in COMPARED} == {
            k: _comparable(in_local[k]) for k in COMPARED}


def _comparable(value):
    """NaN (a GAUC with no user to score) as a string, so that equal histories compare equal."""
    return "nan" if isinstance(value, float) and math.isnan(value) else value
