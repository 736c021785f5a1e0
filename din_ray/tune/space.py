"""Hyperparameter search spaces: YAML data files (packaged ones in
`din_ray/resources/tune_spaces/*.yaml`, named by their stem), validated when loaded.

A space names the metric to optimise, its direction, and one distribution per TrainConfig field:

    metric: valid_gauc          # valid_gauc | valid_auc | valid_logloss (validation, per epoch)
    mode: max                   # max | min
    params:
      lam: {loguniform: [1.0e-4, 1.0]}     # floats, 0 < low < high, sampled on a log scale
      dropout: {uniform: [0.0, 0.5]}       # floats, low < high
      embedding_dim: {randint: [8, 32]}    # integers, low <= x <= high (both ends included)
      batch_size: {lograndint: [64, 1024]} # integers on a log scale, 0 < low, both ends included
      activation: {choice: [dice, prelu]}  # any values of the field's type, at least one

Every error names the file and the key at fault (`params.lam.loguniform`), and every bound and
choice is checked against TrainConfig's own validation, so a space that loads yields trials whose
configurations construct. Fields that describe where and how a run executes (data, output,
workers, epochs, seed, ...) are set on the command line, not searched.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from din_ray.train.loop import TrainConfig

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "lograndint", "choice")
METRICS = ("valid_gauc", "valid_auc", "valid_logloss")
MODES = ("max", "min")
# Fixed per tuning run (the command line sets them): where data and results live, the
# execution layout, the epoch budget ASHA schedules against, the seed, and the structured fields
# (tuples and dicts) that Optuna's categorical sampler cannot hold.
NOT_TUNABLE = frozenset({
    "data", "output", "workers", "threads", "storage_path", "run_name", "address",
    "max_failures", "use_gpu", "device", "cpus_per_worker", "replicate_below", "epochs", "seed",
    "eval_batch_size", "attention_hidden", "mlp_hidden", "extra",
})


class SpaceError(ValueError):
    """A search space file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field.

    Args:
        name: the TrainConfig field.
        distribution: one of DISTRIBUTIONS.
        args: (low, high) for the ranges, the candidate values for "choice".
    """

    name: str
    distribution: str
    args: tuple

    def to_tune(self):
        """The equivalent `ray.tune` search domain (integer ranges include `high`)."""
        from ray import tune  # only the driver needs Ray; loading a space does not

        low, high = (self.args + (None, None))[:2]
        if self.distribution == "loguniform":
            return tune.loguniform(low, high)
        if self.distribution == "uniform":
            return tune.uniform(low, high)
        if self.distribution == "randint":
            return tune.randint(low, high + 1)  # Ray's upper bound is exclusive
        if self.distribution == "lograndint":
            return tune.lograndint(low, high + 1)
        return tune.choice(list(self.args))

    def describe(self) -> str:
        if self.distribution == "choice":
            return f"{self.name} ∈ {{{', '.join(map(str, self.args))}}}"
        return f"{self.name} ~ {self.distribution}[{self.args[0]}, {self.args[1]}]"


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space.

    Args:
        metric: the validation metric to optimise, reported every epoch.
        mode: "max" or "min".
        params: searched field -> Param, in file order.
        source: where it was loaded from (for messages).
    """

    metric: str
    mode: str
    params: dict[str, Param]
    source: str = "<dict>"

    def to_tune(self) -> dict:
        """`param_space` for `ray.tune.Tuner`: field -> search domain."""
        return {name: p.to_tune() for name, p in self.params.items()}

    def to_dict(self) -> dict:
        """The space as it appears in a file (round-trips through `parse_space`)."""
        return {"metric": self.metric, "mode": self.mode,
                "params": {n: {p.distribution: list(p.args)} for n, p in self.params.items()}}


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search space: a YAML file, or the name of one installed with
    din-ray (`din_ray/resources/tune_spaces/<name>.yaml`: "default", "extended"); raises
    SpaceError naming the key at fault."""
    path = space_file(path)
    if not path.is_file():
        raise SpaceError(f"{path}: search space file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML: {e}") from None
    return parse_space(raw, source=str(path))


def space_file(space: str | Path) -> Path:
    """The file of `space`: a packaged space's name (no suffix, no directory), else a path."""
    from din_ray.resources import tune_space_names, tune_space_path

    if isinstance(space, str) and space in tune_space_names():
        return tune_space_path(space)
    return Path(space)


def parse_space(raw: Any, source: str = "<dict>") -> SearchSpace:
    """Validate a space given as plain data (the parsed YAML)."""
    def fail(key: str, message: str) -> SpaceError:
        return SpaceError(f"{source}: {key}: {message}")

    if not isinstance(raw, dict):
        raise fail("<top level>", f"expected a mapping with metric, mode and params, got "
                                  f"{type(raw).__name__}")
    unknown = sorted(set(raw) - {"metric", "mode", "params"})
    if unknown:
        raise fail(unknown[0], "unknown top-level key; expected metric, mode and params")
    metric = raw.get("metric", "valid_gauc")
    if metric not in METRICS:
        raise fail("metric", f"must be one of {list(METRICS)}, got {metric!r}")
    mode = raw.get("mode", "min" if metric == "valid_logloss" else "max")
    if mode not in MODES:
        raise fail("mode", f"must be 'max' or 'min', got {mode!r}")
    if (metric == "valid_logloss") != (mode == "min"):
        raise fail("mode", f"{mode!r} optimises {metric} the wrong way (gauc/auc: max, "
                           "logloss: min)")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise fail("params", "expected a non-empty mapping of TrainConfig field -> distribution, "
                             f"got {params!r}")
    out = {}
    for name, spec in params.items():
        out[str(name)] = _parse_param(str(name), spec, fail)
    return SearchSpace(metric=metric, mode=mode, params=out, source=source)


_HINTS = typing.get_type_hints(TrainConfig)
_FIELDS = {f.name for f in fields(TrainConfig)}


def _parse_param(name: str, spec: Any, fail) -> Param:
    key = f"params.{name}"
    if name not in _FIELDS:
        tunable = sorted(_FIELDS - NOT_TUNABLE)
        raise fail(key, f"unknown parameter: not a TrainConfig field (tunable fields: "
                        f"{', '.join(tunable)})")
    if name in NOT_TUNABLE:
        raise fail(key, "is fixed for a tuning run (set it on the command line), not searched")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise fail(key, f"expected exactly one distribution such as {{loguniform: [low, high]}} "
                        f"or {{choice: [a, b]}}, got {spec!r}")
    (dist, args), = spec.items()
    key = f"{key}.{dist}"
    if dist not in DISTRIBUTIONS:
        raise fail(key, f"unknown distribution {dist!r}; expected one of {list(DISTRIBUTIONS)}")
    kind = _HINTS[name]
    if not isinstance(args, list) or not args:
        raise fail(key, f"expected a non-empty list, got {args!r}")
    if dist == "choice":
        values = tuple(_coerce(v, kind, key, fail) for v in args)
        if len(set(values)) != len(values):
            raise fail(key, f"repeated values in {list(values)}")
    else:
        if len(args) != 2:
            raise fail(key, f"expected [low, high], got {args!r}")
        if dist in ("loguniform", "uniform") and kind is not float:
            raise fail(key, f"{name} is {kind.__name__}-valued: use choice"
                            + (" or randint/lograndint" if kind is int else ""))
        if dist in ("randint", "lograndint") and kind is not int:
            raise fail(key, f"{name} is {kind.__name__}-valued: randint/lograndint are for "
                            "integer fields")
        low, high = (_coerce(v, kind, key, fail) for v in args)
        if not low < high:
            raise fail(key, f"low must be < high, got [{low}, {high}]")
        if dist in ("loguniform", "lograndint") and low <= 0:
            raise fail(key, f"a log scale needs low > 0, got {low}")
        values = (low, high)
    for v in values:  # the field's own validation, so every trial's config constructs
        try:
            TrainConfig(data="<space>", **{name: v})
        except ValueError as e:
            raise fail(key, f"value {v!r} is not a valid {name}: {e}") from None
    return Param(name=name, distribution=dist, args=values)


def _coerce(value: Any, kind: type, key: str, fail):
    """`value` as the field's type. YAML reads `1e-4` (no dot) as a string, so numeric strings
    are parsed for float fields; anything else must already have the field's type."""
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise fail(key, f"{value!r} is not a number") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise fail(key, f"{value!r} is not {kind.__name__} (the field's type)")
    if kind is float and not math.isfinite(value):
        raise fail(key, f"{value!r} is not finite")
    return value
