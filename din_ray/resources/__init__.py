"""Files installed with din-ray (package data), found through `importlib.resources` wherever
din-ray is installed, not relative to the working directory or a source checkout:

    tune_spaces/<name>.yaml   search spaces of `din-ray tune --space <name>` (default: "default")
    serve_config.yaml         the Serve config of the CTR app (serve/config.yaml is a copy)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SERVE_CONFIG = "serve_config.yaml"


def resource_path(*parts: str) -> Path:
    """The installed file din_ray/resources/<parts...> (a regular installed package, whose files
    are on disk; a zipped install is not supported)."""
    return Path(str(files(__name__).joinpath(*parts)))


def tune_space_names() -> list[str]:
    """The packaged search spaces' names ("default", "extended", ...)."""
    return sorted(p.stem for p in resource_path("tune_spaces").glob("*.yaml"))


def tune_space_path(name: str) -> Path:
    """The packaged search space `name` (tune_spaces/<name>.yaml)."""
    return resource_path("tune_spaces", f"{name}.yaml")
