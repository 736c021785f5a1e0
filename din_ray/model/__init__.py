"""The models, selectable by name: an explicit registry, so every model is importable from here
and no model file imports another lazily.

    name         class                                     module
    din          DIN, the Deep Interest Network            din_ray.model.din
    base         BaseModel, Embedding&MLP                  din_ray.model.din
    popularity   Popularity, smoothed click rate           din_ray.model.popularity
    lr           LR, logistic regression                   din_ray.model.baselines
    wide_deep    WideDeep                                  din_ray.model.baselines
    pnn          PNN                                       din_ray.model.baselines
    deepfm       DeepFM                                    din_ray.model.baselines

The interface they share (`CTRModel`, `ModelConfig`) is in `din_ray.model.base`, the layers they
are built from in `din_ray.model.layers`. Imports point one way: `base` imports `layers`,
`din` imports both, `baselines` builds on `din`, and only this module imports every model.

    from din_ray.model import ModelConfig, build_model
    model = build_model(schema, ModelConfig(model="din"))
"""

from __future__ import annotations

from din_ray.model.base import Batch, CTRModel, ModelConfig
from din_ray.model.baselines import LR, PNN, DeepFM, WideDeep
from din_ray.model.din import DIN, BaseModel
from din_ray.model.popularity import Popularity
from din_ray.schema import Schema

MODELS: dict[str, type[CTRModel]] = {
    "din": DIN,
    "base": BaseModel,
    "popularity": Popularity,
    "lr": LR,
    "wide_deep": WideDeep,
    "pnn": PNN,
    "deepfm": DeepFM,
}


def model_names() -> tuple[str, ...]:
    """Every registered model name, in the table's order."""
    return tuple(MODELS)


def build_model(schema: Schema, config: ModelConfig) -> CTRModel:
    """The model `config.model` over `schema`.

    Raises: ValueError naming the unknown model and the known ones.
    """
    if config.model not in MODELS:
        raise ValueError(f"model must be one of {model_names()}, got {config.model!r}")
    return MODELS[config.model](schema, config)


__all__ = ["DIN", "LR", "MODELS", "PNN", "BaseModel", "Batch", "CTRModel", "DeepFM",
           "ModelConfig", "Popularity", "WideDeep", "build_model", "model_names"]
