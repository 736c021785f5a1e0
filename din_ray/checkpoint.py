"""Sharded checkpoints that restore at any worker count.

    CKPT/
      manifest.json                      written last: lists every file with its SHA-256;
                                         its presence = complete
      schema.json, config.json, metrics.json
      dense.pt                           dense model state, dense optimizer state, step counts
      tables/<table>.<start>-<end>.pt    one row block per worker: weight (+ Adam moments)
      vocab/<table>.parquet              raw id -> dense id, copied from the prepared data
      id_filter.npz                      only for reg="filter": table -> (rows,) dense id -> the
                                         id the model saw (the dropped ids map to OOV)

Each worker writes its own row blocks (`write_worker_files`); rank 0 writes the rest and the
manifest (`write_manifest`). A reader asks for any row range (`Checkpoint.table_rows`) and gets it
stitched from whichever blocks overlap it, so 2 workers' blocks restore into 1 or 3 workers.

Opening a checkpoint verifies every file against the manifest's SHA-256 before anything is
loaded, so a missing, truncated or corrupted file fails naming the file and no model is ever
built from part of a checkpoint. Workers may write their blocks on other machines (Ray Train
merges the directories), so their digests reach rank 0 through a collective
(`gather_shard_digests`).

Everything is read with `torch.load(weights_only=True)` (tensors and plain containers only, never
arbitrary pickles) and JSON, so loading an untrusted checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from din_ray import io as atomic
from din_ray.embeddings.optim import RowWiseOptimizer
from din_ray.embeddings.tables import EmbeddingTables, TableSpec, row_block
from din_ray.model import CTRModel, ModelConfig, build_model
from din_ray.schema import Schema

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ID_FILTER = "id_filter.npz"
# Read by `Checkpoint` under these fixed names, so the manifest must list (and vouch for) them.
LOADED_FILES = ("dense.pt", "schema.json", "config.json", "metrics.json")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit what it is loaded into."""


def shard_file(table: str, start: int, end: int) -> str:
    return f"tables/{table}.{start}-{end}.pt"


def file_digest(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _all_shard_files(specs: dict[str, TableSpec], world_size: int) -> list[str]:
    return [shard_file(name, *row_block(s.num_rows, r, world_size))
            for name, s in specs.items() for r in range(world_size)]


def gather_shard_digests(local: dict[str, str], specs: dict[str, TableSpec], world_size: int,
                         all_reduce_sum) -> dict[str, str]:
    """Every worker's shard digests on every worker: each fills the rows of its own files in a
    zero (files, 32) byte matrix, and a sum all-reduce (`all_reduce_sum`, the training
    environment's) combines them exactly, since no two workers write the same file."""
    files = _all_shard_files(specs, world_size)
    table = torch.zeros(len(files), 32, dtype=torch.int64)
    for i, name in enumerate(files):
        if name in local:
            table[i] = torch.tensor(list(bytes.fromhex(local[name])), dtype=torch.int64)
    table = all_reduce_sum(table)
    return {name: bytes(row.tolist()).hex() for name, row in zip(files, table)}


def _atomic_torch_save(obj, path: Path) -> None:
    atomic.write_with(path, lambda tmp: torch.save(obj, tmp))


def _atomic_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
    atomic.write_with(path, write)


def write_worker_files(directory: str | Path, tables: EmbeddingTables,
                       optimizer: RowWiseOptimizer | None) -> dict[str, str]:
    """Write this worker's row block of every table, with its optimizer moments; returns
    their SHA-256 by file name (for the manifest)."""
    digests = {}
    directory = Path(directory)
    for name, spec in tables.specs.items():
        # The worker's row_block, which is all it holds unless the table is replicated (then
        # every worker holds all rows and saves its row_block's slice, as the manifest lists).
        start, end = row_block(spec.num_rows, tables.rank, tables.world_size)
        held = tables.blocks[name][0]
        blob = {"weight": tables.weight(name)[start - held:end - held].cpu().clone()}
        if optimizer is not None:
            blob.update({k: v[start - held:end - held].cpu().clone()
                         for k, v in optimizer.state_rows(name).items()})
        _atomic_torch_save(blob, directory / shard_file(name, start, end))
        digests[shard_file(name, start, end)] = file_digest(directory / shard_file(name, start,
                                                                                     end))
    return digests


def write_manifest(directory: str | Path, *, schema: Schema, config: dict, metrics: dict,
                   specs: dict[str, TableSpec], world_size: int, dense: dict,
                   vocab_dir: str | Path | None = None,
                   id_remap: dict[str, np.ndarray] | None = None,
                   shard_digests: dict[str, str] | None = None) -> None:
    """Rank 0: dense state, schema, config, metrics, vocabularies, the id filter's remapping
    (`id_remap`, table -> (rows,) int64) when training used one, then the manifest (last),
    with the SHA-256 of every file: rank 0's own, and all workers' shards (`shard_digests`,
    from `gather_shard_digests`; a single process may leave it None: its shards are here)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(dense, directory / "dense.pt")
    atomic.write_json(directory / "schema.json", schema.to_dict())
    atomic.write_json(directory / "config.json", config)
    atomic.write_json(directory / "metrics.json", metrics)
    listed_files = []
    if vocab_dir is not None and Path(vocab_dir).is_dir():
        (directory / "vocab").mkdir(exist_ok=True)
        for f in sorted(Path(vocab_dir).glob("*.parquet")):
            atomic.copy_file(f, directory / "vocab" / f.name)
            listed_files.append(f"vocab/{f.name}")
    if id_remap:
        _atomic_arrays(directory / ID_FILTER, id_remap)
        listed_files.append(ID_FILTER)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "world_size": world_size,
        "tables": {
            name: {"num_rows": s.num_rows, "dim": s.dim,
                   "shards": [{"file": shard_file(name, *row_block(s.num_rows, r, world_size)),
                               "start": row_block(s.num_rows, r, world_size)[0],
                               "end": row_block(s.num_rows, r, world_size)[1]}
                              for r in range(world_size)]}
            for name, s in specs.items()
        },
        "files": ["dense.pt", "schema.json", "config.json", "metrics.json", *listed_files],
    }
    shards = _all_shard_files(specs, world_size)
    if shard_digests is None:
        shard_digests = {f: file_digest(directory / f) for f in shards}
    manifest["sha256"] = {**{f: file_digest(directory / f) for f in manifest["files"]},
                          **{f: shard_digests[f] for f in shards}}
    atomic.write_json(directory / MANIFEST, manifest)


def _check_inside(root: Path, entry: str, name) -> None:
    """Refuse a manifest file name that would read from outside the checkpoint directory: an
    absolute path, a '..' component, or a symlink (anywhere on the way) that leads out."""
    where = f"{root / MANIFEST}: {entry} = {name!r}"
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where} is not a file name")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{where} leaves the checkpoint directory; names must be "
                              "relative paths inside it")
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise CheckpointError(f"{where} resolves to {target}, outside the checkpoint directory "
                              "(a symlink leads out)")


@dataclass
class Checkpoint:
    """A complete checkpoint on local disk, validated on open."""

    path: Path
    manifest: dict
    schema: Schema
    config: dict
    metrics: dict

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory not found")
        mpath = path / MANIFEST
        if not mpath.exists():
            raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete")
        manifest = _read_json(mpath)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{mpath}: format_version {manifest.get('format_version')!r} "
                                  f"is not {FORMAT_VERSION}")
        listed = {f"files[{i}]": f for i, f in enumerate(manifest["files"])}
        listed.update({f"tables[{t!r}].shards[{i}].file": s["file"]
                       for t, spec in manifest["tables"].items()
                       for i, s in enumerate(spec["shards"])})
        for entry, name in listed.items():
            _check_inside(path, entry, name)
        unlisted = [f for f in LOADED_FILES if f not in manifest["files"]]
        if unlisted:
            raise CheckpointError(f"{mpath}: 'files' does not list {unlisted}")
        missing = [f for f in listed.values() if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path}: incomplete, missing {missing[:5]}")
        # Checkpoints written before digests were recorded have no "sha256" and are trusted.
        for name, digest in manifest.get("sha256", {}).items():
            if file_digest(path / name) != digest:
                raise CheckpointError(f"{path / name}: SHA-256 differs from the manifest's; the "
                                      "file is corrupted or was changed after the checkpoint "
                                      "was written")
        return cls(path, manifest, Schema.load(path / "schema.json"),
                   _read_json(path / "config.json"), _read_json(path / "metrics.json"))

    def dense_state(self) -> dict:
        return _torch_load(self.path / "dense.pt")

    def table_specs(self) -> dict[str, TableSpec]:
        tables = self.manifest["tables"]
        return {n: TableSpec(n, t["num_rows"], t["dim"]) for n, t in tables.items()}

    def table_rows(self, table: str, start: int, end: int) -> dict[str, Tensor]:
        """Rows [start, end) of `table` (weight and optimizer moments), stitched from the saved
        blocks whatever worker count wrote them."""
        if table not in self.manifest["tables"]:
            raise CheckpointError(f"{self.path}: no table {table!r}")
        parts: dict[str, list[Tensor]] = {}
        for shard in self.manifest["tables"][table]["shards"]:
            lo, hi = max(start, shard["start"]), min(end, shard["end"])
            if lo >= hi:
                continue
            blob = _torch_load(self.path / shard["file"])
            for key, value in blob.items():
                parts.setdefault(key, []).append(value[lo - shard["start"]:hi - shard["start"]])
        return {k: torch.cat(v) for k, v in parts.items()}

    def restore_tables(self, tables: EmbeddingTables,
                       optimizer: RowWiseOptimizer | None = None) -> None:
        """Fill this worker's blocks (and optimizer moments) from the checkpoint."""
        saved = self.table_specs()
        for name, spec in tables.specs.items():
            if name not in saved or (saved[name].num_rows, saved[name].dim) != (spec.num_rows,
                                                                                spec.dim):
                raise CheckpointError(f"{self.path}: table {name!r} is {saved.get(name)} in the "
                                      f"checkpoint but the model needs {spec}")
            rows = self.table_rows(name, *tables.blocks[name])
            tables.weight(name).copy_(rows["weight"])
            if optimizer is not None:
                for key, value in optimizer.state_rows(name).items():
                    if key in rows:
                        value.copy_(rows[key])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _torch_load(path: Path) -> dict:
    """A tensor file; one that cannot be read (truncated, not a torch file) names itself."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable tensor file ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


def load_model(path: str | Path) -> tuple[CTRModel, EmbeddingTables, Checkpoint]:
    """A checkpoint as an evaluation-mode model with whole (unsharded) tables: what evaluation,
    serving and the reports load. The model is rebuilt from the model fields of the saved
    training config, so nothing here depends on `train`."""
    c = Checkpoint.open(path)
    model = build_model(c.schema, ModelConfig.from_dict(c.config))
    model.load_state_dict(c.dense_state()["model"])
    tables = EmbeddingTables(model.table_specs())
    c.restore_tables(tables)
    return model.eval(), tables.eval(), c
