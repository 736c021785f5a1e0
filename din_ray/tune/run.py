"""Hyperparameter search on Ray Tune: Optuna's TPE proposes, ASHA stops the laggards, and every
trial is a distributed Ray Train run.

    din-ray tune --data runs/ml --output runs/tune --space default \\
        --trials 12 --workers-per-trial 1 --epochs 3

How it fits together (Ray 2.60, Train V2):
  * a 1-worker trial trains in the trial's own process (`din_ray.tune.trial`): no Train run,
    so no Train controller, placement group or worker actor per trial; it reads the data as
    `--local` does, reports every epoch with `tune.report` (metrics plus `checkpoint_path`) and
    holds `cpus_per_worker` CPUs itself; the rest of this list is about multi-worker trials;
  * each multi-worker trial is a Tune *function* trainable (`_trial`) that builds the run's
    `TorchTrainer` with `din_ray.train.distributed.build_trainer` and fits it;
    `TuneReportCallback` in the Train RunConfig forwards each epoch's report (rank 0's metrics
    plus `checkpoint_path`) to Tune, so ASHA sees validation GAUC per epoch
    (`time_attr="epoch"`, grace period 1 epoch);
  * the trial function itself reserves only `TRIAL_CPUS` CPU: the Train workers request theirs
    (`workers_per_trial x cpus_per_worker`) in a placement group of their own, so the number of
    concurrent trials is set from the cluster's CPUs (`concurrent_trials`) unless given;
  * the splits below `cache_below_mb` are read once, by this driver, into Ray's object store
    (`din_ray.train.distributed.put_small_splits`); every trial's workers slice the same arrays, so
    a trial starts without reading any data;
  * every trial's Train run lives under STORAGE/<name>-runs/trial-<trial id>, keeping its best
    (by validation GAUC) and latest epoch checkpoints;
  * rerunning the same command resumes: `Tuner.restore` on STORAGE/<name> restores the searcher,
    the scheduler and the finished trials, and an unfinished trial restarts its Train run under
    the same name, which resumes from that run's latest epoch checkpoint; the trial first reports
    again the epochs before it (`_report_earlier_epochs`: Tune restarts it with empty result
    files). A search killed before Tune first saved its state starts afresh (`_has_saved_state`).

Outputs in OUTPUT (`din_ray.tune.results`): trials.csv (one row per trial), best.json (config,
metrics, checkpoint), best_checkpoint/ (a copy of the winner's best epoch; what `din-ray serve
OUTPUT` loads), tune.png (validation metric per epoch for every trial); and settings.json (what a
resume must match).

The known trap: a trial that ASHA stops must release its Train run's placement group, or later
trials wait forever. On Ray 2.60 that cleanup goes through the dashboard, so for multi-worker
trials a local Ray is started with it on and with its address known to every Ray process
(`din_ray.ray_session`); in-process trials have no Train placement group and start Ray without
it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from din_ray import checkpoint as ckpt
from din_ray.config import TrainConfig, knob
from din_ray.ray_session import connect
from din_ray.train.outputs import ray_storage, storage_join
from din_ray.tune.results import (
    history_record,
    plain,
    trial_record,
    write_json,
    write_outputs,
)
from din_ray.tune.space import SearchSpace, load_space

log = logging.getLogger(__name__)

# CPU the trial function itself holds (it only waits on the Train controller): a small share so
# Tune's own accounting does not compete with the Train workers for CPUs.
TRIAL_CPUS = 0.01
# CPUs besides the workers' that a running trial needs for Ray Data's read tasks.
READ_CPUS = 1.0


@dataclass(frozen=True)
class TuneSettings:
    """A tuning run. The training fields that stay fixed come separately, as a TrainConfig.

    Args:
        output: directory for trials.csv, best.json, best_checkpoint/, tune.png, settings.json.
        space: search space: a YAML file or a packaged space's name (`load_space`).
        trials: number of configurations tried.
        workers_per_trial: Ray Train workers of each trial.
        max_concurrent: trials run at once; 0 = as many as the cluster's CPUs hold.
        sampler_seed: seed of Optuna's TPE sampler (trainings use the TrainConfig's seed).
        grace_period: epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA's η; a trial continues past a rung only in the top 1/η there.
        startup_trials: TPE's random trials before it models the results; 0 = a third of
            `trials` (at least 2), so a 12-trial search is mostly guided.
        default_trial: evaluate the fixed TrainConfig's own values of the searched parameters
            first (the untuned baseline, scored under the same budget) when they lie in the space.
        storage_path: Ray storage (local directory or URI); "" = OUTPUT/ray.
        name: experiment name under the storage; resuming needs the same one.
        address: Ray cluster to join; "" = $RAY_ADDRESS, else a local Ray is started.
        num_cpus: logical CPUs of a local Ray; 0 = enough for the concurrent trials, at least 4.
    """

    output: str = knob("", "directory for trials.csv, best.json, best_checkpoint/, tune.png; "
                           "rerunning the same command resumes the search there")
    space: str = knob("default", "search space: a YAML file, or a packaged space's name "
                                 "(default, extended: din_ray/resources/tune_spaces/)")
    trials: int = knob(12, "configurations to try")
    workers_per_trial: int = knob(1, "Ray Train workers of each trial")
    max_concurrent: int = knob(0, "trials at once (0 = as many as the cluster's CPUs hold)")
    sampler_seed: int = knob(0, "seed of Optuna's sampler (--seed is every trial's training "
                                "seed)")
    grace_period: int = knob(1, "epochs before ASHA may stop a trial")
    reduction_factor: int = knob(3, "ASHA's η: a trial goes on past a rung only in the top 1/η")
    startup_trials: int = knob(0, "random trials before TPE models the results (0 = a third "
                                  "of --trials)")
    default_trial: bool = knob(True, "do not spend the first trial on the untuned defaults",
                               flag="--no-default-trial")
    storage_path: str = knob("", "Ray storage (local dir or s3:// / gs:// URI); default "
                                 "OUTPUT/ray")
    name: str = knob("tune", "experiment name under the storage")
    address: str = knob("", "Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")
    num_cpus: int = knob(0, "logical CPUs of a local Ray (0 = enough for the concurrent "
                            "trials)")

    def __post_init__(self) -> None:
        checks = {"trials": self.trials >= 1, "workers_per_trial": self.workers_per_trial >= 1,
                  "max_concurrent": self.max_concurrent >= 0,
                  "grace_period": self.grace_period >= 1,
                  "reduction_factor": self.reduction_factor >= 2,
                  "startup_trials": self.startup_trials >= 0, "num_cpus": self.num_cpus >= 0}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"{key} is out of range: {getattr(self, key)!r}")
        if not self.output:
            raise ValueError("output must name a directory")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")

    def storage(self) -> str:
        return ray_storage(self.storage_path, self.output)


# --- the trial ----------------------------------------------------------------------------------
def _trial(config: dict, base: dict, runs_storage: str, in_memory_splits: dict) -> None:
    """One trial: a training run of `base` with the sampled `config` values; with one worker in
    this process (`din_ray.tune.trial`), else a distributed run on the splits the search put
    into the object store (`in_memory_splits`, split -> ObjectRef)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from din_ray.train.distributed import build_trainer, check_config

    trial_id = tune.get_context().get_trial_id()
    cfg = TrainConfig.from_dict(base, "the search's base config").replace(
        **{k: plain(v) for k, v in config.items()}, storage_path=runs_storage,
        run_name=f"trial-{trial_id}")
    if in_process(cfg.execution.workers):
        from din_ray.tune.trial import run_trial_in_process

        run_trial_in_process(cfg, storage_join(runs_storage, cfg.execution.run_name))
        return
    dataset = check_config(cfg)
    _report_earlier_epochs(storage_join(runs_storage, cfg.execution.run_name))
    # A failed trial is reported by Tune as errored; the TrainingFailedError names the cause.
    build_trainer(cfg, dataset, callbacks=[TuneReportCallback()],
                  in_memory_splits=in_memory_splits).fit()


# --- the driver ---------------------------------------------------------------------------------
def in_process(workers_per_trial: int) -> bool:
    """Whether trials train in the trial's own process (`din_ray.tune.trial`), not in Train."""
    return workers_per_trial == 1


def trial_cpus(workers: int, cpus_per_worker: float) -> float:
    """CPUs one running trial holds: an in-process trial its worker's; a Train trial its
    workers', its read tasks' and the trial function's own."""
    if in_process(workers):
        return cpus_per_worker
    return workers * cpus_per_worker + READ_CPUS + TRIAL_CPUS


def concurrent_trials(cluster_cpus: float, workers: int, cpus_per_worker: float) -> int:
    """Trials whose workers and read tasks fit the cluster's CPUs at once (at least 1)."""
    return max(1, math.floor(cluster_cpus / trial_cpus(workers, cpus_per_worker)))


def _settings_record(settings: TuneSettings, space: SearchSpace, base: TrainConfig) -> dict:
    """What a resumed run must share with the original (how it connects may differ)."""
    record = {k: v for k, v in asdict(settings).items()
              if k not in ("address", "num_cpus", "max_concurrent", "output", "space")}
    record["space"] = space.to_dict()  # its content: the same file may be named another way
    record["train"] = json.loads(json.dumps(base.flat()))  # tuples as lists, as on disk
    return record


def _check_resume(path: Path, record: dict) -> None:
    """Refuse to resume a run recorded in `path` under different settings, naming the first
    difference. A TrainConfig field added since the run was recorded counts as unchanged while
    it keeps its default (the original run trained with that behaviour)."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    if "seed" in old:  # recorded before the sampler's seed had a name of its own
        old["sampler_seed"] = old.pop("seed")
    # The one rule for configs read back: an unknown key fails, a missing one is today's default.
    old_train = TrainConfig.from_dict(old.get("train", {}), f"{path} [train]")
    old = {**old, "train": json.loads(json.dumps(old_train.flat()))}
    for key in sorted(set(old) | set(record)):
        if old.get(key) != record.get(key):
            if isinstance(old.get(key), dict) and isinstance(record.get(key), dict):
                diff = sorted(k for k in set(old[key]) | set(record[key])
                              if old[key].get(k) != record[key].get(k))
                key = f"{key}.{diff[0]}" if diff else key
            raise ValueError(f"{path}: this output holds a tuning run with different settings "
                             f"({key} differs); rerun with the original arguments to resume it, "
                             "or choose another --output")


def _connect(settings: TuneSettings, base: TrainConfig, max_concurrent: int) -> bool:
    per_trial = trial_cpus(settings.workers_per_trial, base.execution.cpus_per_worker)
    return connect(settings.address,
                   settings.num_cpus or max(4, math.ceil(per_trial * max(max_concurrent, 1))),
                   dashboard=not in_process(settings.workers_per_trial))


def run_tune(settings: TuneSettings, base: TrainConfig) -> dict:
    """Search `settings.space` around the fixed training config `base`; write the outputs.

    Returns best.json's content plus "trials" (the trials.csv rows) and "paths"."""
    import ray
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from din_ray.train.distributed import check_config, check_gpus

    space, base, out = _prepare(settings, base)
    dataset = check_config(base)  # the data and the fixed fields, before any Ray work
    record = _settings_record(settings, space, base)
    _check_resume(out / "settings.json", record)
    write_json(out / "settings.json", record)

    connected = _connect(settings, base, settings.max_concurrent)
    try:
        check_gpus(base)
        max_concurrent = settings.max_concurrent or concurrent_trials(
            ray.cluster_resources().get("CPU", 1.0), settings.workers_per_trial,
            base.execution.cpus_per_worker)
        storage = settings.storage()
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base.to_dict(),
                                 runs_storage=storage_join(storage, f"{settings.name}-runs"),
                                 in_memory_splits=_shared_splits(dataset, base)),
            _trial_resources(base))
        experiment = storage_join(storage, settings.name)
        if tune.Tuner.can_restore(experiment) and _has_saved_state(experiment):
            log.info("resuming the tuning run in %s", experiment)
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False)
        else:
            log.info("tuning %s with %d trials, %d at a time, %d worker(s) each",
                     ", ".join(p.describe() for p in space.params.values()), settings.trials,
                     max_concurrent, settings.workers_per_trial)
            tuner = _new_tuner(settings, space, base, trainable, storage, max_concurrent,
                               TPESampler, ASHAScheduler, OptunaSearch)
        grid = tuner.fit()
        return write_outputs(out, space, base, [trial_record(r, base) for r in grid])
    finally:
        if connected:
            ray.shutdown()


def _shared_splits(dataset, base: TrainConfig) -> dict:
    """The small splits in the object store for Train trials' workers; in-process trials read
    the files as `--local` does and need none."""
    from din_ray.train.distributed import put_small_splits

    return {} if in_process(base.execution.workers) else put_small_splits(dataset, base)


def _trial_resources(base: TrainConfig) -> dict:
    """What Tune reserves for the trial function: an in-process trial's worker, or a sliver
    for one that only waits on its Train run (whose workers reserve their own)."""
    if not in_process(base.execution.workers):
        return {"CPU": TRIAL_CPUS}
    return {"CPU": base.execution.cpus_per_worker,
            **({"GPU": 1} if base.execution.use_gpu else {})}


def summarize_tune(settings: TuneSettings, base: TrainConfig) -> dict:
    """Write the outputs from the trials of a search so far, without running any (for a search
    that was interrupted, or is still running under another driver). No Ray cluster needed."""
    from ray.tune import ExperimentAnalysis

    space, base, out = _prepare(settings, base)
    _check_resume(out / "settings.json", _settings_record(settings, space, base))
    experiment = storage_join(settings.storage(), settings.name)
    analysis = ExperimentAnalysis(experiment)
    frames = analysis.trial_dataframes
    records = [history_record(t.trial_id, t.config, frames.get(t.trial_id), _error_line(t),
                              t.status, base) for t in analysis.trials]
    return write_outputs(out, space, base, records)


def _error_line(trial) -> str | None:
    """The exception line of an errored trial's error.txt, when stored locally."""
    path = Path(trial.path or "") / "error.txt"
    if trial.status != "ERROR" or not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()
             if line.strip()]
    if not lines:
        return None
    raised = [line for line in lines if "Error:" in line]  # "module.SomeError: message"
    return (raised or lines)[-1][:300]


def _prepare(settings: TuneSettings, base: TrainConfig) -> tuple[SearchSpace, TrainConfig, Path]:
    space = load_space(settings.space)
    out = Path(settings.output).resolve()
    base = base.replace(data=str(Path(base.data).resolve()), output=str(out),
                        workers=settings.workers_per_trial)
    out.mkdir(parents=True, exist_ok=True)
    return space, base, out


def _new_tuner(settings, space, base, trainable, storage, max_concurrent, sampler_cls,
               scheduler_cls, searcher_cls):
    from ray import tune

    startup = settings.startup_trials or max(2, settings.trials // 3)
    defaults = default_point(space, base) if settings.default_trial else None
    searcher = searcher_cls(
        sampler=sampler_cls(seed=settings.sampler_seed, n_startup_trials=startup),
        points_to_evaluate=[defaults] if defaults else None)
    scheduler = scheduler_cls(time_attr="epoch", max_t=base.optim.epochs,
                              grace_period=min(settings.grace_period, base.optim.epochs),
                              reduction_factor=settings.reduction_factor)
    return tune.Tuner(
        trainable, param_space=space.to_tune(),
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=settings.trials,
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=settings.name, storage_path=storage, verbose=1))


def default_point(space: SearchSpace, base: TrainConfig) -> dict | None:
    """The fixed config's values of the searched parameters, if all lie in the space."""
    point = {}
    for name, p in space.params.items():
        value = base.get(name)
        inside = (value in p.args if p.distribution == "choice"
                  else p.args[0] <= value <= p.args[1])
        if not inside:
            log.info("default trial skipped: %s=%r is outside the space", name, value)
            return None
        point[name] = value
    return point


def _listing(directory: str) -> dict[str, bool]:
    """Entries of a local directory or URI: name -> whether it is a directory ({} if absent)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(directory) if "://" in directory else (
        pyarrow.fs.LocalFileSystem(), directory)
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return {Path(f.path).name: f.type == pyarrow.fs.FileType.Directory for f in found}


def _has_saved_state(experiment: str) -> bool:
    """Whether Tune saved the state of the experiment (local directory or URI). The Tuner writes
    tuner.pkl, what `Tuner.can_restore` looks for, when it is created; its first experiment
    state comes with the first step of the search. A driver killed in between leaves nothing to
    restore, and `Tuner.restore` would then fail on every rerun: start afresh instead."""
    return any(name.startswith("experiment_state-") for name in _listing(experiment))


def _report_earlier_epochs(run_dir: str) -> None:
    """Report again, to this trial's Tune session, the epochs its Train run (`run_dir`) had
    finished before this start of the trial.

    A search resumed after its driver was killed restarts an unfinished trial with empty result
    files: the trial holds no Tune checkpoint, so Tune restores none of its reports (they lived
    in the killed session's staging directory). Its Train run resumes after its latest
    registered epoch checkpoint and reports only the epochs after it, so without these reports
    the earlier ones would be missing from the trial's history (trials.csv, best.json) and from
    ASHA's view. No work is repeated: the metrics come from the history in the latest complete
    checkpoint. That may be one written as the driver died but never registered, whose epoch
    Train then trains again; `history_record` counts a twice-reported epoch once (the latest
    wins).
    """
    import ray.train
    from ray import tune

    entries = _listing(run_dir)
    epochs = sorted((name for name, is_dir in entries.items()
                     if is_dir and name.startswith("epoch-")), reverse=True)
    for name in epochs:
        try:
            with ray.train.Checkpoint(storage_join(run_dir, name)).as_directory() as local:
                history = json.loads(ckpt.Checkpoint.open(local).dense_state()["history"])
            break
        except ckpt.CheckpointError:
            continue  # cut short by the kill; Train resumes from the one before
    else:
        return  # a first start, or killed before its first checkpoint
    for row in history:
        kept = f"epoch-{int(row['epoch']):04d}"  # Train keeps the best and the latest epochs
        path = storage_join(run_dir, kept) if kept in epochs else None
        tune.report({**row, "checkpoint_path": path})
