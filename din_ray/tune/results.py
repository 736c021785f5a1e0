"""A search's outputs, from its trials' records (rank 0's per-epoch reports):

    OUTPUT/trials.csv        one row per trial: its sampled values, status, best epoch, error
    OUTPUT/best.json         the winner: config, metrics at its best epoch, checkpoint, the full
                             training config, the count of trials per status
    OUTPUT/best_checkpoint/  a copy of the winner's best epoch (what `din-ray serve OUTPUT` loads)
    OUTPUT/tune.png          the validation metric per epoch of every trial

Each trial's best epoch is chosen by the one rule (`din_ray.train.selection`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from din_ray import checkpoint as ckpt
from din_ray import io as atomic
from din_ray.config import TrainConfig
from din_ray.train.selection import best_scored, epochs_since_best
from din_ray.tune.space import SearchSpace

STATUSES = ("completed", "early-stopped", "patience-stopped", "errored", "unfinished",
            "not-run")


class NoResultError(RuntimeError):
    """No trial has reported a metric (all errored, or none got through an epoch yet)."""


def plain(value):
    """numpy scalars from the sampler as Python values (TrainConfig and JSON want those)."""
    return value.item() if isinstance(value, np.generic) else value


def trial_record(result, base: TrainConfig) -> dict:
    """A finished trial's row from its Tune Result."""
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    error = None
    if result.error is not None:
        first = str(result.error).splitlines()[0] if str(result.error) else ""
        error = f"{type(result.error).__name__}: {first}"
    return history_record(trial_id, result.config, result.metrics_dataframe, error,
                          "TERMINATED", base)


def history_record(trial_id: str, config: dict, df: pd.DataFrame | None, error: str | None,
            tune_status: str, base: TrainConfig) -> dict:
    """One trial's row: its config, status, and its per-epoch history (rank 0's reports)."""
    rows: list[dict] = []
    if df is not None and len(df) and "epoch" in df:
        # A restarted trial may repeat the epochs it reported before; the latest report wins.
        df = df.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
        rows = df.to_dict("records")
    record = {"trial_id": trial_id, "config": {k: plain(v) for k, v in config.items()},
              "history": rows, "error": error}
    if error is not None or tune_status == "ERROR":
        record["status"] = "errored"
    elif tune_status in ("PENDING", "RUNNING", "PAUSED"):
        record["status"] = "unfinished"  # only when summarizing a search still under way
    elif not rows:
        record["status"] = "not-run"
    elif int(rows[-1]["epoch"]) >= base.optim.epochs:
        record["status"] = "completed"
    elif base.optim.patience and epochs_since_best(rows) >= base.optim.patience:
        record["status"] = "patience-stopped"  # the training loop's own early stop
    else:
        record["status"] = "early-stopped"  # ASHA stopped it at a rung
    return record


def write_outputs(out: Path, space: SearchSpace, base: TrainConfig, records: list[dict]) -> dict:
    """trials.csv, best.json, best_checkpoint/ and tune.png from the trial records."""
    table = []
    best_record, best_row = None, None
    sign = 1 if space.mode == "max" else -1
    for rec in records:
        row = best_scored(rec["history"], space.metric, space.mode)
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
            "metrics": {k: plain(best_row[k]) for k in metric_keys},
            "status": best_record["status"],
            "checkpoint": str(checkpoint), "ray_checkpoint": best_row.get("checkpoint_path"),
            "train_config": base.replace(**best_record["config"]).to_dict(),
            "statuses": {s: sum(r["status"] == s for r in records) for s in STATUSES}}
    write_json(out / "best.json", best)
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


def write_json(path: Path, obj) -> None:
    atomic.write_json(path, obj, default=plain)
