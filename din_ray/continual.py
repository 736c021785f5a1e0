"""Day after day: prepare the new day against the earlier vocabularies, train from the champion,
evaluate both on the new day's test split, promote the new model only when it is better.

    din-ray continual --spec raw/day-02/log_spec.yaml --output runs/continual --day day-02
    python jobs/continual.py --spec raw/day-02/log_spec.yaml --output runs/continual

Layout under OUTPUT (everything written atomically; a failed day changes nothing but its own
data/ and runs/ directories):

    data/<day>/            the day's prepared dataset (--vocab-from the previous day's)
    runs/<day>/            its training run (metrics.json, checkpoint/)
    champions/<day>/       an immutable copy of each promoted checkpoint (what Serve loads)
    state.json             {"champion": {...Evaluation}, "last_dataset": "data/<day>"}
    ledger.jsonl           one JSON line per day: decision, both evaluations, margin, seconds

The gate: the candidate is promoted when candidate GAUC >= champion GAUC + margin on the same
split (the new day's test split, both models scored now). The champion's ids are those of its
own (smaller) vocabulary; ids it never saw are OOV to it, exactly as its served vocabulary
would treat them. The first day has no champion and is promoted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from din_ray import io as atomic
from din_ray.checkpoint import Checkpoint, load_model
from din_ray.data.format import PreparedDataset, iter_numpy_batches
from din_ray.data.vocab_extend import schema_differences
from din_ray.schema import OOV_ID

log = logging.getLogger(__name__)

LEDGER = "ledger.jsonl"
STATE = "state.json"


class PromotionError(ValueError):
    """A promotion whose two evaluations are not comparable (another split, another data)."""


@dataclass(frozen=True)
class Evaluation:
    """One checkpoint scored on one split of one prepared dataset.

    `split_id` fingerprints the split (its files' names and sizes), so two evaluations are only
    compared when they scored the very same rows.
    """

    checkpoint: str
    dataset: str
    split: str
    split_id: str
    gauc: float
    auc: float
    logloss: float
    rows: int

    @classmethod
    def from_dict(cls, raw: dict) -> Evaluation:
        return cls(**raw)


def split_fingerprint(dataset: PreparedDataset, split: str) -> str:
    """sha256 over the split's file names and sizes (cheap; a rewrite changes the sizes)."""
    h = hashlib.sha256()
    for path in dataset.files(split):
        h.update(f"{path.name}:{path.stat().st_size};".encode())
    return h.hexdigest()[:16]


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "test",
             batch_size: int = 8192) -> Evaluation:
    """Score `checkpoint` on `split` of `data`, a dataset whose vocabularies may extend the
    checkpoint's: ids beyond the checkpoint's tables are OOV to it."""
    from din_ray.train.env import WorkerEnv  # the loop's own evaluation
    from din_ray.train.evaluate import evaluate_split

    model, tables, c = load_model(checkpoint)
    dataset = PreparedDataset.open(data)
    diffs = schema_differences(c.schema, dataset.schema)
    if diffs:
        raise PromotionError(f"{checkpoint} cannot be scored on {data}: " + "; ".join(diffs))
    rows = {f.name: f.vocab_size for f in c.schema.features}

    def batches():
        for batch in iter_numpy_batches(dataset.files(split), dataset.schema, batch_size):
            for name, n in rows.items():
                ids = batch[name]
                batch[name] = np.where(ids >= n, OOV_ID, ids)
            yield batch

    m = evaluate_split(model, tables, batches(), c.schema, WorkerEnv())
    return Evaluation(str(Path(checkpoint)), str(Path(data)), split,
                      split_fingerprint(dataset, split), float(m["gauc"]), float(m["auc"]),
                      float(m["logloss"]), int(m["rows"]))


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate: Evaluation
    champion: Evaluation | None
    margin: float


def decide(candidate: Evaluation, champion: Evaluation | None, margin: float) -> Decision:
    """The gate. Raises PromotionError when the two evaluations scored different rows."""
    if champion is None:
        return Decision(True, "no champion yet", candidate, None, margin)
    if (champion.split_id, champion.split) != (candidate.split_id, candidate.split):
        raise PromotionError(
            f"champion {champion.checkpoint} was evaluated on split {champion.split!r} of "
            f"{champion.dataset} ({champion.split_id}), the candidate on {candidate.split!r} of "
            f"{candidate.dataset} ({candidate.split_id}): not the same split")
    if not np.isfinite(candidate.gauc):
        return Decision(False, f"candidate GAUC is {candidate.gauc}", candidate, champion,
                        margin)
    need = champion.gauc + margin
    if candidate.gauc >= need:
        return Decision(True, f"GAUC {candidate.gauc:.4f} >= {champion.gauc:.4f} + {margin}",
                        candidate, champion, margin)
    return Decision(False, f"GAUC {candidate.gauc:.4f} < {champion.gauc:.4f} + {margin}",
                    candidate, champion, margin)


# --- the output directory -----------------------------------------------------------------------
def append_ledger(output: Path, record: dict) -> None:
    """Add one line to OUTPUT/ledger.jsonl: the file is rewritten to a temporary and renamed,
    so a reader never sees half a line."""
    path = output / LEDGER
    old = path.read_text() if path.exists() else ""
    atomic.write_text(path, old + json.dumps(record, default=str) + "\n")


def read_ledger(output: str | Path) -> list[dict]:
    path = Path(output) / LEDGER
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_state(output: str | Path) -> dict:
    path = Path(output) / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def champion(output: str | Path) -> Evaluation | None:
    raw = read_state(output).get("champion")
    return Evaluation.from_dict(raw) if raw else None


def promote(output: Path, day: str, decision: Decision, state: dict) -> Path:
    """Copy the candidate to champions/<day> (temporary, verified, renamed), then point state.json
    at it. Until that last rename the old champion stays the champion."""
    final = output / "champions" / day
    with atomic.staged_dir(final) as tmp:
        shutil.copytree(decision.candidate.checkpoint, tmp, dirs_exist_ok=True)
        Checkpoint.open(tmp)  # complete and readable before it can become the champion
    evaluation = asdict(decision.candidate) | {"checkpoint": str(final)}
    atomic.write_json(output / STATE, {**state, "champion": evaluation})
    return final


@dataclass(frozen=True)
class DayConfig:
    """One day of continual training.

    Args:
        output: the continual output directory (layout in the module docstring).
        day: a name for the day (directory names, ledger).
        spec: the day's log spec (a `din-ray prepare log` YAML).
        margin: GAUC the candidate must gain over the champion to be promoted (>= 0 usually;
            a small positive margin avoids churning the served model on noise).
        train: TrainConfig fields for the day's run (data, output and init_from are set here).
        from_scratch: train without --init-from (the baseline the results compare against).
        executor: "local" or "ray" for the preparation (`prepare_logs`).
    """

    output: str
    day: str
    spec: str
    margin: float = 0.0
    train: dict = field(default_factory=dict)
    from_scratch: bool = False
    executor: str = "local"

    def __post_init__(self) -> None:
        if not self.day or "/" in self.day or self.day.startswith("."):
            raise ValueError(f"day must be a plain directory name, got {self.day!r}")
        if not np.isfinite(self.margin):
            raise ValueError(f"margin must be finite, got {self.margin}")
        reserved = sorted({"data", "output", "init_from"} & set(self.train))
        if reserved:
            raise ValueError(f"train must not set {reserved}: the continual job sets them")


def run_day(cfg: DayConfig) -> dict:
    """Prepare, train from the champion, evaluate both, gate, promote; returns the ledger
    record (also appended to OUTPUT/ledger.jsonl)."""
    from din_ray.config import TrainConfig
    from din_ray.data.logs.pipeline import prepare_logs
    from din_ray.train.local import run_local

    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    state = read_state(output)
    current = champion(output)
    seconds: dict[str, float] = {}
    data = output / "data" / cfg.day
    previous = state.get("last_dataset")
    t0 = time.perf_counter()
    prepare_logs(cfg.spec, data, overwrite=True, executor=cfg.executor,
                 vocab_from=output / previous if previous else None)
    seconds["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    init_from = "" if cfg.from_scratch or current is None else current.checkpoint
    run = output / "runs" / cfg.day
    shutil.rmtree(run, ignore_errors=True)  # a rerun of the day starts it over
    train_cfg = TrainConfig.create(**{**cfg.train, "data": str(data), "output": str(run),
                               "init_from": init_from})
    if train_cfg.execution.workers > 1:
        from din_ray.train.distributed import run_ray

        run_ray(train_cfg)
    else:
        run_local(train_cfg)
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    candidate = evaluate(run / "checkpoint", data)
    incumbent = evaluate(current.checkpoint, data) if current is not None else None
    seconds["evaluate"] = time.perf_counter() - t0
    decision = decide(candidate, incumbent, cfg.margin)
    record = {"day": cfg.day, "promoted": decision.promote, "reason": decision.reason,
              "margin": cfg.margin, "init_from": init_from or None,
              "candidate": asdict(candidate),
              "champion": asdict(incumbent) if incumbent else None, "seconds": seconds,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # The day counts as done (the next day extends its vocabularies) only from here on.
    state = {**state, "last_dataset": f"data/{cfg.day}"}
    if decision.promote:
        record["champion_checkpoint"] = str(promote(output, cfg.day, decision, state))
    else:
        atomic.write_text(output / STATE, json.dumps(state, indent=2) + "\n")
        record["champion_checkpoint"] = current.checkpoint if current else None
    append_ledger(output, record)
    log.info("%s: %s (%s)", cfg.day, "promoted" if decision.promote else "kept the champion",
             decision.reason)
    return record
