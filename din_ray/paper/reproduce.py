"""Rerun the paper's comparison (§6) on any prepared dataset: Tables 3 and 4, Figs. 4, 5 and 6.

    din-ray reproduce --data out/ml-small --output runs/reproduce --seeds 3 --epochs 4

Every run goes through `din_ray.train.loop.run_local`, the path of `din-ray train`, into
OUTPUT/runs/<model>-<reg>-seed<k>/ (a finished run is reused when the command is repeated, an
interrupted one resumes from its checkpoint). The grid follows the paper's two tables:

  * Table 3, models: LR, BaseModel, Wide&Deep, PNN, DeepFM and DIN with PReLU, and DIN with Dice
    (the paper: "other lines except LR use PReLU"), all trained with `model_reg` (default none);
  * Table 4, regularizers: BaseModel (PReLU) with each of none, dropout, filter, DiFacto, L2 over
    whole tables and MBA.

`cross=True` trains the full models × regularizers product instead (Table 3 is then reported for
each regularizer). Outputs in OUTPUT/: table.md, table.csv (aggregates), runs.csv (one line per
run), curves.png, attention.png, embeddings.png.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from din_ray import checkpoint as ckpt
from din_ray import io as atomic
from din_ray.data.format import PreparedDataset, iter_numpy_batches
from din_ray.embeddings.regularization import REGULARIZERS
from din_ray.metrics import rela_impr
from din_ray.paper import figures as plots
from din_ray.schema import NUM_RESERVED_IDS, PAD_ID
from din_ray.train.loop import TrainConfig, run_local, summarize, to_torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """A row of Table 3: a model and its activation."""

    name: str
    label: str
    model: str
    activation: str


ENTRIES = {e.name: e for e in (
    Entry("lr", "LR", "lr", "prelu"),
    Entry("base", "BaseModel", "base", "prelu"),
    Entry("wide_deep", "Wide&Deep", "wide_deep", "prelu"),
    Entry("pnn", "PNN", "pnn", "prelu"),
    Entry("deepfm", "DeepFM", "deepfm", "prelu"),
    Entry("din", "DIN", "din", "prelu"),
    Entry("din_dice", "DIN with Dice", "din", "dice"),
)}
# Table 4's order (the paper's, with L2 over whole tables added before MBA).
REG_ORDER = ("none", "dropout", "filter", "difacto", "l2", "mba")
REG_LABELS = {"none": "without reg.", "dropout": "dropout (50 % of ids)",
              "filter": "frequency filter", "difacto": "DiFacto (λ·n_j)",
              "l2": "L2 over whole tables", "mba": "MBA (λ/n_j)"}
# The model of Table 4 (the paper: BaseModel).
REG_ENTRY = "base"
QUICK = dict(embedding_dim=4, attention_hidden=(8, 4), mlp_hidden=(16, 8), batch_size=64,
             eval_batch_size=2048)


@dataclass(frozen=True)
class ReproduceConfig:
    """What `din-ray reproduce` trains.

    Args:
        data: prepared dataset directory.
        output: where runs, tables and figures go.
        seeds: runs per cell (seeds 0 .. seeds-1); the tables show mean ± std.
        models: Table 3 entries (keys of `ENTRIES`).
        regs: Table 4 regularizers (on BaseModel).
        model_reg: regularizer of the Table 3 runs.
        cross: train every model with every regularizer instead of the two tables.
        epochs, patience: per run (patience 0 = always all epochs, so Fig. 4 shows whole curves).
        filter_top_k: ids kept by the filter; None = a quarter of the largest table's ids.
        jobs: runs trained at once (separate processes, one torch thread each).
        quick: tiny model widths and batches (tests, smoke runs).
        report_only: train nothing; report finished runs, and unfinished ones from their latest
            epoch checkpoint (marked partial in the tables); runs not started are left out.
        train: further `TrainConfig` fields for every run (lr, batch_size, lam, ...).
    """

    data: str
    output: str
    seeds: int = 3
    models: tuple[str, ...] = tuple(ENTRIES)
    regs: tuple[str, ...] = REG_ORDER
    model_reg: str = "none"
    cross: bool = False
    epochs: int = 4
    patience: int = 0
    filter_top_k: int | None = None
    jobs: int = 1
    quick: bool = False
    report_only: bool = False
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "regs", tuple(self.regs))
        bad = [m for m in self.models if m not in ENTRIES]
        if bad:
            raise ValueError(f"models: unknown {bad}; choose from {tuple(ENTRIES)}")
        bad = [r for r in (*self.regs, self.model_reg) if r not in REGULARIZERS]
        if bad:
            raise ValueError(f"regs: unknown {bad}; choose from {REGULARIZERS}")
        for name, ok in (("seeds", self.seeds >= 1), ("epochs", self.epochs >= 1),
                         ("jobs", self.jobs >= 1), ("patience", self.patience >= 0)):
            if not ok:
                raise ValueError(f"{name} is out of range: {getattr(self, name)!r}")
        if not self.models and not self.regs:
            raise ValueError("nothing to train: models and regs are both empty")

    def cells(self) -> list[tuple[str, str]]:
        """(entry, reg) pairs to train, each for every seed, without duplicates."""
        if self.cross:
            pairs = [(m, r) for m in self.models for r in self.regs]
        else:
            pairs = [(m, self.model_reg) for m in self.models]
            pairs += [(REG_ENTRY, r) for r in self.regs]
        return list(dict.fromkeys(pairs))


def run_name(entry: str, reg: str, seed: int) -> str:
    return f"{entry}-{reg}-seed{seed}"


def train_config(cfg: ReproduceConfig, dataset: PreparedDataset, entry: str, reg: str,
                 seed: int) -> TrainConfig:
    e = ENTRIES[entry]
    values = dict(QUICK) if cfg.quick else {}
    values.update(cfg.train)
    values.update(data=str(cfg.data), output=str(Path(cfg.output) / "runs" /
                                                 run_name(entry, reg, seed)),
                  model=e.model, activation=e.activation, reg=reg, seed=seed, epochs=cfg.epochs,
                  patience=cfg.patience, threads=1)
    if reg == "filter":
        values["filter_top_k"] = cfg.filter_top_k or default_filter_top_k(dataset)
    return TrainConfig(**values)


def default_filter_top_k(dataset: PreparedDataset) -> int:
    """A quarter of the real ids of the largest table (the paper kept 20 M of 0.6 B goods ids;
    the public datasets are small enough that such a cut would leave almost nothing)."""
    largest = max(rows for rows, _ in dataset.schema.tables.values())
    return max(1, (largest - NUM_RESERVED_IDS) // 4)


def _train_one(cfg_dict: dict) -> dict:
    """Process-pool entry point: one run through the `din-ray train` path."""
    cfg = TrainConfig.from_dict(cfg_dict)
    torch.set_num_threads(1)
    return run_local(cfg)


def _load_result(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _same_config(done: dict, want: dict) -> bool:
    """A finished run is reused when its recorded config agrees on every field both know
    (fields added to TrainConfig since it ran are not held against it)."""
    def norm(v):  # JSON turned tuples into lists
        return list(v) if isinstance(v, tuple) else v

    return all(norm(done[k]) == norm(want[k]) for k in done.keys() & want.keys()
               if k not in ("output", "data"))


def train_all(cfg: ReproduceConfig) -> list[dict]:
    """Train every cell × seed (reusing finished runs); one record per run."""
    dataset = PreparedDataset.open(cfg.data)
    jobs = []
    for entry, reg in cfg.cells():
        for seed in range(cfg.seeds):
            jobs.append((entry, reg, seed, train_config(cfg, dataset, entry, reg, seed)))
    records: dict[int, dict] = {}
    todo = []
    for i, (*_, tc) in enumerate(jobs):
        done = _load_result(Path(tc.output))
        if done is not None and _same_config(done.get("config", {}), tc.to_dict()):
            records[i] = done
        else:
            todo.append(i)
    log.info("reproduce: %d runs (%d already done)", len(jobs), len(jobs) - len(todo))
    if cfg.report_only:
        for i in todo:
            partial = _partial_result(Path(jobs[i][3].output))
            if partial is not None:
                records[i] = partial
        todo = []
    t0 = time.perf_counter()
    if cfg.jobs == 1 or len(todo) <= 1:
        for n, i in enumerate(todo):
            records[i] = _train_one(jobs[i][3].to_dict())
            _progress(n + 1, len(todo), jobs[i], t0)
    else:
        with ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_train_one, jobs[i][3].to_dict()): i for i in todo}
            for n, fut in enumerate(as_completed(futures)):
                records[futures[fut]] = fut.result()
                _progress(n + 1, len(todo), jobs[futures[fut]], t0)
    out = []
    for i, (entry, reg, seed, _) in enumerate(jobs):
        r = records.get(i)
        if r is None:  # report_only: never started
            continue
        out.append({"entry": entry, "reg": reg, "seed": seed, "gauc": r["gauc"], "auc": r["auc"],
                    "logloss": r["logloss"], "best_epoch": r["best_epoch"],
                    "epochs_run": r["epochs_run"], "history": r["history"],
                    "partial": bool(r.get("partial")),
                    "train_seconds": sum(h["train_seconds"] for h in r["history"])})
    if not out:
        raise ValueError(f"{cfg.output}: no finished or checkpointed runs to report")
    return out


def _partial_result(run_dir: Path) -> dict | None:
    """An unfinished run summarised from its latest complete epoch checkpoint, or None."""
    done = sorted(p for p in (run_dir / "checkpoints").glob("epoch-*")
                  if (p / ckpt.MANIFEST).exists())
    if not done:
        return None
    history = json.loads(ckpt.Checkpoint.open(done[-1]).dense_state()["history"])
    return {**summarize(history), "partial": True}


def _progress(n: int, total: int, job, t0: float) -> None:
    entry, reg, seed, _ = job
    elapsed = time.perf_counter() - t0
    log.info("reproduce: finished %s (%d/%d, %.0f s elapsed, ~%.0f s left)",
             run_name(entry, reg, seed), n, total, elapsed, elapsed / n * (total - n))


# --- tables -------------------------------------------------------------------------------------
def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(records: list[dict], entry: str, reg: str) -> dict | None:
    rows = [r for r in records if r["entry"] == entry and r["reg"] == reg]
    if not rows:
        return None
    out = {"entry": entry, "reg": reg, "seeds": len(rows),
           "partial": any(r.get("partial") for r in rows)}
    for key in ("gauc", "auc", "logloss", "best_epoch", "epochs_run"):
        out[f"{key}_mean"], out[f"{key}_std"] = _stats([r[key] for r in rows])
    return out


def build_tables(cfg: ReproduceConfig, records: list[dict]) -> list[dict]:
    """Table 3 (models) and Table 4 (regularizers) rows with RelaImpr (Eq. 11) against
    BaseModel (Table 3) and against BaseModel without regularization, or the first listed
    regularizer (Table 4)."""
    rows = []
    model_regs = cfg.regs if cfg.cross else (cfg.model_reg,)
    for reg in model_regs:
        base = aggregate(records, "base", reg)
        for entry in cfg.models:
            a = aggregate(records, entry, reg)
            if a is None:
                continue
            a["table"] = "3"
            a["row"] = ENTRIES[entry].label
            a["rela_impr"] = rela_impr(a["gauc_mean"], base["gauc_mean"]) if base else math.nan
            rows.append(a)
    regs = [r for r in REG_ORDER if r in cfg.regs] + [r for r in cfg.regs if r not in REG_ORDER]
    if regs:
        ref = aggregate(records, REG_ENTRY, "none" if "none" in regs else regs[0])
        for reg in regs:
            a = aggregate(records, REG_ENTRY, reg)
            if a is None:
                continue
            a["table"] = "4"
            a["row"] = REG_LABELS.get(reg, reg)
            a["rela_impr"] = rela_impr(a["gauc_mean"], ref["gauc_mean"])
            rows.append(a)
    return rows


CSV_FIELDS = ("table", "row", "entry", "reg", "seeds", "gauc_mean", "gauc_std", "auc_mean",
              "auc_std", "logloss_mean", "logloss_std", "rela_impr", "best_epoch_mean",
              "epochs_run_mean", "partial")


def write_csv(rows: list[dict], path: Path, fields) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic.write_text(path, buf.getvalue())


def markdown(cfg: ReproduceConfig, rows: list[dict], dataset: PreparedDataset,
             seconds: float) -> str:
    lines = [f"# din-ray reproduce: {dataset.schema.name or dataset.root.name}", ""]
    rows_info = ", ".join(f"{s} {dataset.num_rows(s):,}" for s in ("train", "valid", "test"))
    lines += [f"Data: `{cfg.data}` ({rows_info} samples). Seeds: {cfg.seeds}. "
              f"Epochs: {cfg.epochs} (patience {cfg.patience or 'off'}); each run reports the "
              "test metrics of its epoch with the best validation GAUC. "
              f"Training time, summed over runs: {seconds / 60:.1f} min.", "",
              "GAUC is the paper's impression-weighted user AUC (Eq. 10); AUC is the global "
              "AUC; RelaImpr is Eq. 11 on mean GAUC.", ""]
    for table, title, ref in (
            ("3", "Table 3: models", "BaseModel"),
            ("4", "Table 4: regularizers on BaseModel (PReLU)", "the first line")):
        sub = [r for r in rows if r["table"] == table]
        if not sub:
            continue
        lines += [f"## {title}", "",
                  f"RelaImpr against {ref}." + (
                      f" Regularizer: {cfg.model_reg}." if table == "3" and not cfg.cross
                      else ""), "",
                  "| " + ("Model" if table == "3" else "Regularization")
                  + (" | reg" if table == "3" and cfg.cross else "")
                  + " | GAUC (mean ± std) | RelaImpr | AUC | LogLoss | best epoch | seeds |",
                  "|---" + ("|---" if table == "3" and cfg.cross else "")
                  + "|---:|---:|---:|---:|---:|---:|"]
        best = max(r["gauc_mean"] for r in sub)
        for r in sub:
            g = f"{r['gauc_mean']:.4f} ± {r['gauc_std']:.4f}"
            if r["gauc_mean"] == best:
                g = f"**{g}**"
            lines.append(
                f"| {r['row']}" + (f" | {r['reg']}" if table == "3" and cfg.cross else "")
                + f" | {g} | {r['rela_impr']:+.2f}% | {r['auc_mean']:.4f} ± {r['auc_std']:.4f}"
                f" | {r['logloss_mean']:.4f} | {r['best_epoch_mean']:.1f}"
                f" | {r['seeds']}{' †' if r['partial'] else ''} |")
        lines.append("")
    if any(r["partial"] for r in rows):
        lines += [f"† Some runs of this row stopped before epoch {cfg.epochs}; they are reported "
                  "from their latest epoch checkpoint (see runs.csv, `epochs_run`).", ""]
    return "\n".join(lines)


# --- figures ------------------------------------------------------------------------------------
def curves_figure(cfg: ReproduceConfig, records: list[dict], path: Path) -> Path | None:
    entry = REG_ENTRY if any(r["entry"] == REG_ENTRY for r in records) else records[0]["entry"]
    curves = {}
    for reg in [r for r in REG_ORDER if r in cfg.regs] or [cfg.model_reg]:
        runs = [r["history"] for r in records if r["entry"] == entry and r["reg"] == reg]
        if runs:
            curves[REG_LABELS.get(reg, reg)] = runs
    if not curves:
        return None
    return plots.plot_curves(curves, path, title=f"{ENTRIES[entry].label} with each "
                             "regularizer (thin: seeds, thick: mean), as the paper's Fig. 4")


def _picture_run(cfg: ReproduceConfig) -> Path | None:
    """The DIN checkpoint the pictures use: DIN with Dice (else DIN), model_reg, seed 0."""
    for entry in ("din_dice", "din"):
        for reg in (cfg.model_reg, *cfg.regs):
            path = Path(cfg.output) / "runs" / run_name(entry, reg, 0) / "checkpoint"
            if (path / ckpt.MANIFEST).exists() and entry in cfg.models:
                return path
    return None


def _names(dataset: PreparedDataset, table: str) -> dict[int, str]:
    return {i: raw for raw, i in dataset.vocab(table).items()}


def attention_figure(dataset: PreparedDataset, checkpoint: Path, path: Path,
                     users: int = 3, max_rows: int = 50_000) -> Path | None:
    """Fig. 5 from test users whose history spans several categories: for each, two of their
    test candidates of different categories that both occur in the history.

    Users qualify with at least min(8, L/2) behaviours over at least 3 categories (2 when the
    category table is tiny)."""
    model, tables, _ = ckpt.load_model(checkpoint)
    schema = dataset.schema
    item_f, cate_f = schema.ad_features[0], schema.ad_features[1]
    hist_item = next(f for f in schema.behavior_features if f.aligned_with == item_f.name)
    hist_cate = next(f for f in schema.behavior_features if f.aligned_with == cate_f.name)
    cate_names = _names(dataset, cate_f.table)
    item_names = _names(dataset, item_f.table)
    min_len = min(8, max(2, schema.max_history // 2))
    min_cates = 3 if cate_f.vocab_size > 8 else 2
    cases: list[plots.AttentionCase] = []
    seen_users = set()
    read = 0
    for batch in iter_numpy_batches(dataset.files("test"), schema, 4096):
        read += len(batch[schema.label])
        by_user: dict[int, list[int]] = {}
        for i, u in enumerate(batch[schema.user_column]):
            by_user.setdefault(int(u), []).append(i)
        for u, idx in by_user.items():
            if u in seen_users or len(cases) >= users:
                continue
            # Latest row of the user in this batch: the longest history.
            last = max(idx, key=lambda i: int((batch[hist_item.name][i] != PAD_ID).sum()))
            cates = batch[hist_cate.name][last]
            real = batch[hist_item.name][last] != PAD_ID
            if real.sum() < min_len or len(set(cates[real].tolist())) < min_cates:
                continue
            present = set(cates[real].tolist())
            picks: dict[int, int] = {}
            for i in idx:
                c = int(batch[cate_f.name][i])
                if c in present and c not in picks and c >= NUM_RESERVED_IDS:
                    picks[c] = i
            if len(picks) < 2:
                continue
            seen_users.add(u)
            chosen = list(picks.values())[:2]
            rows = {k: np.repeat(v[last:last + 1], 2, axis=0) for k, v in batch.items()}
            for f in schema.ad_features:
                rows[f.name] = batch[f.name][chosen]
            t = to_torch(rows)
            with torch.no_grad():
                emb = tables.lookup(model.sparse_inputs(t))
                _, weights = model.user_interest(emb, t)  # (2, L)
            n = int(real.sum())
            cases.append(plots.AttentionCase(
                user=str(u),
                behaviours=[cate_names.get(int(c), str(int(c))) for c in cates[:n]],
                candidates=[(item_names.get(int(c), str(int(c))),
                             cate_names.get(int(g), str(int(g))))
                            for c, g in zip(rows[item_f.name], rows[cate_f.name])],
                weights=weights.numpy()[:, :n]))
        if len(cases) >= users or read >= max_rows:
            break
    if not cases:
        log.warning("attention figure: no test user with >= %d behaviours over >= %d "
                    "categories and two candidates of categories in the history; skipped",
                    min_len, min_cates)
        return None
    title = f"DIN activation weights ({checkpoint.parent.name}), as the paper's Fig. 5"
    return plots.plot_attention(cases, path, title=title)


def embeddings_figure(dataset: PreparedDataset, checkpoint: Path, path: Path,
                      categories: int = 8, per_category: int = 100,
                      method: str = "tsne") -> Path | None:
    """Fig. 6: the item embeddings of the `per_category` most frequent items of each of the
    `categories` categories with the most items, projected to 2-D."""
    _, tables, _ = ckpt.load_model(checkpoint)
    schema = dataset.schema
    item_f, cate_f = schema.ad_features[0], schema.ad_features[1]
    pairs = pq.read_table(dataset.files("train"), columns=[item_f.name, cate_f.name])
    items = pairs.column(item_f.name).to_numpy()
    cates = pairs.column(cate_f.name).to_numpy()
    item_cate = np.full(item_f.vocab_size, -1, np.int64)
    item_cate[items] = cates  # an item's category is fixed in the public datasets
    counts = dataset.counts()[item_f.table]
    valid = np.flatnonzero((item_cate >= NUM_RESERVED_IDS) & (counts > 0))
    by_cate = np.bincount(item_cate[valid], minlength=cate_f.vocab_size)
    top = np.argsort(-by_cate, kind="stable")[:categories]
    top = top[by_cate[top] > 0]
    chosen = []
    for c in top:
        ids = valid[item_cate[valid] == c]
        chosen.append(ids[np.argsort(-counts[ids], kind="stable")[:per_category]])
    ids = np.concatenate(chosen)
    if len(ids) < 5:
        log.warning("embeddings figure: too few categorised items (%d); skipped", len(ids))
        return None
    vectors = tables.weight(item_f.table)[torch.from_numpy(ids)].numpy()
    try:
        xy = plots.project_2d(vectors, method)
    except ImportError:
        method = "pca"
        xy = plots.project_2d(vectors, method)
    names = _names(dataset, cate_f.table)
    labels = [names.get(int(c), str(int(c))) for c in item_cate[ids]]
    title = (f"{'t-SNE' if method == 'tsne' else 'PCA'} of DIN item embeddings "
             f"({checkpoint.parent.name}): the {per_category} most frequent items of the "
             f"{len(top)} largest categories, coloured by category (paper Fig. 6)")
    return plots.plot_embeddings(xy, labels, path, title=title)


# --- the command ----------------------------------------------------------------------------------
def reproduce(cfg: ReproduceConfig) -> dict:
    """Train the grid and write the tables and figures; returns the written paths."""
    dataset = PreparedDataset.open(cfg.data)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = train_all(cfg)
    seconds = sum(r["train_seconds"] for r in records) or (time.perf_counter() - t0)
    rows = build_tables(cfg, records)
    written = {}
    atomic.write_text(out / "table.md", markdown(cfg, rows, dataset, seconds))
    write_csv(rows, out / "table.csv", CSV_FIELDS)
    write_csv(records, out / "runs.csv", ("entry", "reg", "seed", "gauc", "auc", "logloss",
                                          "best_epoch", "epochs_run", "partial",
                                          "train_seconds"))
    written.update(table_md=out / "table.md", table_csv=out / "table.csv",
                   runs_csv=out / "runs.csv")
    curves = curves_figure(cfg, records, out / "curves.png")
    if curves:
        written["curves"] = curves
    picture_ckpt = _picture_run(cfg)
    if picture_ckpt is None:
        log.warning("no DIN run among the models: attention.png and embeddings.png skipped")
    else:
        for key, fn in (("attention", attention_figure), ("embeddings", embeddings_figure)):
            p = fn(dataset, picture_ckpt, out / f"{key}.png")
            if p:
                written[key] = p
    return {"paths": {k: str(v) for k, v in written.items()}, "rows": rows}
