"""A training run's output directory:

    OUTPUT/metrics.json   the best epoch's test and validation metrics, every epoch's history,
                          the model name and the full config
    OUTPUT/checkpoint/    a copy of the best epoch's checkpoint (what evaluate and serve load)
    OUTPUT/checkpoints/   the epoch checkpoints of a local run (latest and best kept)
    OUTPUT/ray/           Ray Train's storage of a distributed run, unless --storage-path
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from din_ray import checkpoint as ckpt
from din_ray import io as atomic
from din_ray.config import EXECUTION_KNOBS, TrainConfig

METRICS = "metrics.json"
CHECKPOINT = "checkpoint"


# Knobs a rerun into the same output may change and still resume the run there: how long it
# trains, where it runs, where the data lives now. Any other difference is another run.
RESUMABLE_CHANGES = frozenset({"data", "output", "init_from", "extra", "epochs", "patience",
                               "eval_batch_size", *EXECUTION_KNOBS, "threads", "precision"})


class OutputInUseError(ValueError):
    """The output directory holds a run of another configuration."""


def previous_run_config(cfg: TrainConfig) -> tuple[dict, Path] | None:
    """The config of a run already under `cfg.output` (or its local Ray storage), with the file
    it was read from: the latest epoch checkpoint a rerun would resume from, else the finished
    run's metrics.json. None for a fresh output."""
    out = Path(cfg.output)
    candidates = sorted((out / "checkpoints").glob("epoch-*/config.json"))[-1:]
    storage = ray_storage(cfg.execution.storage_path, cfg.output)
    if "://" not in storage:
        run_dir = Path(storage) / cfg.execution.run_name
        candidates += sorted(run_dir.glob("checkpoint_*/config.json"))[-1:]
    for path in candidates:
        if (path.parent / ckpt.MANIFEST).exists():
            return json.loads(path.read_text()), path
    if (out / METRICS).exists():
        recorded = json.loads((out / METRICS).read_text())
        if "config" in recorded:
            return recorded["config"], out / METRICS
    return None


def check_output_is_this_run(cfg: TrainConfig) -> None:
    """Before training: refuse an output directory that holds a run of another configuration
    (which would otherwise be resumed with this one's model, and fail loading its weights),
    naming every differing knob and what to do. A rerun of the same run resumes it."""
    found = previous_run_config(cfg)
    if found is None:
        return
    raw, path = found
    try:
        before = TrainConfig.from_dict(raw, str(path)).flat()
    except ValueError as e:
        raise OutputInUseError(f"{cfg.output} holds a run whose config cannot be read ({e}); "
                               "rerun with --overwrite to replace it, or choose another "
                               "--output") from None
    now = cfg.flat()
    diffs = [f"{k}: {before[k]!r} there, {now[k]!r} now" for k in now
             if k not in RESUMABLE_CHANGES and before[k] != now[k]]
    if diffs:
        raise OutputInUseError(
            f"{cfg.output} holds a run of another configuration ({path}): " + "; ".join(diffs)
            + ". Rerun with --overwrite to replace it, or choose another --output.")


def clear_output(cfg: TrainConfig) -> None:
    """Delete what a run left under `cfg.output` (and its run in a local Ray storage), so the
    next run starts fresh: `din-ray train --overwrite`."""
    out = Path(cfg.output)
    for name in ("checkpoints", CHECKPOINT, METRICS):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    storage = ray_storage(cfg.execution.storage_path, cfg.output)
    if "://" not in storage:
        shutil.rmtree(Path(storage) / cfg.execution.run_name, ignore_errors=True)


def ray_storage(storage_path: str, output: str | Path) -> str:
    """Ray's storage for a run or search: `storage_path` (a URI or a local directory), else
    OUTPUT/ray; local paths made absolute, as Ray requires."""
    path = storage_path or str(Path(output) / "ray")
    return path if "://" in path else str(Path(path).resolve())


def storage_join(storage: str, name: str) -> str:
    """`name` under a storage location, a URI or a local directory."""
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)


def finalize_output(cfg: TrainConfig, result: dict, best_checkpoint: Path | None) -> Path:
    """Copy the best epoch's checkpoint to OUTPUT/checkpoint and write OUTPUT/metrics.json."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if best_checkpoint is not None:
        final = out / CHECKPOINT
        with atomic.staged_dir(final) as tmp:
            shutil.copytree(best_checkpoint, tmp, dirs_exist_ok=True)
        result = {**result, "checkpoint": str(final)}
    result = {**result, "model": cfg.model.model, "config": cfg.to_dict()}
    atomic.write_json(out / METRICS, result)
    return out / METRICS
