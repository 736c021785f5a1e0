"""Checkpoint durability and loading safety: fsync before every publishing rename, manifest names
confined to the checkpoint directory, and the kept checkpoint being the epoch metrics.json names."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from builders import tiny_config, write_tiny_dataset

from din_ray.checkpoint import MANIFEST, Checkpoint, CheckpointError
from din_ray.config import TrainConfig
from din_ray.train.local import run_local
from din_ray.train.selection import best_epoch_dir, summarize


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("ckpt") / "data", rows=200)


def config(data, out, **kw) -> TrainConfig:
    return tiny_config(data, out, **kw)


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run_local(config(data, out, model="popularity"))
    return out / "checkpoint"


def test_files_and_directories_reach_the_disk_before_the_rename_that_publishes_them(
        data, tmp_path, monkeypatch):
    events: list[tuple] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(real):
        def spy(src, dst, *args, **kwargs):
            events.append(("rename", os.fspath(src), os.fspath(dst)))
            return real(src, dst, *args, **kwargs)
        return spy

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", rename(real_replace))
    monkeypatch.setattr(os, "rename", rename(real_rename))
    out = tmp_path / "run"
    run_local(config(data, out, model="popularity"))
    monkeypatch.undo()

    for final in (out / "checkpoints" / "epoch-0001", out / "checkpoint"):
        i, (_, src, _) = next((i, e) for i, e in enumerate(events)
                              if e[0] == "rename" and e[2] == str(final))
        before = {p for e in events[:i] if e[0] == "fsync" for p in [e[1]]}
        inside = [p.relative_to(final) for p in final.rglob("*")]
        assert (Path(final) / "tables").is_dir() and inside
        not_synced = [str(rel) for rel in inside if str(Path(src) / rel) not in before]
        assert not not_synced, f"{final.name}: not fsynced before the rename: {not_synced}"
        assert src in before, f"{final.name}: the directory itself was not fsynced"
        # The rename is on disk too: the parent directory is synced after it.
        assert ("fsync", str(final.parent)) in events[i:]


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    manifest = json.loads((dst / MANIFEST).read_text())
    edit(manifest, dst)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def test_manifest_names_that_leave_the_checkpoint_directory_are_refused(checkpoint, tmp_path):
    outside = tmp_path / "outside.pt"
    shutil.copyfile(checkpoint / "dense.pt", outside)

    def append(name):
        return lambda m, _: m["files"].append(name)

    def shard_symlink(m, root):
        shard = next(iter(m["tables"].values()))["shards"][0]["file"]
        (root / shard).unlink()
        (root / shard).symlink_to(outside)

    table = next(iter(json.loads((checkpoint / MANIFEST).read_text())["tables"]))
    cases = {
        "parent": (append("../outside.pt"), r"files\[\d+\] = '\.\./outside\.pt' leaves"),
        "absolute": (append(str(outside)), rf"files\[\d+\] = '{outside}' leaves"),
        "symlink": (shard_symlink,
                    rf"tables\['{table}'\]\.shards\[0\]\.file = .* resolves to {outside}"),
        "unlisted": (lambda m, _: m["files"].remove("dense.pt"), r"does not list \['dense.pt'\]"),
    }
    for name, (edit, message) in cases.items():
        bad = _edit_manifest(checkpoint, tmp_path / name, edit)
        with pytest.raises(CheckpointError, match=message):
            Checkpoint.open(bad)
    Checkpoint.open(checkpoint)  # the untouched one still opens


def _fake_epochs(root: Path, gaucs: list[float]) -> list[dict]:
    history = []
    for epoch, g in enumerate(gaucs, start=1):
        metrics = {"epoch": epoch, "valid_gauc": g, "test_gauc": g, "test_auc": g,
                   "test_logloss": 0.5, "valid_auc": g, "valid_logloss": 0.5}
        d = root / f"epoch-{epoch:04d}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / MANIFEST).write_text("{}")
        history.append(metrics)
    return history


@pytest.mark.parametrize("gaucs", [[0.7, 0.7, 0.7], [math.nan, math.nan], [math.nan, 0.6, 0.6]])
def test_the_kept_best_checkpoint_is_the_epoch_summarize_names(tmp_path, gaucs):
    # Ties go to the earliest epoch, and NaN counts as the lowest, in both.
    history = _fake_epochs(tmp_path, gaucs)
    assert best_epoch_dir(tmp_path) == f"epoch-{summarize(history)['best_epoch']:04d}"
