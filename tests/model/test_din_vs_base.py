"""DIN's local activation pays where the paper says it should: on data whose click depends on the
part of the history related to the candidate (the synthetic generator's planted structure)."""

import pytest

from din_ray.config import TrainConfig
from din_ray.data.synthetic import prepare_synthetic
from din_ray.train.local import run_local


@pytest.fixture(scope="module")
def strong_signal(tmp_path_factory):
    # 15 000 rows: DIN 0.678, BaseModel 0.613, popularity 0.552 test GAUC (30 000: 0.745, 0.675,
    # 0.573): a margin of 0.065, twice the 0.03 the test asks, in half the time.
    return prepare_synthetic(tmp_path_factory.mktemp("syn") / "data", rows=15_000, seed=0)


def train(data, out, model):
    # Embedding rows need a larger rate than dense layers to learn within two epochs.
    cfg = TrainConfig.create(data=str(data), output=str(out), model=model, epochs=2, patience=0,
                      sparse_lr=0.05, threads=2, seed=0)
    return run_local(cfg)


def test_din_beats_base_model_on_strong_local_activation(strong_signal, tmp_path):
    din = train(strong_signal, tmp_path / "din", "din")
    base = train(strong_signal, tmp_path / "base", "base")
    pop = run_local(TrainConfig.create(data=str(strong_signal), output=str(tmp_path / "pop"),
                                model="popularity"))
    # The history carries the signal, so both history models beat the no-history baseline,
    # and DIN, which can weight the behaviours of the candidate's category, beats sum pooling.
    assert base["gauc"] > pop["gauc"]
    assert din["gauc"] > base["gauc"] + 0.03, (din["gauc"], base["gauc"], pop["gauc"])
    print(f"test GAUC: DIN {din['gauc']:.4f}, BaseModel {base['gauc']:.4f}, "
          f"popularity {pop['gauc']:.4f}")
