"""`din-ray predict` in this process: one row per sample with the input's ids, CTRs that are the
model outputs `din-ray evaluate` scores, atomic output. (The Ray Data engine and the comparison
with served CTRs run in test_serve.py, on its Ray cluster.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from serve_helpers import train_tiny

from din_ray.checkpoint import load_model
from din_ray.cli import main as cli_main
from din_ray.data.format import PreparedDataset, iter_numpy_batches
from din_ray.metrics import evaluate_predictions
from din_ray.predict import CTR, PredictConfig, predict, read_predictions, to_arrays
from din_ray.train.loop import (
    BatchRegularizer,
    TrainConfig,
    WorkerEnv,
    evaluate_checkpoint,
    predict_split,
)


def evaluated_probs(run, data, split: str) -> np.ndarray:
    """The probabilities `evaluate_checkpoint` computes its metrics from, in split order."""
    model, tables, c = load_model(run / "checkpoint")
    dataset = PreparedDataset.open(data)
    batches = BatchRegularizer(TrainConfig.from_dict(c.config), dataset).eval(
        iter_numpy_batches(dataset.files(split), dataset.schema, 8192))
    return predict_split(model, tables, batches, c.schema, WorkerEnv())["prob"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return {"root": root, "din": train_tiny(root, "din"),
            # reg="filter" remaps rare ids: predictions must apply the same remapping.
            "filter": train_tiny(root, "din", name="filter", reg="filter", filter_top_k=10)}


@pytest.mark.parametrize("run", ["din", "filter"])
def test_predictions_are_the_model_outputs_evaluate_scores(runs, run, tmp_path):
    data = runs["root"] / "data"
    evaluated = evaluate_checkpoint(runs[run] / "checkpoint", data)
    dataset = PreparedDataset.open(data)
    for split in ("valid", "test"):
        out = tmp_path / f"{run}-{split}"
        summary = predict(PredictConfig(checkpoint=str(runs[run]), data=str(data),
                                        output=str(out), split=split, engine="auto",
                                        batch_size=40))
        assert summary["engine"] == "local" and summary["rows"] == dataset.num_rows(split)
        got = to_arrays(read_predictions(out), dataset.schema)
        # The sample's ids, label and user exactly as in the input, in input order.
        expected = dataset.read_split(split)
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        np.testing.assert_allclose(got[CTR], evaluated_probs(runs[run], data, split),
                                   rtol=0, atol=1e-6)
        # Metrics recomputed from the file (batches of another size can flip near-ties).
        metrics = evaluate_predictions(got[dataset.schema.label], got[CTR],
                                       got[dataset.schema.user_column])
        for key in ("gauc", "auc", "logloss"):
            assert metrics[key] == pytest.approx(evaluated[f"{split}_{key}"], abs=1e-3), key


def test_output_is_written_atomically_and_bad_input_fails_clearly(runs, tmp_path, capsys):
    data, out = runs["root"] / "data", tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(runs["din"]), "--data", str(data), "--output",
            str(out), "--engine", "local"]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == PreparedDataset.open(data).num_rows(
        "test")
    first = sorted(out.glob("*.parquet"))
    assert first and pq.read_schema(first[0]).names[-1] == CTR
    # An existing output is kept unless --overwrite; a failed run leaves nothing behind.
    assert cli_main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert cli_main(["predict", "--checkpoint", str(tmp_path / "nope"), "--data", str(data),
                     "--output", str(tmp_path / "never")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not list(tmp_path.glob(".never*")) and not (tmp_path / "never").exists()
    assert cli_main([*argv, "--overwrite", "--split", "valid"]) == 0
    assert read_predictions(out).num_rows == PreparedDataset.open(data).num_rows("valid")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="split must be one of"):
        PredictConfig(checkpoint="c", data="d", output="o", split="dev")
