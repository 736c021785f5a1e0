"""Ray Train end to end on a real local Ray: two workers with sharded tables, a worker killed
mid-epoch and the run recovering from the last checkpoint, resuming a finished run, evaluation
over gathered predictions equal to single-process, two workers equal to the local loop on the
same global batches (every row once per epoch), the best checkpoint kept under tied metrics, and
bad configurations failing before any worker starts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from builders import tiny_config, write_tiny_dataset

from din_ray import checkpoint as ckpt
from din_ray.cli import main as cli_main
from din_ray.config import TrainConfig
from din_ray.data.format import DataError, PreparedDataset
from din_ray.ray_session import TRAIN_POLL_ENV, TRAIN_POLL_S
from din_ray.schema import SchemaError
from din_ray.train.distributed import check_config, run_ray
from din_ray.train.evaluate import evaluate_checkpoint
from din_ray.train.faults import FAULTS_ENV
from din_ray.train.local import run_local


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 256 training rows: 2 workers x 2 steps of 64 per epoch; valid/test 64 rows each.
    return write_tiny_dataset(tmp_path_factory.mktemp("dist") / "data", rows=256, items=200,
                              cates=12)


def small_config(data: Path, output: Path, **overrides) -> TrainConfig:
    return tiny_config(data, output, **{"workers": 2, "epochs": 2, "replicate_below": 50,
                                        "max_failures": 1, **overrides})


# First in the file: it checks that no Ray was started, which holds only before the module's
# cluster fixture starts one.
def test_bad_configuration_fails_before_any_worker_starts(data, tmp_path):
    with pytest.raises(DataError, match="nope: prepared data directory not found"):
        run_ray(small_config(tmp_path / "nope", tmp_path / "out"))

    # 12 category rows cannot be row-sharded over 13 workers.
    with pytest.raises(ValueError, match="'cate_id' has 12 rows, fewer than the 13 workers"):
        check_config(small_config(data, tmp_path / "out", workers=13, replicate_below=0))

    # A test file without a column the schema declares.
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    part = sorted((broken / "test").glob("*.parquet"))[-1]
    pq.write_table(pq.read_table(part).drop_columns(["hist_cate_id"]), part)
    with pytest.raises(SchemaError, match=f"{part.name}: column 'hist_cate_id'.*missing"):
        run_ray(small_config(broken, tmp_path / "out"))

    # The CLI reports the error in one line and exits with status 2, without starting Ray.
    assert cli_main(["train", "--data", str(tmp_path / "nope"), "--output",
                     str(tmp_path / "out"), "--workers", "2"]) == 2
    assert cli_main(["train", "--local", "--workers", "2", "--data", str(data), "--output",
                     str(tmp_path / "out")]) == 2
    assert not ray.is_initialized()


# One run for every fault (each restart of a worker group costs seconds of Ray start-up): a worker
# dies while evaluating epoch 1 (nothing reported yet: epoch 1 is trained again from scratch),
# rank 1 dies in the middle of epoch 2's training, and rank 0 dies after writing epoch 2's files
# but before reporting them (each time the group resumes from the last reported checkpoint).
@pytest.mark.timeout(1200)  # 105-115 s quiet: two runs, three restarts
def test_workers_killed_in_training_evaluation_and_checkpoint_writing_recover_and_rerun_resumes(
        ray_cluster, data, tmp_path, monkeypatch):
    in_train, in_eval, in_ckpt = (tmp_path / f"{p}-killed" for p in ("train", "eval", "ckpt"))
    monkeypatch.setenv(FAULTS_ENV, json.dumps([
        # Any rank: a small split may all go to one worker (Ray Data splits by blocks).
        {"phase": "eval", "epoch": 1, "step": 0, "marker": str(in_eval)},
        {"rank": 1, "epoch": 2, "step": 1, "marker": str(in_train)},
        {"phase": "checkpoint", "rank": 0, "epoch": 2, "step": 0, "marker": str(in_ckpt)}]))
    cfg = small_config(data, tmp_path / "run", max_failures=3)
    result = run_ray(cfg)

    assert re.fullmatch(r"rank [01] epoch 1 step 0 eval", in_eval.read_text())
    assert in_train.read_text() == "rank 1 epoch 2 step 1"
    assert in_ckpt.read_text() == "rank 0 epoch 2 step 0 checkpoint"
    # Each epoch counted once, whatever was trained twice.
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    run_dir = tmp_path / "run" / "ray" / cfg.execution.run_name
    assert sorted(p.name for p in run_dir.glob("epoch-*")) == ["epoch-0001", "epoch-0002"]

    # The final checkpoint is complete (opening it verifies every digest) and was written by two
    # workers: one row block per worker and table.
    out = tmp_path / "run"
    written = json.loads((out / "metrics.json").read_text())
    assert written["best_epoch"] == result["best_epoch"]
    final = ckpt.Checkpoint.open(out / "checkpoint")
    assert final.manifest["world_size"] == 2 and final.metrics["epoch"] == result["best_epoch"]
    assert all(len(t["shards"]) == 2 for t in final.manifest["tables"].values())
    assert set(final.manifest["sha256"]) >= {s["file"] for t in final.manifest["tables"].values()
                                             for s in t["shards"]}
    history = json.loads(final.dense_state()["history"])
    assert [h["epoch"] for h in history] == [1, 2][:result["best_epoch"]]

    # Metrics over all workers' gathered predictions equal one process scoring every row.
    single = evaluate_checkpoint(out / "checkpoint", data)
    best = result["history"][result["best_epoch"] - 1]
    for key in ("valid_gauc", "valid_auc", "valid_logloss", "test_gauc", "test_auc",
                "test_logloss"):
        assert best[key] == pytest.approx(single[key], abs=1e-6), key

    # Rerunning the same command with one more epoch resumes after epoch 2 (Train V2 finds the
    # run's snapshot under the same storage path and name): epochs 1-2 are not retrained. This
    # run streams every split from its files (the path of splits above cache_below_mb: train
    # through Ray Data, valid/test read by the workers); the
    # first one got its splits whole from the driver through the object store.
    again = run_ray(cfg.replace(epochs=3, cache_below_mb=0))
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3]
    assert again["history"][:2] == result["history"]
    assert sorted(p.name for p in run_dir.glob("epoch-*"))[-1] == "epoch-0003"
    # Each worker evaluated its part of the streamed splits' row groups: together every row
    # once, as one process scoring epoch 3's checkpoint.
    single = evaluate_checkpoint(run_dir / "epoch-0003", data)
    for key in ("valid_gauc", "valid_logloss", "test_gauc", "test_logloss"):
        assert again["history"][2][key] == pytest.approx(single[key], abs=1e-6), key


def test_a_local_rays_train_controller_polls_its_workers_every_quarter_second(ray_cluster):
    # Ray's default poll (2 s) made every step of a short local run wait for it (see
    # din_ray.ray_session); the controller is a Ray worker process like this task's.
    @ray.remote(num_cpus=0)
    def poll_interval() -> str | None:
        import os

        return os.environ.get(TRAIN_POLL_ENV)

    assert ray.get(poll_interval.remote()) == TRAIN_POLL_S == "0.25"


def test_use_gpu_without_a_gpu_fails_at_once(ray_cluster, data, tmp_path):
    # The module's cluster has CPUs only: refused before any worker waits for a GPU.
    with pytest.raises(ValueError, match="no GPU visible to Ray"):
        run_ray(small_config(data, tmp_path / "out", use_gpu=True))


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Dense parameters and whole embedding tables of a checkpoint."""
    c = ckpt.Checkpoint.open(checkpoint)
    out = dict(c.dense_state()["model"])
    for name, spec in c.table_specs().items():
        out[name] = c.table_rows(name, 0, spec.num_rows)["weight"]
    return out


@pytest.mark.timeout(600)
def test_two_ray_workers_see_every_row_once_and_equal_the_local_loop(ray_cluster, data,
                                                                     tmp_path):
    # The same global batches: no shuffling, so step t of 2 workers x 64 rows is rows
    # [128 t, 128 t + 128) of the split in file order, the local loop's batch t at batch 128.
    common = dict(activation="prelu", shuffle=False, lr=0.01, epochs=2)
    ray_run = run_ray(small_config(data, tmp_path / "ray", batch_size=64, **common))
    local = run_local(small_config(data, tmp_path / "local", workers=1, batch_size=128,
                                   **common))

    rows = PreparedDataset.open(data).num_rows("train")
    assert [h["train_samples"] for h in ray_run["history"]] == [rows, rows]
    assert [h["train_samples"] for h in local["history"]] == [rows, rows]
    for mine, ref in zip(ray_run["history"], local["history"], strict=True):
        for key in ("train_loss", "valid_logloss", "valid_gauc", "test_logloss", "test_auc"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (mine["epoch"], key)
    assert ray_run["history"][0]["train_loss"] != ray_run["history"][1]["train_loss"]

    trained = _weights(tmp_path / "ray" / "ray" / "train" / "epoch-0002")
    expected = _weights(tmp_path / "local" / "checkpoints" / "epoch-0002")
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6, msg=name)
    first = _weights(tmp_path / "ray" / "ray" / "train" / "epoch-0001")
    assert not torch.equal(first["item_id"], trained["item_id"])  # epoch 2 moved the rows


@pytest.mark.timeout(600)
def test_tied_validation_keeps_the_checkpoint_of_the_epoch_metrics_name(ray_cluster, data,
                                                                        tmp_path):
    # A learning rate far below float32 resolution: no weight moves, so all three epochs have
    # the same validation GAUC. The best is the earliest (epoch 1), and Ray's retention, which
    # breaks ties towards later epochs, must not have deleted it. PReLU: Dice's moving averages
    # would move (they are not weights) and, with the logit layer no longer zero at the start,
    # change the predictions.
    result = run_ray(small_config(data, tmp_path / "run", epochs=3, lr=1e-20,
                                  activation="prelu"))
    gaucs = {h["valid_gauc"] for h in result["history"]}
    assert len(gaucs) == 1 and result["best_epoch"] == 1
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    kept = ckpt.Checkpoint.open(tmp_path / "run" / "checkpoint")
    assert written["best_epoch"] == kept.metrics["epoch"] == 1
