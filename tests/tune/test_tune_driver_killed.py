"""`din-ray tune` survives its driver being killed: the same command, run again, resumes the
search (issue 17).

A real `din-ray tune` process, with a Ray of its own (its own temp dir), gets SIGKILL once Tune's
experiment state records a finished trial and the next trial has reported its first epoch but not
its last. The Ray processes it leaves behind are stopped by that temp dir and the driver's session
(never `ray stop`: other Ray instances share the host). The same command then finishes the
search: the finished trial is kept as it was (its results are not rewritten, its training run
not repeated), the interrupted one goes on from its last epoch checkpoint, and every trial is in
the outputs once, each epoch reported once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import ray_processes
from builders import write_tiny_dataset

from din_ray import checkpoint as ckpt
from din_ray.checkpoint import load_model, resolve_checkpoint

REPO = Path(__file__).resolve().parents[2]
SPACE = "default"  # the packaged space
TRIALS = 3
EPOCHS = 2
# Tiny model, one worker per trial, one trial at a time: the point is the resume, not the fit.
# ASHA's grace period is the whole run, so no trial is stopped after its first epoch: the trial
# running at the kill is certainly between its epochs.
TINY = ["--epochs", str(EPOCHS), "--grace-period", str(EPOCHS), "--batch-size", "64",
        "--embedding-dim", "4", "--attention-hidden", "8,4", "--mlp-hidden", "16,8",
        "--threads", "1", "--patience", "0"]
# Training rows: epochs of a few seconds, so the kill lands inside the interrupted trial's
# second epoch rather than after it (polling every POLL_S).
ROWS = 32_000
POLL_S = 0.2
FIRST_FINISH_TIMEOUT_S = 600  # Ray's start plus one trial, on a loaded shared host
# `din-ray` run from this checkout (PYTHONPATH below), whatever the installed one is.
CLI = "import sys; from din_ray.cli import main; sys.exit(main(sys.argv[1:]))"


def tune_command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", CLI, "tune", "--data", str(data), "--output",
            str(out), "--space", str(SPACE), "--trials", str(TRIALS), "--workers-per-trial", "1",
            "--max-concurrent", "1", "--num-cpus", "2", "--seed", "0", *TINY]


def trial_statuses(experiment: Path) -> dict[str, str]:
    """trial id -> status in Tune's newest saved experiment state ({} before the first save)."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        saved = json.loads(states[-1].read_text())
    except (OSError, ValueError):
        return {}  # being written right now: read it on the next poll
    trials = [json.loads(state) for state, _ in saved["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def trial_results(experiment: Path) -> dict[str, str]:
    """trial id -> the text of its result.json (one line per report Tune received)."""
    out = {}
    for path in experiment.glob("*/result.json"):
        text = path.read_text()
        if text.strip():
            out[json.loads(text.splitlines()[0])["trial_id"]] = text
    return out


def between_epochs(runs: Path) -> set[str]:
    """Trials whose Train run has written its first epoch's checkpoint and not its second."""
    return {d.name.removeprefix("trial-") for d in runs.glob("trial-*")
            if (d / "epoch-0001" / ckpt.MANIFEST).exists() and not (d / "epoch-0002").exists()}


# What a trial's training computed for an epoch (not Tune's bookkeeping: times, iterations).
EPOCH_KEYS = ("epoch", "train_loss", "train_samples", "valid_gauc", "valid_auc", "test_gauc",
              "new_best", "checkpoint_path")


def epoch_reports(text: str) -> dict[int, list[dict]]:
    """epoch -> every report of it in a result.json, reduced to EPOCH_KEYS."""
    out: dict[int, list[dict]] = {}
    for line in text.splitlines():
        row = json.loads(line)
        out.setdefault(row["epoch"], []).append({k: row.get(k) for k in EPOCH_KEYS})
    return out


def epoch_metrics(text: str) -> dict[int, dict]:
    return {e: rs[-1] for e, rs in epoch_reports(text).items()}


def run_dirs(runs: Path) -> dict[str, float]:
    """Every file of the trials' Train runs -> its modification time."""
    return {str(p.relative_to(runs)): p.stat().st_mtime for p in runs.rglob("*") if p.is_file()}


def start_driver(command: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """`din-ray tune` in a session of its own (what it spawns is found by that session)."""
    with log_path.open("w") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(done, driver: subprocess.Popen, log_path: Path, poll_s: float) -> None:
    deadline = time.monotonic() + FIRST_FINISH_TIMEOUT_S
    while not done():
        assert driver.poll() is None, log_path.read_text()[-4000:]
        assert time.monotonic() < deadline, log_path.read_text()[-4000:]
        time.sleep(poll_s)


def kill_driver(driver: subprocess.Popen, temp_dir: str) -> None:
    """SIGKILL the driver and, in the same instant, the local Ray it started (only its own), as
    when the driver's machine dies: a trial trains in a Ray worker process, and one left
    running while the driver is gone would finish the epoch it is in (an in-process trial's
    epoch of this data is shorter than a graceful stop)."""
    pids = ray_processes.processes(temp_dir, session_id=driver.pid)
    driver.send_signal(signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    driver.wait(timeout=30)
    left = ray_processes.stop(temp_dir, session_id=driver.pid)
    assert not left, f"processes of the killed driver's Ray still running: {left}"


@pytest.mark.timeout(1500)  # three Ray starts and three short trials; a loaded host needs more
def test_killed_tune_driver_rerun_resumes_the_search(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", rows=ROWS, seed=0)
    out = tmp_path / "tune"
    experiment, runs = out / "ray" / "tune", out / "ray" / "tune-runs"
    command = tune_command(data, out)
    temp_dir = f"/tmp/rtk{uuid.uuid4().hex[:6]}"  # short: Ray's unix socket paths
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "PYTHONPATH": str(REPO),
           # Ray's memory monitor kills workers when the whole host passes 95 % memory,
           # whoever uses it; on a shared host that is other jobs' memory.
           "RAY_memory_monitor_refresh_ms": "0",
           # Tune saves its experiment state every second (default: every 10 s or more), so
           # the test sees a finished trial before the next one is through its epochs.
           "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log0, log1, log2 = (tmp_path / f"run{i}.log" for i in range(3))
    drivers = []
    try:
        # 1. Killed at once after creating the Tuner (tuner.pkl, what `Tuner.can_restore` looks
        # for) and before Tune saved any experiment state: nothing to restore.
        drivers.append(driver := start_driver(command, env, log0))
        wait_until((experiment / "tuner.pkl").exists, driver, log0, poll_s=0.02)
        kill_driver(driver, temp_dir)
        assert not list(experiment.glob("experiment_state-*.json")), "killed too late"

        # 2. The same command starts the search afresh; killed once a trial has finished and
        # the next one has reported its first epoch but not its last.
        drivers.append(driver := start_driver(command, env, log1))

        def one_finished_one_between() -> bool:
            # Between: Tune got the first epoch's report (so Train registered its checkpoint)
            # and the second epoch's checkpoint is not written yet.
            reported = {t for t, text in trial_results(experiment).items()
                        if 1 in epoch_reports(text)}
            return ("TERMINATED" in trial_statuses(experiment).values()
                    and bool(between_epochs(runs) & reported))

        wait_until(one_finished_one_between, driver, log1, POLL_S)
        kill_driver(driver, temp_dir)
        assert "resuming the tuning run" not in log1.read_text()

        # What the killed driver left: a finished trial, one between its epochs, no outputs.
        finished = {t for t, s in trial_statuses(experiment).items() if s == "TERMINATED"}
        results_before = trial_results(experiment)
        (interrupted,) = between_epochs(runs) - finished
        assert finished and not (out / "best.json").exists()
        finished_runs = {t: run_dirs(runs / f"trial-{t}") for t in finished}
        first_epoch = run_dirs(runs / f"trial-{interrupted}" / "epoch-0001")
        first_metrics = json.loads(
            (runs / f"trial-{interrupted}" / "epoch-0001" / "metrics.json").read_text())

        # 3. The same command resumes the search and completes it.
        drivers.append(driver := start_driver(command, env, log2))
        driver.wait(timeout=FIRST_FINISH_TIMEOUT_S * 2)
        third = log2.read_text()
        assert driver.returncode == 0, third[-4000:]
        assert "resuming the tuning run" in third, third[-4000:]
    finally:
        left = []
        for d in drivers:
            if d.poll() is None:
                d.kill()
                d.wait(timeout=30)
            left += ray_processes.stop(temp_dir, session_id=d.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"Ray processes still running after the test: {left}"

    # The search completed: every trial once, each through both epochs.
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == TRIALS and trials["trial_id"].is_unique, trials
    assert set(trials["status"]) == {"completed"}, trials
    assert (trials["epochs_run"] == EPOCHS).all(), trials
    # (Not Tune's last periodic experiment_state file: with in-process trials the search can
    # end between two of its saves, so that file may still show the last trial RUNNING; the
    # statuses above come from the finished search's result grid.)

    # The trials finished before the kill were not run again: their reports are untouched and
    # their Train runs wrote nothing new.
    results_after = trial_results(experiment)
    for t in finished:
        assert results_after[t] == results_before[t], t
        assert run_dirs(runs / f"trial-{t}") == finished_runs[t], t

    # The interrupted trial went on from its first epoch's checkpoint (not rewritten), and its
    # history still holds that epoch as it was first reported.
    # Retention keeps a trial's latest and best epochs only, so epoch 1 may be gone once epoch 2
    # is written and better; while it is kept, it is the very files the killed run wrote.
    kept = runs / f"trial-{interrupted}" / "epoch-0001"
    if kept.exists():
        assert run_dirs(kept) == first_epoch
    assert (runs / f"trial-{interrupted}" / f"epoch-{EPOCHS:04d}" / ckpt.MANIFEST).exists()
    after = epoch_metrics(results_after[interrupted])[1]
    for key in ("train_loss", "valid_gauc", "test_gauc"):
        assert after[key] == pytest.approx(first_metrics[key], rel=1e-9), (key, after)
    # Every trial's history has each epoch. (An epoch may be reported twice: one whose
    # checkpoint was written as the driver died but never registered is trained again.)
    assert set(results_after) == set(trials["trial_id"])
    for t, text in results_after.items():
        assert sorted(epoch_reports(text)) == list(range(1, EPOCHS + 1)), (t, text)

    # best.json names a trial of the table and best_checkpoint/ is complete (every file's
    # digest is checked at load) and loads.
    best = json.loads((out / "best.json").read_text())
    assert best["trial_id"] in set(trials["trial_id"])
    assert best["metrics"]["valid_gauc"] == pytest.approx(trials["best_valid_gauc"].max())
    assert best["statuses"]["completed"] == TRIALS
    assert resolve_checkpoint(out) == out / "best_checkpoint"
    manifest = ckpt.Checkpoint.open(out / "best_checkpoint").manifest
    assert set(manifest["sha256"]) >= set(manifest["files"])
    _, _, c = load_model(out / "best_checkpoint")
    assert c.metrics["epoch"] == best["metrics"]["epoch"]
    assert c.train_config().regularization.lam == best["config"]["lam"]
