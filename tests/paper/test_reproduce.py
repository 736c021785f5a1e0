"""`din-ray reproduce --quick` end to end on tiny data, and the table arithmetic on its own."""

import csv
import json

import pytest
from builders import write_tiny_dataset

from din_ray.cli import main as cli_main
from din_ray.paper.reproduce import ENTRIES, ReproduceConfig, build_tables, markdown
from din_ray.train.loop import evaluate_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # Histories up to 12 over 8 categories, so the attention figure finds qualifying users.
    return write_tiny_dataset(tmp_path_factory.mktemp("rep") / "data", rows=480, max_len=12,
                              cates=8)


def test_quick_reproduce_writes_tables_and_figures(data, tmp_path):
    out = tmp_path / "out"
    args = ["reproduce", "--data", str(data), "--output", str(out), "--quick", "--seeds", "2",
            "--epochs", "2", "--models", "base,din_dice", "--regs", "none,filter"]
    assert cli_main(args) == 0

    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [(r["table"], r["row"]) for r in rows] == [
        ("3", "BaseModel"), ("3", "DIN with Dice"), ("4", "without reg."),
        ("4", "frequency filter")]
    for r in rows:
        assert r["seeds"] == "2"
        assert 0.0 <= float(r["gauc_mean"]) <= 1.0 and float(r["gauc_std"]) >= 0.0
    assert float(rows[0]["rela_impr"]) == 0.0 and float(rows[2]["rela_impr"]) == 0.0
    md = (out / "table.md").read_text()
    assert "## Table 3: models" in md and "## Table 4: regularizers on BaseModel" in md
    assert "| DIN with Dice |" in md and "| frequency filter |" in md

    runs = list(csv.DictReader((out / "runs.csv").open()))
    # (base, none) is shared by both tables: 3 cells x 2 seeds.
    assert sorted((r["entry"], r["reg"], r["seed"]) for r in runs) == sorted(
        (e, g, str(s)) for e, g in (("base", "none"), ("din_dice", "none"), ("base", "filter"))
        for s in (0, 1))
    for name in ("curves", "attention", "embeddings"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG, name

    # Each run went through the `din-ray train` path: its checkpoint re-evaluates identically.
    run = out / "runs" / "din_dice-none-seed1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["activation"] == "dice" and metrics["config"]["seed"] == 1
    assert len(metrics["history"]) == 2 and "test_gauc" in metrics["history"][0]
    again = evaluate_checkpoint(run / "checkpoint", data)
    assert again["gauc"] == pytest.approx(metrics["gauc"], abs=1e-12)

    # A repeated command reuses the finished runs instead of training again.
    stamp = (run / "metrics.json").stat().st_mtime_ns
    assert cli_main(args) == 0
    assert (run / "metrics.json").stat().st_mtime_ns == stamp


def record(entry, reg, seed, gauc):
    return {"entry": entry, "reg": reg, "seed": seed, "gauc": gauc, "auc": gauc - 0.01,
            "logloss": 0.5, "best_epoch": 1, "epochs_run": 1, "history": []}


def test_tables_follow_the_papers_layout_and_rela_impr():
    cfg = ReproduceConfig(data="d", output="o", seeds=2, models=("lr", "base", "din"),
                          regs=("none", "mba"))
    assert cfg.cells() == [("lr", "none"), ("base", "none"), ("din", "none"), ("base", "mba")]
    records = [record("base", "none", 0, 0.70), record("base", "none", 1, 0.72),
               record("lr", "none", 0, 0.60), record("lr", "none", 1, 0.62),
               record("din", "none", 0, 0.76), record("din", "none", 1, 0.76),
               record("base", "mba", 0, 0.73), record("base", "mba", 1, 0.75)]
    rows = build_tables(cfg, records)
    by = {(r["table"], r["entry"], r["reg"]): r for r in rows}
    base = by[("3", "base", "none")]
    assert base["gauc_mean"] == pytest.approx(0.71)
    assert base["gauc_std"] == pytest.approx(0.0141421, rel=1e-4)
    # RelaImpr (Eq. 11) = ((0.76 - 0.5) / (0.71 - 0.5) - 1) x 100 %.
    assert by[("3", "din", "none")]["rela_impr"] == pytest.approx((0.26 / 0.21 - 1) * 100)
    assert by[("4", "base", "mba")]["rela_impr"] == pytest.approx((0.24 / 0.21 - 1) * 100)
    assert [r["row"] for r in rows] == ["LR", "BaseModel", "DIN", "without reg.", "MBA (λ/n_j)"]
    assert ENTRIES["din_dice"].activation == "dice" and ENTRIES["din"].activation == "prelu"


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="models: unknown"):
        ReproduceConfig(data="d", output="o", models=("gpt",))
    with pytest.raises(ValueError, match="regs: unknown"):
        ReproduceConfig(data="d", output="o", regs=("l1",))


def test_markdown_marks_the_best_row(tmp_path):
    data = write_tiny_dataset(tmp_path / "d", rows=40)
    from din_ray.data.format import PreparedDataset

    cfg = ReproduceConfig(data=str(data), output="o", seeds=1, models=("base", "din"), regs=())
    rows = build_tables(cfg, [record("base", "none", 0, 0.7), record("din", "none", 0, 0.8)])
    md = markdown(cfg, rows, PreparedDataset.open(data), 60.0)
    assert "| DIN | **0.8000 ± 0.0000** | +50.00% |" in md
