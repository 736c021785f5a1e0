"""din_ray.config: one declaration per knob, one rule for configs read back from disk."""

import argparse
import json
from dataclasses import fields

import pytest

from din_ray.cli.train import add_train_arguments, config_from_args
from din_ray.config import (
    EXECUTION_KNOBS,
    KNOB_SECTION,
    SECTIONS,
    TrainConfig,
    add_arguments,
)
from din_ray.model import ModelConfig


def test_flat_knobs_land_in_their_sections():
    cfg = TrainConfig.create(data="d", lr=0.01, model="base", reg="l2", workers=3,
                             attention_hidden=[8, 4])
    assert cfg.optim.lr == 0.01 and cfg.model.model == "base"
    assert cfg.regularization.reg == "l2" and cfg.execution.workers == 3
    assert cfg.model.attention_hidden == (8, 4)
    assert isinstance(cfg.model, ModelConfig)  # the model's own object
    assert cfg.replace(lr=0.5).optim.lr == 0.5 and cfg.get("workers") == 3
    with pytest.raises(ValueError, match=r"unknown training config keys \['learning_rate'\]"):
        cfg.replace(learning_rate=1)


def test_a_config_round_trips_through_json():
    cfg = TrainConfig.create(data="d", epochs=2, mlp_hidden=(16, 8), activation="prelu",
                             extra={"k": 1})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_keys_on_disk_are_an_error_naming_them_and_the_file():
    raw = TrainConfig().to_dict()
    raw["optim"]["learning_rate"] = 1
    with pytest.raises(ValueError, match=r"run/config.json \[optim\]: unknown keys "
                                         r"\['learning_rate'\]"):
        TrainConfig.from_dict(raw, "run/config.json")
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "bogus": 1})


def test_keys_missing_from_an_older_file_take_todays_default_or_their_legacy_value():
    raw = TrainConfig.create(data="d", activation="dice").to_dict()
    del raw["optim"]["init_std"]
    del raw["model"]["attention_activation"]  # written before the unit had its own activation
    del raw["model"]["ad_bias"], raw["model"]["zero_logit"]
    cfg = TrainConfig.from_dict(raw)
    assert cfg.optim.init_std == TrainConfig().optim.init_std
    assert cfg.model.attention_activation == "dice"  # the unit used `activation` then
    # The ad bias and the zero logit layer were on by default then; the bias is part of the
    # model's structure, so a checkpoint from then rebuilds with it.
    assert cfg.model.ad_bias and cfg.model.zero_logit
    assert not TrainConfig().model.ad_bias and not TrainConfig().model.zero_logit


def test_a_flat_file_from_before_the_sections_reads_under_the_same_rule():
    flat = {"data": "d", "lr": 0.02, "model": "din", "activation": "prelu", "workers": 2,
            "attention_hidden": [8, 4]}
    cfg = TrainConfig.from_dict(flat)
    assert cfg == TrainConfig.create(data="d", lr=0.02, activation="prelu", workers=2,
                                     attention_hidden=(8, 4), attention_activation="prelu",
                                     ad_bias=True, zero_logit=True)
    with pytest.raises(ValueError, match=r"old.json: unknown training config keys \['bogus'\]"):
        TrainConfig.from_dict({**flat, "bogus": 1}, "old.json")


def test_every_knob_has_a_flag_with_help_and_the_flag_parses_to_its_default():
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    add_arguments(p, ("output", *EXECUTION_KNOBS))
    flags = {a.dest: a for a in p._actions if a.dest in KNOB_SECTION}
    assert set(flags) == set(KNOB_SECTION) - {"extra"}
    assert all(a.help for a in flags.values())
    assert config_from_args(p.parse_args(["--data", "d"])) == TrainConfig.create(data="d")


def test_existing_flag_spellings_keep_working():
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args = p.parse_args(["--data", "d", "--softmax", "--no-ad-bias", "--zero-logit", "0",
                         "--attention-hidden", "8,4", "--eval-at-start", "--reg", "filter",
                         "--filter-top-k", "3", "--lr", "0.1", "--attention-activation", ""])
    cfg = config_from_args(args)
    assert cfg.model.attention_softmax and not cfg.model.ad_bias and not cfg.model.zero_logit
    assert cfg.model.attention_hidden == (8, 4) and cfg.optim.eval_at_start
    assert cfg.regularization.filter_top_k == 3 and cfg.optim.lr == 0.1
    assert cfg.model.attention_activation == cfg.model.activation
    on = config_from_args(p.parse_args(["--data", "d", "--ad-bias", "--zero-logit", "1"]))
    assert on.model.ad_bias and on.model.zero_logit
    with pytest.raises(SystemExit):
        p.parse_args(["--data", "d", "--reg", "bogus"])  # choices come from the declaration
    with pytest.raises(SystemExit):
        p.parse_args(["--data", "d", "--zero-logit", "2"])


def test_knob_names_are_unique_over_the_sections():
    names = [f.name for cls in SECTIONS.values() for f in fields(cls)]
    assert len(names) == len(set(names))


def test_tune_flags_come_from_the_settings_declarations():
    from din_ray.cli import tune as tune_cli
    from din_ray.config import settings_from_args
    from din_ray.tune.run import TuneSettings

    p = argparse.ArgumentParser()
    tune_cli.register(p.add_subparsers())
    args = p.parse_args(["tune", "--data", "d", "--output", "o", "--seed", "3",
                         "--sampler-seed", "7", "--no-default-trial", "--trials", "5"])
    settings = settings_from_args(TuneSettings, args)
    assert settings == TuneSettings(output="o", sampler_seed=7, default_trial=False, trials=5)
    base = tune_cli.config_from_args(args, tune_cli.TRIAL_KNOBS)
    assert base.optim.seed == 3  # the trials' training seed, not the sampler's
    assert base.execution.storage_path == ""  # the search's own storage is not the trials'
