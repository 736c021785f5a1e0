"""Search space files: the bundled ones load; malformed ones are rejected naming the key."""

from __future__ import annotations

import pytest

from din_ray.resources import resource_path, tune_space_names
from din_ray.train.loop import TrainConfig
from din_ray.tune.run import TuneSettings, concurrent_trials, default_point
from din_ray.tune.space import SpaceError, load_space, parse_space

SPACES = resource_path("tune_spaces")


def test_default_space_is_the_papers_search():
    space = load_space(SPACES / "default.yaml")
    assert (space.metric, space.mode) == ("valid_gauc", "max")
    assert list(space.params) == ["lam", "lr", "activation"]
    lam = space.params["lam"]
    assert lam.distribution == "loguniform" and lam.args[0] < 0.01 < lam.args[1]
    assert space.params["lr"].distribution == "loguniform"
    assert set(space.params["activation"].args) == {"dice", "prelu"}
    # The untuned defaults lie inside it, so the default trial is evaluated.
    assert default_point(space, TrainConfig(data="x")) == {"lam": 0.01, "lr": 1e-3,
                                                            "activation": "dice"}


def test_packaged_spaces_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing relative to the checkout or the working directory
    assert tune_space_names() == ["default", "extended"]
    assert load_space("default") == load_space(SPACES / "default.yaml")
    assert load_space(TuneSettings(output="-").space) == load_space("default")
    with pytest.raises(SpaceError, match="not found"):
        load_space("no-such-space")


def test_every_bundled_space_loads_and_samples_valid_configs():
    from ray.tune.search.sample import Domain

    files = sorted(SPACES.glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        space = load_space(f)
        domains = space.to_tune()
        for name, domain in domains.items():
            assert isinstance(domain, Domain)
            for value in domain.sample(size=20):
                TrainConfig(data="x", **{name: value})  # every sample constructs
        assert parse_space(space.to_dict()) == parse_space(space.to_dict())


def test_integer_ranges_include_both_ends():
    space = parse_space({"params": {"embedding_dim": {"randint": [4, 5]}}})
    samples = set(space.to_tune()["embedding_dim"].sample(size=200))
    assert samples == {4, 5}


def test_yaml_exponent_without_dot_is_read_as_a_number(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("params:\n  lr: {loguniform: [1e-4, 1e-2]}\n")
    assert load_space(path).params["lr"].args == (1e-4, 1e-2)


@pytest.mark.parametrize("params, key, words", [
    ({"learning_rate": {"loguniform": [1e-4, 1e-2]}}, "params.learning_rate",
     "not a TrainConfig field"),
    ({"lr": {"normal": [0.0, 1.0]}}, "params.lr.normal", "unknown distribution"),
    ({"lr": {"loguniform": [1e-2, 1e-4]}}, "params.lr.loguniform", "low must be < high"),
    ({"lr": {"uniform": [0.1, 0.1]}}, "params.lr.uniform", "low must be < high"),
    ({"lam": {"loguniform": [0.0, 1.0]}}, "params.lam.loguniform", "low > 0"),
    ({"activation": {"choice": []}}, "params.activation.choice", "non-empty list"),
    ({"activation": {"choice": ["dice", "relu"]}}, "params.activation.choice", "'relu'"),
    ({"activation": {"choice": ["dice", "dice"]}}, "params.activation.choice", "repeated"),
    ({"lr": {"loguniform": [1e-4]}}, "params.lr.loguniform", "[low, high]"),
    ({"lr": {"loguniform": ["fast", 1e-2]}}, "params.lr.loguniform", "not a number"),
    ({"lr": 0.001}, "params.lr", "exactly one distribution"),
    ({"lr": {"loguniform": [1e-4, 1e-2], "choice": [1e-3]}}, "params.lr",
     "exactly one distribution"),
    ({"embedding_dim": {"uniform": [4, 32]}}, "params.embedding_dim.uniform", "int-valued"),
    ({"embedding_dim": {"randint": [0, 8]}}, "params.embedding_dim.randint", "valid embedding_dim"),
    ({"lam": {"randint": [1, 3]}}, "params.lam.randint", "integer fields"),
    ({"dropout": {"uniform": [0.0, 1.0]}}, "params.dropout.uniform", "valid dropout"),
    ({"epochs": {"randint": [1, 5]}}, "params.epochs", "fixed for a tuning run"),
    ({"data": {"choice": ["a", "b"]}}, "params.data", "fixed for a tuning run"),
])
def test_malformed_space_names_the_key(tmp_path, params, key, words):
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"metric": "valid_gauc", "mode": "max", "params": params}))
    with pytest.raises(SpaceError) as e:
        load_space(path)
    message = str(e.value)
    assert str(path) in message and f"{key}:" in message and words in message, message


@pytest.mark.parametrize("raw, key", [
    ({"metric": "test_gauc", "params": {"lr": {"loguniform": [1e-4, 1e-2]}}}, "metric"),
    ({"mode": "up", "params": {"lr": {"loguniform": [1e-4, 1e-2]}}}, "mode"),
    ({"metric": "valid_gauc", "mode": "min", "params": {"lr": {"uniform": [0.1, 0.2]}}}, "mode"),
    ({"params": {}}, "params"),
    ({"metric": "valid_gauc"}, "params"),
    ({"params": {"lr": {"uniform": [0.1, 0.2]}}, "samples": 3}, "samples"),
    (["lr"], "<top level>"),
])
def test_malformed_top_level_names_the_key(raw, key):
    with pytest.raises(SpaceError, match=f"<dict>: {key}:"):
        parse_space(raw)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: {lr: [1, 2\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(bad)


def test_concurrency_follows_cluster_cpus():
    # 1-worker trials run in the trial's process: no read tasks, no Train controller.
    assert concurrent_trials(8, workers=1, cpus_per_worker=1.0) == 8
    assert concurrent_trials(8, workers=1, cpus_per_worker=3.0) == 2
    assert concurrent_trials(8, workers=2, cpus_per_worker=1.0) == 2
    assert concurrent_trials(2, workers=2, cpus_per_worker=1.0) == 1
    assert concurrent_trials(16, workers=2, cpus_per_worker=0.5) == 7
