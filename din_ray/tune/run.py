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

Outputs in OUTPUT: trials.csv (one row per trial), best.json (config, metrics, checkpoint),
best_checkpoint/ (a copy of the winner's best epoch; what `din-ray serve OUTPUT` loads), tune.png
(validation metric per epoch for every trial) and settings.json (what a resume must match).

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from din_ray import checkpoint as ckpt
from din_ray import io as atomic
from din_ray.ray_session import connect
from din_ray.train.loop import TrainConfig
from din_ray.tune.space import SearchSpace, load_space

log = logging.getLogger(__name__)

# CPU the trial function itself holds (it only waits on the Train controller): a small share so
# Tune's own accounting does not compete with the Train workers for CPUs.
TRIAL_CPUS = 0.01
# CPUs besides the workers' that a running trial needs for Ray Data's read tasks.
READ_CPUS = 1.0
STATUSES = ("completed", "early-stopped", "patience-stopped", "errored", "unfinished",
            "not-run")


class NoResultError(RuntimeError):
    """No trial has reported a metric (all errored, or none got through an epoch yet)."""


@dataclass(frozen=True)
class TuneSettings:
    """A tuning run. The training fields that stay fixed come separately, as a TrainConfig.

    Args:
        output: directory for trials.csv, best.json, best_checkpoint/, tune.png, settings.json.
        space: search space: a YAML file or a packaged space's name (`load_space`).
        trials: number of configurations tried.
        workers_per_trial: Ray Train workers of each trial.
        max_concurrent: trials run at once; 0 = as many as the cluster's CPUs hold.
        seed: seed of Optuna's TPE sampler (trainings use the TrainConfig's seed).
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

    output: str
    space: str = "default"  # a packaged space's name (din_ray/resources/tune_spaces) or a path
    trials: int = 12
    workers_per_trial: int = 1
    max_concurrent: int = 0
    seed: int = 0
    grace_period: int = 1
    reduction_factor: int = 3
    startup_trials: int = 0
    default_trial: bool = True
    storage_path: str = ""
    name: str = "tune"
    address: str = ""
    num_cpus: int = 0

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
        path = self.storage_path or str(Path(self.output) / "ray")
        return path if "://" in path else str(Path(path).resolve())


# --- the trial ----------------------------------------------------------------------------------
def _plain(value):
    """numpy scalars from the sampler as Python values (TrainConfig and JSON want those)."""
    return value.item() if isinstance(value, np.generic) else value


def _trial(config: dict, base: dict, runs_storage: str, in_memory_splits: dict) -> None:
    """One trial: a training run of `base` with the sampled `config` values; with one worker in
    this process (`din_ray.tune.trial`), else a distributed run on the splits the search put
    into the object store (`in_memory_splits`, split -> ObjectRef)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from din_ray.train.distributed import build_trainer, check_config

    trial_id = tune.get_context().get_trial_id()
    values = {**base, **{k: _plain(v) for k, v in config.items()},
              "storage_path": runs_storage, "run_name": f"trial-{trial_id}"}
    cfg = TrainConfig.from_dict(values)
    if in_process(cfg.workers):
        from din_ray.tune.trial import run_trial_in_process

        run_trial_in_process(cfg, _join(runs_storage, cfg.run_name))
        return
    dataset = check_config(cfg)
    _report_earlier_epochs(_join(runs_storage, cfg.run_name))
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
    record["train"] = json.loads(json.dumps(base.to_dict()))  # tuples as lists, as on disk
    return record


def _check_resume(path: Path, record: dict) -> None:
    """Refuse to resume a run recorded in `path` under different settings, naming the first
    difference. A TrainConfig field added since the run was recorded counts as unchanged while
    it keeps its default (the original run trained with that behaviour)."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    defaults = json.loads(json.dumps(TrainConfig(data="").to_dict()))
    old_train = {**{k: v for k, v in defaults.items() if k not in old.get("train", {})},
                 **old.get("train", {})}
    old = {**old, "train": old_train}
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
    per_trial = trial_cpus(settings.workers_per_trial, base.cpus_per_worker)
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
    _write_json(out / "settings.json", record)

    connected = _connect(settings, base, settings.max_concurrent)
    try:
        check_gpus(base)
        max_concurrent = settings.max_concurrent or concurrent_trials(
            ray.cluster_resources().get("CPU", 1.0), settings.workers_per_trial,
            base.cpus_per_worker)
        storage = settings.storage()
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base.to_dict(),
                                 runs_storage=_join(storage, f"{settings.name}-runs"),
                                 in_memory_splits=_shared_splits(dataset, base)),
            _trial_resources(base))
        experiment = _join(storage, settings.name)
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
        return write_outputs(out, space, base, [_trial_record(r, base) for r in grid])
    finally:
        if connected:
            ray.shutdown()


def _shared_splits(dataset, base: TrainConfig) -> dict:
    """The small splits in the object store for Train trials' workers; in-process trials read
    the files as `--local` does and need none."""
    from din_ray.train.distributed import put_small_splits

    return {} if in_process(base.workers) else put_small_splits(dataset, base)


def _trial_resources(base: TrainConfig) -> dict:
    """What Tune reserves for the trial function: an in-process trial's worker, or a sliver
    for one that only waits on its Train run (whose workers reserve their own)."""
    if not in_process(base.workers):
        return {"CPU": TRIAL_CPUS}
    return {"CPU": base.cpus_per_worker, **({"GPU": 1} if base.use_gpu else {})}


def summarize_tune(settings: TuneSettings, base: TrainConfig) -> dict:
    """Write the outputs from the trials of a search so far, without running any (for a search
    that was interrupted, or is still running under another driver). No Ray cluster needed."""
    from ray.tune import ExperimentAnalysis

    space, base, out = _prepare(settings, base)
    _check_resume(out / "settings.json", _settings_record(settings, space, base))
    experiment = _join(settings.storage(), settings.name)
    analysis = ExperimentAnalysis(experiment)
    frames = analysis.trial_dataframes
    records = [_record(t.trial_id, t.config, frames.get(t.trial_id), _error_line(t), t.status,
                       base) for t in analysis.trials]
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
    base = replace(base, data=str(Path(base.data).resolve()), output=str(out),
                   workers=settings.workers_per_trial)
    out.mkdir(parents=True, exist_ok=True)
    return space, base, out


def _new_tuner(settings, space, base, trainable, storage, max_concurrent, sampler_cls,
               scheduler_cls, searcher_cls):
    from ray import tune

    startup = settings.startup_trials or max(2, settings.trials // 3)
    defaults = default_point(space, base) if settings.default_trial else None
    searcher = searcher_cls(
        sampler=sampler_cls(seed=settings.seed, n_startup_trials=startup),
        points_to_evaluate=[defaults] if defaults else None)
    scheduler = scheduler_cls(time_attr="epoch", max_t=base.epochs,
                              grace_period=min(settings.grace_period, base.epochs),
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
        value = getattr(base, name)
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
    Train then trains again; `_record` counts a twice-reported epoch once (the latest wins).
    """
    import ray.train
    from ray import tune

    entries = _listing(run_dir)
    epochs = sorted((name for name, is_dir in entries.items()
                     if is_dir and name.startswith("epoch-")), reverse=True)
    for name in epochs:
        try:
            with ray.train.Checkpoint(_join(run_dir, name)).as_directory() as local:
                history = json.loads(ckpt.Checkpoint.open(local).dense_state()["history"])
            break
        except ckpt.CheckpointError:
            continue  # cut short by the kill; Train resumes from the one before
    else:
        return  # a first start, or killed before its first checkpoint
    for row in history:
        kept = f"epoch-{int(row['epoch']):04d}"  # Train keeps the best and the latest epochs
        tune.report({**row, "checkpoint_path": _join(run_dir, kept) if kept in epochs else None})


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)


# --- results ------------------------------------------------------------------------------------
def _trial_record(result, base: TrainConfig) -> dict:
    """A finished trial's row from its Tune Result."""
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    error = None
    if result.error is not None:
        first = str(result.error).splitlines()[0] if str(result.error) else ""
        error = f"{type(result.error).__name__}: {first}"
    return _record(trial_id, result.config, result.metrics_dataframe, error, "TERMINATED", base)


def _record(trial_id: str, config: dict, df: pd.DataFrame | None, error: str | None,
            tune_status: str, base: TrainConfig) -> dict:
    """One trial's row: its config, status, and its per-epoch history (rank 0's reports)."""
    rows: list[dict] = []
    if df is not None and len(df) and "epoch" in df:
        # A restarted trial may repeat the epochs it reported before; the latest report wins.
        df = df.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
        rows = df.to_dict("records")
    record = {"trial_id": trial_id, "config": {k: _plain(v) for k, v in config.items()},
              "history": rows, "error": error}
    if error is not None or tune_status == "ERROR":
        record["status"] = "errored"
    elif tune_status in ("PENDING", "RUNNING", "PAUSED"):
        record["status"] = "unfinished"  # only when summarizing a search still under way
    elif not rows:
        record["status"] = "not-run"
    elif int(rows[-1]["epoch"]) >= base.epochs:
        record["status"] = "completed"
    elif base.patience and _since_best(rows) >= base.patience:
        record["status"] = "patience-stopped"  # the training loop's own early stop
    else:
        record["status"] = "early-stopped"  # ASHA stopped it at a rung
    return record


def _since_best(rows: list[dict]) -> int:
    gaucs = [r["valid_gauc"] if not math.isnan(r["valid_gauc"]) else -math.inf for r in rows]
    return len(rows) - 1 - int(np.argmax(gaucs))


def _best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    scored = [r for r in rows if r.get(metric) is not None and not math.isnan(r[metric])]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r[metric])


def write_outputs(out: Path, space: SearchSpace, base: TrainConfig, records: list[dict]) -> dict:
    """trials.csv, best.json, best_checkpoint/ and tune.png from the trial records."""
    table = []
    best_record, best_row = None, None
    sign = 1 if space.mode == "max" else -1
    for rec in records:
        row = _best_row(rec["history"], space.metric, space.mode)
        rec["best"] = row
        table.append({"trial_id": rec["trial_id"], **rec["config"], "status": rec["status"],
                      "epochs_run": len(rec["history"]),
                      f"best_{space.metric}": row[space.metric] if row else float("nan"),
                      "best_epoch": int(row["epoch"]) if row else 0,
                      "test_gauc_at_best": row.get("test_gauc") if row else float("nan"),
                      "error": rec["error"] or ""})
        # Ties (e.g. trials that all still rank as their popularity warm start) go to the
        # smallest trial id, so a restored search, whose trials come back in another order,
        # names the same winner.
        if row is not None and (best_row is None
                                or (sign * row[space.metric], best_record["trial_id"])
                                > (sign * best_row[space.metric], rec["trial_id"])):
            best_record, best_row = rec, row
    frame = pd.DataFrame(table)
    atomic.write_with(out / "trials.csv", lambda p: frame.to_csv(p, index=False))
    paths = {"trials": str(out / "trials.csv")}
    if best_record is None:
        raise NoResultError(f"no trial reported a {space.metric} yet; see {out / 'trials.csv'} "
                            "for each trial's status and error")
    checkpoint = _copy_checkpoint(best_row.get("checkpoint_path"), out / "best_checkpoint")
    metric_keys = [k for k in best_row if k.startswith(("valid_", "test_"))] + ["epoch"]
    best = {"trial_id": best_record["trial_id"], "config": best_record["config"],
            "metric": space.metric, "mode": space.mode,
            "metrics": {k: _plain(best_row[k]) for k in metric_keys},
            "status": best_record["status"],
            "checkpoint": str(checkpoint), "ray_checkpoint": best_row.get("checkpoint_path"),
            "train_config": {**base.to_dict(), **best_record["config"]},
            "statuses": {s: sum(r["status"] == s for r in records) for s in STATUSES}}
    _write_json(out / "best.json", best)
    paths["best"] = str(out / "best.json")
    paths["checkpoint"] = str(checkpoint)
    paths["plot"] = str(plot_trials(records, space, out / "tune.png", best["trial_id"]))
    return {**best, "trials": table, "paths": paths}


def _copy_checkpoint(source: str | None, dest: Path) -> Path:
    """Copy a Ray checkpoint (local path or URI) to `dest`, atomically; returns `dest`."""
    import ray.train

    if not source:
        raise RuntimeError("the best epoch reported no checkpoint_path")
    with atomic.staged_dir(dest) as tmp:
        ray.train.Checkpoint(source).to_directory(str(tmp))
        if not (tmp / ckpt.MANIFEST).exists():
            raise RuntimeError(f"{source}: incomplete checkpoint (no {ckpt.MANIFEST})")
    return dest


def plot_trials(records: list[dict], space: SearchSpace, path: Path, best_id: str) -> Path:
    """Validation metric per epoch for every trial; ASHA-stopped trials dashed, ending in x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"completed": ("-", "o"), "early-stopped": ("--", "x"),
              "patience-stopped": (":", "s"), "errored": (":", "v"), "unfinished": ("-.", ".")}
    seen = set()
    for rec in records:
        h = rec["history"]
        if not h:
            continue
        line, marker = styles.get(rec["status"], ("-", "o"))
        is_best = rec["trial_id"] == best_id
        label = None if rec["status"] in seen else rec["status"]
        seen.add(rec["status"])
        color = "black" if is_best else None
        ax.plot([r["epoch"] for r in h], [r[space.metric] for r in h], linestyle=line,
                marker=marker, linewidth=2.5 if is_best else 1.0, alpha=1.0 if is_best else 0.7,
                color=color, label=label if not is_best else None)
    best = next(r for r in records if r["trial_id"] == best_id)
    ax.plot([], [], color="black", linewidth=2.5,
            label="best: " + ", ".join(f"{k}={_fmt(v)}" for k, v in best["config"].items()))
    if best.get("best"):  # the epoch whose checkpoint is handed over
        ax.plot([best["best"]["epoch"]], [best["best"][space.metric]], marker="*",
                markersize=16, color="gold", markeredgecolor="black", linestyle="none",
                label="best checkpoint")
    ax.set_xlabel("epoch")
    ax.set_ylabel(space.metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    stopped = sum(r["status"] == "early-stopped" for r in records)
    ax.set_title(f"{len(records)} trials, {stopped} stopped early by ASHA "
                 f"({', '.join(space.params)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"),
                      suffix=path.suffix)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _write_json(path: Path, obj) -> None:
    atomic.write_json(path, obj, default=_plain)
