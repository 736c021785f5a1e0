"""The training loop run locally: outputs, best-epoch selection, checkpoints, resume, errors."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from builders import tiny_config, write_tiny_dataset
from dist_helpers import spawn, train_loop_gloo

from din_ray.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_model,
    write_manifest,
    write_worker_files,
)
from din_ray.cli import main as cli_main
from din_ray.config import TrainConfig
from din_ray.data import in_memory
from din_ray.data.format import DataError, PreparedDataset
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.train.evaluate import evaluate_checkpoint
from din_ray.train.local import LocalEnv, run_local


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data", rows=800)


def config(data, out, **kw):
    return tiny_config(data, out, **{"epochs": 2, **kw})


@pytest.mark.parametrize("train_dim, expected", [(0, 6), (3, 3)])
def test_embedding_width_defaults_to_the_prepared_datas(tmp_path, train_dim, expected):
    """`prepare --embedding-dim` is what training uses unless training names its own width."""
    prepared = write_tiny_dataset(tmp_path / "data", rows=200, dim=6)
    cfg = TrainConfig.create(data=str(prepared), output=str(tmp_path / "run"), epochs=1,
                             attention_hidden=(4,), mlp_hidden=(4,), embedding_dim=train_dim)
    assert TrainConfig().embedding_dim == 0  # the default: the prepared data's width
    run_local(cfg)
    c = Checkpoint.open(tmp_path / "run" / "checkpoint")
    assert c.table_specs()["item_id"].dim == c.table_specs()["cate_id"].dim == expected
    assert c.schema.features[0].embedding_dim == expected


@pytest.mark.parametrize("model", ["din", "base", "popularity"])
def test_train_writes_metrics_and_a_checkpoint_that_evaluates_identically(data, tmp_path, model):
    result = run_local(config(data, tmp_path / model, model=model))
    metrics = json.loads((tmp_path / model / "metrics.json").read_text())
    for key in ("gauc", "auc", "logloss", "best_epoch", "history"):
        assert key in metrics
    assert 0.0 <= metrics["gauc"] <= 1.0
    assert len(metrics["history"]) == (1 if model == "popularity" else 2)
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert best["valid_gauc"] == max(h["valid_gauc"] for h in metrics["history"])
    assert metrics["gauc"] == best["test_gauc"] == result["gauc"]
    again = evaluate_checkpoint(tmp_path / model / "checkpoint", data)
    assert again["gauc"] == pytest.approx(metrics["gauc"], abs=1e-12)
    assert again["logloss"] == pytest.approx(metrics["logloss"], abs=1e-6)


def test_din_learns_the_planted_signal(tmp_path):
    # Label depends on whether the candidate's category is in the history (tests/builders.py).
    data = write_tiny_dataset(tmp_path / "data", rows=3000)
    result = run_local(config(data, tmp_path / "run", epochs=4, lr=0.01, activation="prelu"))
    pop = run_local(config(data, tmp_path / "pop", model="popularity"))
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"] - 0.05
    # The label depends on the history, which the no-history baseline cannot see
    # (measured: DIN 0.639 vs popularity 0.511 on this data).
    assert result["valid_gauc"] > pop["valid_gauc"] + 0.08


def test_rerun_resumes_from_the_latest_checkpoint_without_repeating_epochs(data, tmp_path):
    full = run_local(config(data, tmp_path / "full", epochs=3))
    run_local(config(data, tmp_path / "split", epochs=2))
    resumed = run_local(config(data, tmp_path / "split", epochs=3))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    # Resuming restores weights, optimizer moments and step counts: the same numbers result.
    for a, b in zip(full["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["valid_gauc"] == pytest.approx(b["valid_gauc"], abs=1e-6)


def test_early_stopping_stops_after_patience(data, tmp_path):
    # A huge learning rate makes validation worse after the first epoch.
    result = run_local(config(data, tmp_path, epochs=6, patience=1, lr=2.0, lr_decay=1.0))
    assert result["epochs_run"] < 6


def test_checkpoint_blocks_from_two_workers_restore_into_one_and_three(data, tmp_path):
    run_local(config(data, tmp_path / "run", epochs=1))
    model, tables, c = load_model(tmp_path / "run" / "checkpoint")
    specs = tables.specs
    resharded = tmp_path / "two"
    for rank in range(2):
        part = EmbeddingTables(specs, rank=rank, world_size=2)
        for name in specs:
            start, end = part.blocks[name]
            part.weight(name).copy_(tables.weight(name)[start:end])
        write_worker_files(resharded, part, None)
    write_manifest(resharded, schema=c.schema, config=c.config, metrics=c.metrics, specs=specs,
                   world_size=2, dense=c.dense_state())
    two = Checkpoint.open(resharded)
    for world in (1, 3):
        for rank in range(world):
            into = EmbeddingTables(specs, rank=rank, world_size=world)
            two.restore_tables(into)
            for name in specs:
                start, end = into.blocks[name]
                assert torch.equal(into.weight(name), tables.weight(name)[start:end])


def test_incomplete_checkpoint_and_bad_inputs_fail_clearly(data, tmp_path):
    run_local(config(data, tmp_path / "run", epochs=1, model="popularity"))
    ckpt_dir = tmp_path / "run" / "checkpoint"
    (ckpt_dir / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        Checkpoint.open(ckpt_dir)
    with pytest.raises(DataError, match="not found"):
        run_local(config(tmp_path / "missing", tmp_path / "x"))
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"data": "x", "learning_rate": 1})
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig.create(data="x", epochs=0)


def test_missing_truncated_or_corrupted_checkpoint_files_fail_at_load_naming_the_file(
        data, tmp_path):
    import shutil

    run_local(config(data, tmp_path / "run", epochs=1))
    good = tmp_path / "run" / "checkpoint"
    manifest = json.loads((good / "manifest.json").read_text())
    shard = manifest["tables"]["item_id"]["shards"][0]["file"]
    assert set(manifest["sha256"]) == {*manifest["files"], *(
        s["file"] for t in manifest["tables"].values() for s in t["shards"])}

    def broken(name: str, damage) -> Path:
        copy = tmp_path / f"broken-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, copy)
        damage(copy / name)
        return copy

    def flip_a_byte(f: Path) -> None:  # same size, one bit off: only a checksum sees it
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 1
        f.write_bytes(bytes(raw))

    def truncate(f: Path) -> None:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    for name, damage, message in ((shard, Path.unlink, "missing"),
                                  (shard, flip_a_byte, "SHA-256 differs"),
                                  (shard, truncate, "SHA-256 differs"),
                                  ("dense.pt", flip_a_byte, "SHA-256 differs"),
                                  ("vocab/item_id.parquet", flip_a_byte, "SHA-256 differs"),
                                  ("config.json", truncate, "SHA-256 differs")):
        with pytest.raises(CheckpointError, match=message) as e:
            load_model(broken(name, damage))
        assert name in str(e.value), e.value
    # A checkpoint from before digests were recorded still names an unreadable shard.
    old = broken(shard, truncate)
    del manifest["sha256"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unreadable tensor file") as e:
        load_model(old)
    assert shard in str(e.value)
    load_model(good)  # the original is untouched and loads


def test_cli_train_and_evaluate(data, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["train", "--local", "--data", str(data), "--output", str(out),
                     "--epochs", "1", "--embedding-dim", "4", "--batch-size", "64",
                     "--model", "base", "--activation", "prelu"]) == 0
    assert cli_main(["evaluate", "--checkpoint", str(out / "checkpoint"),
                     "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert '"gauc"' in printed
    assert cli_main(["train", "--local", "--data", str(tmp_path / "nope"), "--output",
                     str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_rerun_into_the_output_of_another_configuration_fails_before_training(data, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    args = ["train", "--local", "--data", str(data), "--output", str(out), "--epochs", "1",
            "--embedding-dim", "4", "--batch-size", "64", "--attention-hidden", "8,4",
            "--mlp-hidden", "16,8"]
    assert cli_main(args) == 0  # Dice
    before = (out / "metrics.json").read_text()
    capsys.readouterr()
    assert cli_main([*args, "--activation", "prelu"]) == 2
    err = capsys.readouterr().err
    assert "activation: 'dice' there, 'prelu' now" in err
    assert "--overwrite" in err and "another --output" in err
    assert (out / "metrics.json").read_text() == before  # nothing was trained or written
    # The same configuration with more epochs is a resume, not another run.
    assert cli_main([*args, "--epochs", "2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2
    assert cli_main([*args, "--activation", "prelu", "--overwrite"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert TrainConfig.from_dict(metrics["config"]).model.activation == "prelu"
    assert metrics["epochs_run"] == 1  # a fresh run, not a resume of the Dice one


def test_evaluate_takes_what_serve_takes(data, tmp_path, capsys):
    """A checkpoint, a train output and a tune output (best.json naming a checkpoint)."""
    out = tmp_path / "run"
    run_local(config(data, out, epochs=1))
    tune_out = tmp_path / "tune"
    tune_out.mkdir()
    (tune_out / "best.json").write_text(json.dumps({"checkpoint": str(out / "checkpoint")}))
    results = []
    for path in (out / "checkpoint", out, tune_out):
        assert cli_main(["evaluate", "--checkpoint", str(path), "--data", str(data)]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] == results[2]
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        evaluate_checkpoint(tmp_path, data)


def test_warm_started_model_ranks_like_popularity_at_epoch_zero(data, tmp_path):
    pop = run_local(config(data, tmp_path / "pop", model="popularity"))
    warm = {"ad_bias": True, "zero_logit": True}  # the bias rows carry the warm start
    din = run_local(config(data, tmp_path / "din", epochs=1, eval_at_start=True, **warm))
    start = din["history"][0]
    assert start["epoch"] == 0 and start["train_loss"] is None
    # bias rows = smoothed click-rate logits and a zero-initialised output layer: the untrained
    # model's logits are the popularity baseline's, so every ranking metric is identical.
    assert start["test_gauc"] == pytest.approx(pop["gauc"], abs=1e-12)
    assert start["valid_logloss"] == pytest.approx(pop["valid_logloss"], abs=1e-6)
    assert [h["epoch"] for h in din["history"]] == [0, 1]
    cold = run_local(config(data, tmp_path / "cold", epochs=1, eval_at_start=True,
                            bias_init="zero", **warm))
    assert cold["history"][0]["test_logloss"] == pytest.approx(np.log(2), abs=1e-6)


def test_every_worker_evaluates_with_the_checkpoints_dice_statistics(data, tmp_path):
    """Under DDP each worker's last batch moves its own copy of Dice's running statistics (DDP
    copies rank 0's only at the next training forward). Both workers must evaluate, and the
    checkpoint hold, the same copy: one process scoring every row from the checkpoint then
    reproduces the 2-worker run's metrics. (A large learning rate so the statistics matter.)"""
    cfg = config(data, tmp_path / "run", epochs=1, lr=0.05, activation="dice", workers=2,
                 replicate_below=50)
    summary = spawn(train_loop_gloo, 2, tmp_path / "spawn", cfg.to_dict(),
                    str(tmp_path / "ckpt"))[0]
    single = evaluate_checkpoint(tmp_path / "ckpt" / "epoch-0001", data)
    for key in ("valid_gauc", "valid_auc", "valid_logloss", "test_gauc", "test_auc",
                "test_logloss"):
        assert summary["history"][0][key] == pytest.approx(single[key], abs=1e-7), key


def test_local_train_order_is_set_by_the_seed_and_changes_every_epoch(data, tmp_path):
    from din_ray.data.format import PreparedDataset
    from din_ray.train.local import LocalEnv

    def order(seed: int, epoch: int) -> list[tuple]:
        env = LocalEnv(config(data, tmp_path, seed=seed), PreparedDataset.open(data))
        return [row for b in env.train_batches(epoch)
                for row in zip(b["user"].tolist(), b["item_id"].tolist(), b["label"].tolist())]

    first = [order(3, epoch) for epoch in range(3)]
    assert first == [order(3, epoch) for epoch in range(3)]  # the same seed: the same order
    assert first[0] != first[1] and first[1] != first[2]  # each epoch another order
    assert first[0] != order(4, 0)
    assert all(sorted(o) == sorted(first[0]) for o in first)  # every row once


def test_a_local_epoch_is_one_permutation_of_the_whole_train_split(tmp_path):
    # Streamed file by file, an epoch's batches each came from one Parquet file; a split below
    # cache_below_mb is permuted whole, as a Ray run's in-memory split with the same seed.
    data = write_tiny_dataset(tmp_path / "data", rows=600)
    dataset = PreparedDataset.open(data)
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in dataset.files("train")]
    assert len(sizes) > 1
    whole = in_memory.read_columns(dataset, "train")
    env = LocalEnv(tiny_config(data, tmp_path / "out", batch_size=32, seed=3), dataset)
    order = in_memory.epoch_permutation(sum(sizes), 3 * 10_007 + 1)  # seed 3, epoch 1
    batches = list(env.train_batches(1))
    for column in ("hist_item_id", "item_id", "label"):
        np.testing.assert_array_equal(np.concatenate([b[column] for b in batches]),
                                      whole[column][order])
    file_of_row = np.repeat(np.arange(len(sizes)), sizes)
    assert len(set(file_of_row[order[:32]])) > 1  # the first batch mixes the files

    # Above cache_below_mb the split still streams (every row once an epoch).
    streamed = LocalEnv(tiny_config(data, tmp_path / "out2", batch_size=32, seed=3,
                                    cache_below_mb=0), dataset)
    assert streamed.train_columns is None
    assert sum(len(b["label"]) for b in streamed.train_batches(1)) == sum(sizes)
