"""Three synthetic days end to end, in-process: prepare --vocab-from, train --init-from the
champion, gate on the new day's test split, promote; ads appear and retire between days."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from din_ray.checkpoint import Checkpoint
from din_ray.cli import main as cli_main
from din_ray.continual import (
    DayConfig,
    PromotionError,
    champion,
    decide,
    evaluate,
    read_ledger,
    read_state,
    run_day,
)
from din_ray.data.format import PreparedDataset
from din_ray.data.logs.spec import SpecError
from din_ray.data.logs.synthetic import write_synthetic_days

TRAIN = dict(epochs=1, batch_size=128, embedding_dim=8, attention_hidden=(16, 8),
             mlp_hidden=(16, 8), threads=1, sparse_lr=0.05, eval_batch_size=4096)


@pytest.fixture(scope="module")
def three_days(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    specs = write_synthetic_days(root / "raw", 3, 2500, drift=0.25, items=80, categories=8,
                                 users=150)
    out = root / "out"
    records = [run_day(DayConfig(output=str(out), day=f"day-{d + 1}", spec=str(spec),
                                 margin=-1.0 if d == 1 else 1.0, train=TRAIN))
               for d, spec in enumerate(specs)]
    return root, out, specs, records


def test_three_days_keep_known_ids_and_gate(three_days):
    root, out, _, records = three_days
    assert [r["day"] for r in read_ledger(out)] == ["day-1", "day-2", "day-3"]
    # Day 1: no champion. Day 2: margin -1 always promotes. Day 3: margin +1 never does.
    assert [r["promoted"] for r in records] == [True, True, False]
    assert records[1]["init_from"].endswith("champions/day-1")
    assert records[2]["init_from"].endswith("champions/day-2")
    assert champion(out).checkpoint.endswith("champions/day-2")
    for r in records:
        assert all(math.isfinite(r["candidate"][k]) for k in ("gauc", "auc", "logloss"))
    for r in records[1:]:
        assert r["champion"]["split_id"] == r["candidate"]["split_id"]  # the same rows

    data = [PreparedDataset.open(out / "data" / f"day-{d}") for d in (1, 2, 3)]
    vocabs = [ds.vocab("adgroup_id") for ds in data]
    for before, after in zip(vocabs, vocabs[1:]):
        assert all(after[raw] == i for raw, i in before.items())  # known ids keep their ids
        assert set(after) - set(before)  # new ads appeared
    # Ads retired before day 2 (ids 1..20) are absent from its training data: the day-2 model,
    # trained from the day-1 champion, keeps their rows exactly as the champion had them.
    day1 = Checkpoint.open(out / "champions" / "day-1")
    day2 = Checkpoint.open(out / "runs" / "day-2" / "checkpoint")
    retired = sorted(vocabs[0][str(a)] for a in range(1, 21) if str(a) in vocabs[0])
    assert retired and data[1].counts()["adgroup_id"][retired].sum() == 0
    rows1 = day1.table_rows("adgroup_id", 0, day1.table_specs()["adgroup_id"].num_rows)
    rows2 = day2.table_rows("adgroup_id", 0, day2.table_specs()["adgroup_id"].num_rows)
    torch.testing.assert_close(rows2["weight"][retired], rows1["weight"][retired], rtol=0, atol=0)
    assert not torch.equal(rows2["weight"][:len(rows1["weight"])], rows1["weight"])  # trained
    assert day2.table_specs()["adgroup_id"].num_rows > day1.table_specs()["adgroup_id"].num_rows


def test_promotion_against_another_split_fails_and_champion_stays(three_days):
    _, out, specs, _ = three_days
    state = (out / "state.json").read_text()
    cand = evaluate(out / "runs" / "day-3" / "checkpoint", out / "data" / "day-3")
    champ = evaluate(champion(out).checkpoint, out / "data" / "day-2")
    with pytest.raises(PromotionError, match="day-2.*not the same split"):
        decide(cand, champ, 0.0)
    with pytest.raises(PromotionError, match="split 'valid'"):
        decide(cand, replace(cand, split="valid"), 0.0)
    # A day that fails (its spec is missing) changes neither the champion nor the ledger.
    lines = (out / "ledger.jsonl").read_text()
    with pytest.raises(SpecError, match="nope.yaml: spec file not found"):
        run_day(DayConfig(output=str(out), day="day-4", spec=str(specs[0].parent / "nope.yaml"),
                          train=TRAIN))
    assert (out / "state.json").read_text() == state
    assert (out / "ledger.jsonl").read_text() == lines
    assert json.loads(state)["last_dataset"] == read_state(out)["last_dataset"] == "data/day-3"


def test_cli_continual_and_bad_margin(three_days, capsys):
    root, _, specs, _ = three_days
    out = root / "cli-out"
    args = ["continual", "--spec", str(specs[0]), "--output", str(out), "--epochs", "1",
            "--embedding-dim", "8", "--attention-hidden", "16,8", "--mlp-hidden", "16,8",
            "--batch-size", "128"]
    assert cli_main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["day"] == "day-01" and printed["promoted"] is True
    with pytest.raises(ValueError, match="train must not set"):
        DayConfig(output=str(out), day="d", spec="s", train={"init_from": "x"})
