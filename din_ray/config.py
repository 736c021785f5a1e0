"""The training configuration, declared once: every knob's name, type, default, help and choices.

A `TrainConfig` holds where the data is and where the run goes, plus four sections:

    cfg.model           ModelConfig (din_ray.model): the architecture, the model's own object,
                        stored under its own key ("model") in every checkpoint's config.json
    cfg.optim           OptimConfig: how the weights start and move (optimizer, lr, epochs, seed)
    cfg.regularization  RegConfig: the paper's §6.5 regularizers (mba, difacto, filter, ...)
    cfg.execution       ExecConfig: where and how it runs (workers, Ray, devices, precision)

Every knob has one flat name, unique over the sections, that is its command-line flag (`lr` ->
`--lr`), its key in a search space and its key in `TrainConfig.create(...)` / `cfg.replace(...)`.
The flags and their help are generated from the fields (`add_arguments`), so a knob added to a
section is a flag without further code.

Configs read back from disk (checkpoints, metrics.json, a tuning run's settings.json, reproduce's
finished runs) go through one rule, `TrainConfig.from_dict`: unknown keys are an error naming
them and the file; keys missing from an older file take today's default, except where a field
declares `legacy` (the value a file written before the field existed means: e.g. the attention
unit used `activation` before `attention_activation` existed). Files written before the sections
existed (one flat mapping) are read by routing each flat name to its section.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from din_ray.embeddings.regularization import GRADIENT_REGULARIZERS, REG_FORMS, REGULARIZERS
from din_ray.model import ModelConfig, model_names
from din_ray.model.layers import ACTIVATIONS
from din_ray.schema import Schema

PRECISIONS = ("fp32", "bf16")
MISSING = object()


def knob(default, help: str, *, choices=None, flag: str | None = None, legacy=MISSING,
         cli: bool = True, metavar: str | None = None):
    """A config field with its command-line description.

    Args:
        default: today's default (a tuple for widths).
        help: the flag's help text.
        choices: allowed values (also checked by the flag's parser).
        flag: the flag's spelling when it is not `--<name-with-dashes>`, e.g. "--no-ad-bias"
            for a boolean that defaults to True, "--softmax" for attention_softmax.
        legacy: the value a file written before this field existed means (default: `default`).
        cli: False for fields no command sets.
        metavar: the flag's placeholder in --help.
    """
    meta = {"help": help, "choices": choices, "flag": flag, "legacy": legacy, "cli": cli,
            "metavar": metavar}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ModelConfig is the model's own object (din_ray.model), which knows nothing of command lines:
# its fields' flags are described here, in one place, with the same keys `knob` takes.
MODEL_KNOBS: dict[str, dict] = {
    "model": {"help": "the model (din, base, popularity, and the baselines in din_ray.model)",
              "choices": "model_names"},
    "activation": {"help": "activation of the MLP, and of the attention unit when "
                           "--attention-activation is ''", "choices": ACTIVATIONS},
    "attention_hidden": {"help": "widths of the local activation unit, comma-separated"},
    "mlp_hidden": {"help": "widths of the MLP before the logit, comma-separated"},
    "attention_softmax": {"help": "softmax-normalise attention weights", "flag": "--softmax"},
    "pooling": {"help": "BaseModel's history pooling", "choices": ("sum", "mean")},
    # Off by default since the defaults comparison with a plain DIN (docs/results.md, "Defaults
    # vs a plain DIN"); a checkpoint saved before the field existed had the bias.
    "ad_bias": {"help": "add a learned per-id bias of every ad feature to the logit",
                "flag": "--ad-bias", "off_flag": "--no-ad-bias", "legacy": True},
    "dropout": {"help": "dropout after each MLP hidden layer"},
    "smoothing": {"help": "popularity prior strength (pseudo-impressions at the global rate)"},
    # Saved before these fields existed: the unit used `activation`, Dice momentum 0.01.
    "attention_activation": {"help": "the attention unit's activation ('' = --activation)",
                             "choices": ("", *ACTIVATIONS), "legacy": ""},
    "dice_momentum": {"help": "Dice's moving-average weight after its first 1/momentum batches",
                      "legacy": 0.01},
    "zero_logit": {"help": "1: the MLP's logit layer starts at zero (the logit is the ad bias)",
                   "flag": "--zero-logit", "zero_one": True, "legacy": True},
}


@dataclass(frozen=True)
class OptimConfig:
    """How the weights start and move. Adam at 1e-3 with 0.9 decay per epoch follows the
    paper's Alibaba setup (§6.1); batch 256 suits the public datasets on a CPU."""

    optimizer: str = knob("adam", "dense and row-wise optimizer", choices=("adam", "sgd"))
    lr: float = knob(1e-3, "learning rate of the dense layers (and of rows, see --sparse-lr)")
    # A row moves about lr per touch under Adam and rare ids are touched a few times an epoch,
    # so tables usually need a larger rate than dense layers.
    sparse_lr: float = knob(0.0, "learning rate of embedding rows (0 = --lr)")
    # "lazy": Adam on the rows a step touched (torch.optim.SparseAdam's rule, O(touched rows));
    # "dense": every row every step, untouched ones on their decaying moments, as torch.optim.Adam
    # on a dense table (O(table) per step; for comparisons with a plain PyTorch DIN: on the
    # planted synthetic set both gave the same GAUC, docs/results.md "Defaults vs a plain DIN").
    sparse_adam: str = knob("lazy", "Adam on the touched embedding rows only (lazy) or on every "
                                    "row every step (dense, O(table) per step)",
                            choices=("lazy", "dense"))
    lr_decay: float = knob(0.9, "per-epoch factor of both learning rates")
    batch_size: int = knob(256, "samples per worker and step (a step's global batch is "
                                "batch_size x workers)")
    eval_batch_size: int = knob(8192, "samples per evaluation batch")
    # False: training reads the split in file order every epoch, so runs at different worker
    # counts can be given the same global batches (the distributed equivalence test does).
    shuffle: bool = knob(True, "read the training split in file order every epoch",
                         flag="--no-shuffle")
    # Up to 8 with early stopping, as the reference DIN: 5 cut off runs still improving on the
    # planted synthetic set (best epoch 7-8 of 8 at init_std 0.07-0.1; docs/results.md,
    # "Defaults vs a plain DIN"); ml-latest-small stops itself after 4-6.
    epochs: int = knob(8, "epochs to train")
    patience: int = knob(2, "early stop after N epochs without validation gain (0 = off)")
    seed: int = knob(0, "seed of the initial weights, the batch order and id dropout")
    # The reference DIN's 0.05, with the ad bias off and the logit layer at torch's init
    # (ModelConfig). 0.07 / 0.1 fitted the planted synthetic set better (+0.003 / +0.005
    # validation GAUC) and ml-latest-small worse (-0.003 / -0.012) (docs/results.md, "Defaults
    # vs a plain DIN").
    init_std: float = knob(0.05, "standard deviation of the initial embedding rows")
    # "popularity": ad bias rows start at the candidate's smoothed training click rate.
    bias_init: str = knob("popularity", "start ad bias rows at the smoothed training click "
                                        "rate, or at zero", choices=("popularity", "zero"))
    # "Epoch 0": the model before any update, a candidate for the best epoch.
    eval_at_start: bool = knob(False, "evaluate the untrained model as epoch 0, a candidate "
                                      "for the best")

    def __post_init__(self) -> None:
        _check_ranges(self, {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
                             "eval_batch_size": self.eval_batch_size >= 1, "lr": self.lr > 0,
                             "sparse_lr": self.sparse_lr >= 0,
                             "lr_decay": 0 < self.lr_decay <= 1,
                             "patience": self.patience >= 0})
        _check_choices(self)

    def sparse_rate(self) -> float:
        """The embedding rows' learning rate before decay."""
        return self.sparse_lr or self.lr


@dataclass(frozen=True)
class RegConfig:
    """The regularizer of the embedding tables (paper §6.5; din_ray.embeddings.regularization)."""

    reg: str = knob("mba", "regularizer (paper §6.5; see din_ray.embeddings.regularization)",
                    choices=REGULARIZERS)
    lam: float = knob(0.01, "regularization strength λ, for a global batch of 256 samples")
    # "decoupled": after the update, as AdamW (under Adam λ keeps its meaning); "coupled": added
    # to the gradient, Eq. 7 as written. Identical under SGD.
    reg_form: str = knob("decoupled", "mba/difacto/l2 applied after the optimizer's update "
                                      "(decoupled, as AdamW) or added to the gradient "
                                      "(coupled, Eq. 7); the same under SGD", choices=REG_FORMS)
    filter_top_k: int = knob(0, "--reg filter: ids kept per table, the most frequent")
    id_dropout: float = knob(0.5, "--reg dropout: share of each training sample's ids "
                                  "discarded (paper: 50 %%)")

    def __post_init__(self) -> None:
        _check_ranges(self, {"lam": self.lam >= 0, "filter_top_k": self.filter_top_k >= 0,
                             "id_dropout": 0 <= self.id_dropout < 1})
        _check_choices(self)
        if self.reg == "filter" and self.filter_top_k < 1:
            raise ValueError("reg='filter' needs filter_top_k >= 1 (ids kept per table), got "
                             f"{self.filter_top_k}")


@dataclass(frozen=True)
class ExecConfig:
    """Where and how the run executes; none of it changes what is learned, except `workers`
    (the global batch) and `precision`."""

    workers: int = knob(1, "Ray Train workers")
    threads: int = knob(0, "torch intra-op threads per worker (0 = torch's default)")
    storage_path: str = knob("", "Ray Train storage (dir or s3:// gs:// URI); default OUTPUT/ray")
    run_name: str = knob("train", "Ray run name; rerunning with the same name and storage "
                                  "resumes")
    address: str = knob("", "Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    max_failures: int = knob(1, "worker-group restarts from the latest checkpoint")
    use_gpu: bool = knob(False, "one GPU per worker, NCCL for the embedding exchanges")
    device: str = knob("", "with --local: the torch device to train on (cuda, cuda:1); "
                           "default CPU")
    # "bf16": the dense part under bf16 autocast; weights, optimizer state and embedding rows
    # stay fp32. "fp32": everything fp32 (TF32 matmuls on CUDA either way).
    precision: str = knob("fp32", "bf16: the attention unit and MLP under bf16 autocast (fp32 "
                                  "weights)", choices=PRECISIONS)
    # Oversubscribed on small machines on purpose: Ray Data needs CPUs of its own to read.
    cpus_per_worker: float = knob(1.0, "CPUs each training worker requests")
    replicate_below: int = knob(1024, "replicate embedding tables with fewer rows; shard the "
                                      "others row-wise")
    # A Ray Data pass costs seconds of start-up before its first batch: small splits are read
    # once by the driver into the object store and sliced there by every worker and epoch.
    cache_below_mb: float = knob(256.0, "keep splits smaller than this (Parquet MB) in Ray's "
                                        "object store across epochs instead of streaming them "
                                        "from files each epoch (0 = never)")

    def __post_init__(self) -> None:
        _check_ranges(self, {"workers": self.workers >= 1, "threads": self.threads >= 0,
                             "max_failures": self.max_failures >= -1,
                             "cpus_per_worker": self.cpus_per_worker > 0,
                             "replicate_below": self.replicate_below >= 0,
                             "cache_below_mb": self.cache_below_mb >= 0})
        _check_choices(self)
        if self.device and self.use_gpu:
            raise ValueError(f"device={self.device!r} is for local runs; with use_gpu Ray "
                             "places each worker on its own GPU")
        if self.device:
            torch.device(self.device)  # raises on a malformed name, e.g. "gpu"


SECTIONS: dict[str, type] = {"model": ModelConfig, "optim": OptimConfig,
                             "regularization": RegConfig, "execution": ExecConfig}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; crosses the Ray boundary as `to_dict()`.

    Build one from flat knob names with `TrainConfig.create(data=..., lr=..., model="din")`;
    change knobs with `cfg.replace(epochs=1)`.
    """

    data: str = knob("", "prepared data directory (din-ray prepare ...)")
    output: str = knob("runs/train", "run directory (metrics.json, checkpoint/)")
    # 0 = the width the prepared data's schema names (prepare --embedding-dim).
    embedding_dim: int = knob(0, "embedding width of every table (0 = the prepared data's, "
                                 "set by prepare --embedding-dim)")
    # A checkpoint to start from (din_ray.train.warm_start): weights, rows and optimizer state;
    # its tables may have grown since (prepare --vocab-from). "" = a fresh start.
    init_from: str = knob("", "start from this checkpoint's weights, rows and optimizer state "
                              "(its tables may be smaller: data prepared with --vocab-from)",
                          metavar="CHECKPOINT")
    # Benchmark instrumentation, recorded in the checkpoint; see din_ray.train.loop.
    extra: dict = knob({}, "free-form", cli=False)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    regularization: RegConfig = field(default_factory=RegConfig)
    execution: ExecConfig = field(default_factory=ExecConfig)

    def __post_init__(self) -> None:
        if self.embedding_dim < 0:
            raise ValueError(f"embedding_dim must be >= 0 (0 = the prepared data's), got "
                             f"{self.embedding_dim}")
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"TrainConfig.{name} must be a {cls.__name__}, got "
                                f"{type(getattr(self, name)).__name__}")
        reg = self.regularization
        if (self.optim.sparse_adam == "dense" and reg.reg in GRADIENT_REGULARIZERS
                and reg.lam > 0):
            # Every row would be "touched" every step, so MBA's α_mj = 1 for all rows.
            raise ValueError(f"sparse_adam='dense' updates every row every step, which is not "
                             f"what reg={reg.reg!r} is defined on; use --reg none or --lam 0")

    # --- flat knob names ---------------------------------------------------------------------
    @classmethod
    def create(cls, **knobs) -> TrainConfig:
        """A config from flat knob names (`data`, `lr`, `model`, `workers`, ...): each goes to
        its section; the rest keep their defaults."""
        return cls().replace(**knobs)

    def replace(self, **knobs) -> TrainConfig:
        """A copy with the given flat knobs changed (validated again)."""
        unknown = sorted(set(knobs) - set(KNOB_SECTION))
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: "
                             f"{sorted(KNOB_SECTION)}")
        top = {k: v for k, v in knobs.items() if KNOB_SECTION[k] is None}
        for name in SECTIONS:
            changes = {k: v for k, v in knobs.items() if KNOB_SECTION[k] == name}
            if changes:
                top[name] = dataclasses.replace(getattr(self, name), **_coerce(
                    SECTIONS[name], changes))
        return dataclasses.replace(self, **top)

    def get(self, knob_name: str):
        """The value of a flat knob (`cfg.get("lr")` = `cfg.optim.lr`)."""
        section = KNOB_SECTION.get(knob_name, MISSING)
        if section is MISSING:
            raise KeyError(f"unknown training config key {knob_name!r}")
        return getattr(self if section is None else getattr(self, section), knob_name)

    def flat(self) -> dict:
        """Every knob by its flat name (JSON-ready but for tuples)."""
        return {k: self.get(k) for k in KNOB_SECTION}

    def training_schema(self, prepared: Schema) -> Schema:
        """The prepared data's schema at this run's embedding width (`embedding_dim`; 0 keeps
        the width `prepare --embedding-dim` wrote)."""
        return prepared.with_embedding_dim(self.embedding_dim) if self.embedding_dim else prepared

    # --- disk and the Ray boundary -----------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "training config") -> TrainConfig:
        """THE rule for a config read back (from disk or across the Ray boundary): unknown keys
        are an error naming them and `source`; keys missing from an older file take today's
        default (or the field's declared `legacy` value). A file written before the sections
        existed (one flat mapping) is read by routing each flat name to its section."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a mapping, got {type(raw).__name__}")
        if not any(isinstance(raw.get(s), dict) for s in SECTIONS):
            raw = _nest_flat(raw, source)
        top = read_section(cls, {k: v for k, v in raw.items() if k not in SECTIONS}, source,
                           skip=set(SECTIONS))
        for name, section_cls in SECTIONS.items():
            top[name] = section_cls(**read_section(section_cls, raw.get(name, {}),
                                                   f"{source} [{name}]"))
        return cls(**top)


def _nest_flat(raw: dict, source: str) -> dict:
    unknown = sorted(set(raw) - set(KNOB_SECTION))
    if unknown:
        raise ValueError(f"{source}: unknown training config keys {unknown}; known: "
                         f"{sorted(KNOB_SECTION)}")
    nested: dict[str, Any] = {s: {} for s in SECTIONS}
    for key, value in raw.items():
        section = KNOB_SECTION[key]
        (nested if section is None else nested[section])[key] = value
    return nested


def read_section(cls: type, raw: dict, source: str, skip: set[str] = frozenset()) -> dict:
    """The constructor arguments of dataclass `cls` from `raw` under the one rule: unknown keys
    are an error naming them, missing keys take the field's `legacy` value when it declares one
    (else the default, by leaving them out), lists become tuples for tuple fields."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)} - skip
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; known: {sorted(names)}")
    values = dict(raw)
    for f in fields(cls):
        if f.name in names and f.name not in values:
            legacy = _meta(cls, f.name).get("legacy", MISSING)
            if legacy is not MISSING:
                values[f.name] = legacy
    return _coerce(cls, values)


def _coerce(cls: type, values: dict) -> dict:
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        if typing.get_origin(hints.get(key)) is tuple and isinstance(value, list):
            out[key] = tuple(value)
    return out


def _meta(cls: type, name: str) -> dict:
    if cls is ModelConfig:
        return MODEL_KNOBS.get(name, {})
    return dict(next(f for f in fields(cls) if f.name == name).metadata)


def _choices(cls: type, name: str):
    choices = _meta(cls, name).get("choices")
    if choices == "model_names":
        return model_names()
    return choices


def _check_ranges(obj, checks: dict[str, bool]) -> None:
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{name} is out of range: {getattr(obj, name)!r}")


def _check_choices(obj) -> None:
    for f in fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ValueError(f"{f.name} must be one of {tuple(choices)}, got "
                             f"{getattr(obj, f.name)!r}")


KNOB_SECTION: dict[str, str | None] = {
    **{f.name: None for f in fields(TrainConfig) if f.name not in SECTIONS},
    **{f.name: s for s, cls in SECTIONS.items() for f in fields(cls)},
}
assert len(KNOB_SECTION) == sum(len(fields(c)) for c in SECTIONS.values()) + len(
    fields(TrainConfig)) - len(SECTIONS), "knob names must be unique over the sections"


def knob_types() -> dict[str, type]:
    """Every flat knob name -> its annotated type (float, int, str, bool, tuple[int, ...])."""
    out = {}
    for cls in (TrainConfig, *SECTIONS.values()):
        hints = typing.get_type_hints(cls)
        out.update({f.name: hints[f.name] for f in fields(cls) if f.name in KNOB_SECTION})
    return out


# --- the command line ---------------------------------------------------------------------------
def _widths(text: str) -> tuple[int, ...]:
    return tuple(int(w) for w in text.split(",") if w)


def _zero_one(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return text == "1"


def _owner(name: str) -> type:
    section = KNOB_SECTION[name]
    return TrainConfig if section is None else SECTIONS[section]


def add_arguments(parser: argparse.ArgumentParser, names, *, required: set[str] = frozenset(),
                  help: dict[str, str] | None = None) -> None:
    """Add the flags of the training knobs `names` to `parser`, generated from their
    declarations (see `add_field_argument`). `required` knobs have no default; `help`
    overrides a knob's help text for this command."""
    defaults = TrainConfig().flat()
    for name in names:
        owner = _owner(name)
        add_field_argument(parser, name, defaults[name], _meta(owner, name),
                           _choices(owner, name), required=name in required,
                           help=(help or {}).get(name))


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type, *,
                           required: set[str] = frozenset()) -> None:
    """Add a flag for every `knob` field of the settings dataclass `cls` (e.g. TuneSettings)."""
    for f in fields(cls):
        default = None if f.default is dataclasses.MISSING else f.default
        add_field_argument(parser, f.name, default, dict(f.metadata), f.metadata.get("choices"),
                           required=f.name in required)


def settings_from_args(cls: type, args: argparse.Namespace):
    """The settings dataclass `cls` from the flags `add_settings_arguments` added."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def add_field_argument(parser: argparse.ArgumentParser, name: str, default, meta: dict,
                       choices=None, *, required: bool = False, help: str | None = None) -> None:
    """One field's flag: `--name-with-dashes` (or the declared `flag`) of the default's type.

    A bool defaulting to False is a `--name` switch (with `off_flag`, e.g. `--no-ad-bias`, also
    accepted to set it False); one defaulting to True is its declared negative flag
    (`--no-shuffle`), or a 0/1 value when declared under its own name; `zero_one` makes it a
    0/1 value whatever its default (`--zero-logit 0`); tuples of ints are comma-separated widths.
    """
    if meta.get("cli") is False:
        return
    flag = meta.get("flag") or "--" + name.replace("_", "-")
    kw: dict[str, Any] = {"dest": name, "help": help or meta.get("help", "")}
    if required:
        kw["required"] = True
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            kw["type"] = type(default)
    elif isinstance(default, bool):
        own = flag == "--" + name.replace("_", "-")
        if meta.get("zero_one") or (own and default):  # 0/1 under its own name
            kw.update(type=_zero_one, default=default, metavar="{0,1}")
        else:
            kw.update(action="store_false" if default else "store_true")
        parser.add_argument(flag, **kw)
        if meta.get("off_flag") and not default:  # an older spelling of the False default
            parser.add_argument(meta["off_flag"], dest=name, action="store_false",
                                help=f"{meta['help']}: off (the default)")
        return
    elif isinstance(default, tuple):
        kw.update(type=_widths, default=default, metavar="W1,W2")
    else:
        kw.update(type=type(default), default=default)
        if choices:
            kw["choices"] = tuple(choices)
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    parser.add_argument(flag, **kw)


def knobs_from_args(args: argparse.Namespace, names) -> dict:
    """The values of the knobs `names` that `args` (from `add_arguments`) holds."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


# The knobs `train`, `tune` and `reproduce` share: what is learned, not where it runs.
LEARNING_KNOBS: tuple[str, ...] = (
    "data", "embedding_dim", "init_from",
    *(f.name for s in ("model", "optim", "regularization") for f in fields(SECTIONS[s])),
    "threads", "precision")
EXECUTION_KNOBS: tuple[str, ...] = tuple(f.name for f in fields(ExecConfig)
                                         if f.name not in ("threads", "precision"))
