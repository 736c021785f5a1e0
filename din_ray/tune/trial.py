"""A 1-worker Tune trial trained in the trial's own process, without a Ray Train run.

A trial with one worker has nothing to distribute, yet a TorchTrainer per trial costs a Train
controller, a placement group, a worker actor that imports torch and din_ray, a process group
and Train's checkpoint upload: about 25 s a trial on the bundled data on a loaded 2-core
machine, more than the trial's own epoch (issue 15, docs/benchmarks.md). Here the Tune function
trainable runs `train.train_loop` itself through `TrialEnv`:

  * data: as `din-ray train --local` reads it (`LocalEnv`: the Parquet files streamed, shuffled
    by the same seed), so a trial's losses and metrics are those of `--local` with its config
    and seed; the files are small enough for this path (below `cache_below_mb` they would
    otherwise be the object-store copies, which a single process does not need);
  * checkpoints: `epoch-NNNN` under RUNS/trial-<trial id> (a local directory or a URI), the
    layout of the Train run it replaces, keeping the latest and the best epoch (`best_index`);
    every epoch's `tune.report` carries the metrics plus `checkpoint_path`, as
    `TuneReportCallback` forwarded them from a Train run;
  * resume: a trial restarted under the same id (a resumed search) reports its latest complete
    epoch again (Tune may not have saved that report before the driver died) and continues
    from it.

With no Train run there is no Train placement group for an ASHA stop to leave behind, so a search
of 1-worker trials needs no dashboard (`din_ray.tune`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import torch

from din_ray import checkpoint as ckpt
from din_ray import io as atomic
from din_ray.data.format import PreparedDataset
from din_ray.train.loop import LocalEnv, TrainConfig, best_index, train_loop


class TrialEnv(LocalEnv):
    """`LocalEnv`'s batches; checkpoints under `run_dir` (path or URI), reported to Tune."""

    def __init__(self, cfg: TrainConfig, dataset: PreparedDataset, run_dir: str) -> None:
        super().__init__(cfg, dataset)
        # With use_gpu Tune gave this process one GPU (CUDA_VISIBLE_DEVICES): it is cuda:0.
        self.device = torch.device("cuda" if cfg.use_gpu else "cpu")
        self.run_dir = run_dir.rstrip("/")
        self.fs, self.path = pafs.FileSystem.from_uri(run_dir)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.fs.create_dir(self.path, recursive=True)

    def _complete(self) -> list[str]:
        """Names of the complete epoch checkpoints (manifest written: it comes last), sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        names = sorted(i.base_name for i in infos
                       if i.type == pafs.FileType.Directory and i.base_name.startswith("epoch-"))
        return [n for n in names
                if self.fs.get_file_info(f"{self.path}/{n}/{ckpt.MANIFEST}").type
                == pafs.FileType.File]

    def latest_checkpoint(self) -> Path | None:
        """The latest complete epoch, whose report is sent (again) before training resumes: a
        driver killed after the checkpoint was written and before Tune saved its report would
        otherwise leave that epoch unreported (a repeated report is dropped by ASHA and by
        `din_ray.tune.run._record`, which keeps the last of an epoch)."""
        from ray import tune

        done = self._complete()
        if not done:
            return None
        if self.local:
            local = Path(self.path) / done[-1]
        else:
            local = Path(tempfile.mkdtemp(prefix="din-ray-resume-"))  # remote storage: download
            pafs.copy_files(f"{self.path}/{done[-1]}", str(local), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        metrics = json.loads((local / "metrics.json").read_text())
        tune.report({**metrics, "checkpoint_path": f"{self.run_dir}/{done[-1]}"})
        return local

    def report(self, metrics: dict, write_checkpoint: Callable[[Path], None]) -> None:
        from ray import tune

        name = f"epoch-{metrics['epoch']:04d}"
        if self.local:
            with atomic.staged_dir(Path(self.path) / name) as tmp:  # complete or not at all
                write_checkpoint(tmp)
        else:
            with tempfile.TemporaryDirectory(prefix="din-ray-ckpt-") as tmp:
                write_checkpoint(Path(tmp))
                self._upload(Path(tmp), name)
        self._retain(name)
        tune.report({**metrics, "checkpoint_path": f"{self.run_dir}/{name}"})

    def _upload(self, tmp: Path, name: str) -> None:
        """Upload the checkpoint written in `tmp` as `name`. An object store has no rename:
        everything but the manifest goes first, then the manifest, so a checkpoint counts
        (`_complete`) only once all its files are there."""
        final = f"{self.path}/{name}"
        manifest = tmp / ckpt.MANIFEST
        held = manifest.rename(tmp.parent / f"{tmp.name}-{ckpt.MANIFEST}")
        self.fs.delete_dir_contents(final, missing_dir_ok=True)
        pafs.copy_files(str(tmp), final, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        pafs.copy_files(str(held), f"{final}/{ckpt.MANIFEST}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        held.unlink()

    def _retain(self, latest: str) -> None:
        """Delete every epoch checkpoint but `latest` and the best (the one `summarize` names)."""
        done = self._complete()
        metrics = []
        for n in done:
            with self.fs.open_input_stream(f"{self.path}/{n}/metrics.json") as f:
                metrics.append(json.loads(f.read()))
        keep = {latest, done[best_index(metrics)]}
        for n in done:
            if n not in keep:
                self.fs.delete_dir(f"{self.path}/{n}")


def run_trial_in_process(cfg: TrainConfig, run_dir: str) -> dict:
    """Train `cfg` (1 worker) in this Tune trial's process, checkpoints under `run_dir`, one
    `tune.report` per epoch. Returns the training summary (`train.summarize`)."""
    if cfg.workers != 1:
        raise ValueError(f"an in-process trial has 1 worker, got workers={cfg.workers}")
    # As a Ray Train worker would: the trial holds cpus_per_worker CPUs.
    torch.set_num_threads(cfg.threads or max(1, int(cfg.cpus_per_worker)))
    return train_loop(cfg, TrialEnv(cfg, PreparedDataset.open(cfg.data), run_dir))
