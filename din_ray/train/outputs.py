"""A training run's output directory:

    OUTPUT/metrics.json   the best epoch's test and validation metrics, every epoch's history,
                          the model name and the full config
    OUTPUT/checkpoint/    a copy of the best epoch's checkpoint (what evaluate and serve load)
    OUTPUT/checkpoints/   the epoch checkpoints of a local run (latest and best kept)
    OUTPUT/ray/           Ray Train's storage of a distributed run, unless --storage-path
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from din_ray import checkpoint as ckpt
from din_ray.config import TrainConfig


def finalize_output(cfg: TrainConfig, result: dict, best_checkpoint: Path | None) -> Path:
    """Copy the best epoch's checkpoint to OUTPUT/checkpoint and write OUTPUT/metrics.json."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if best_checkpoint is not None:
        final = out / "checkpoint"
        tmp = out / f".checkpoint.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best_checkpoint, tmp)
        shutil.rmtree(final, ignore_errors=True)
        ckpt.publish(tmp, final)
        result = {**result, "checkpoint": str(final)}
    result = {**result, "model": cfg.model.model, "config": cfg.to_dict()}
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out / "metrics.json")
    return out / "metrics.json"
