"""Preset for the public Taobao display-ad click log (Ali_Display_Ad_Click, the DIN paper's
Alibaba-style public data) on top of the generic log pipeline (`din_ray.data.logs.pipeline`).

    din-ray prepare taobao --input data/taobao --output out/taobao

Expected under the input directory (each a CSV file with a header, or a directory of CSV parts,
e.g. behavior_log/ split for parallel parsing):

    raw_sample.csv     user, time_stamp, adgroup_id, pid, nonclk, clk          (impressions)
    ad_feature.csv     adgroup_id, cate_id, campaign_id, customer, brand, price
    user_profile.csv   userid, cms_segid, cms_group_id, final_gender_code, age_level,
                       pvalue_level, shopping_level, occupation, new_user_class_level
    behavior_log.csv   user, time_stamp, btag, cate, brand                     (behaviours)

Features: the ad (adgroup_id, and from ad_feature cate_id, campaign_id, customer, brand, price
in bins), the context (pid), the user profile (all eight columns) and two behaviour sequences
aligned with the ad's category and brand (behaviour `cate` <-> `cate_id`, `brand` <-> `brand`),
which share their tables. `NULL` (ad_feature's unknown brand) and empty cells are missing values
-> OOV. Every btag (pv, cart, fav, buy) counts as a behaviour unless `keep_types` says otherwise.
The same spec as YAML is examples/taobao.yaml.
"""

from __future__ import annotations

from pathlib import Path

from din_ray.data.logs.pipeline import LogReport, prepare_logs
from din_ray.data.logs.spec import LogSpec, parse_spec

FILES = ("raw_sample", "ad_feature", "user_profile", "behavior_log")
PROFILE_COLUMNS = ("cms_segid", "cms_group_id", "final_gender_code", "age_level",
                   "pvalue_level", "shopping_level", "occupation", "new_user_class_level")
BTAGS = ("pv", "cart", "fav", "buy")
# Price (yuan) bins: roughly log-spaced over the range seen in ad_feature.
PRICE_BINS = (10, 20, 50, 100, 200, 500, 1000, 5000, 10000)


def _locate(input_dir: Path, name: str) -> str:
    for candidate in (input_dir / f"{name}.csv", input_dir / name):
        if candidate.exists():
            return str(candidate)
    expected = ", ".join(f"{n}.csv" for n in FILES)
    raise FileNotFoundError(f"{input_dir}: {name}.csv (or a {name}/ directory of CSV parts) not "
                            f"found; the Taobao layout needs {expected}")


def taobao_spec_dict(paths: dict[str, str], *, max_history: int = 50, embedding_dim: int = 16,
                     valid: float = 0.1, test: float = 0.1, valid_start: int | None = None,
                     test_start: int | None = None, min_count: int = 1,
                     keep_types: tuple[str, ...] = BTAGS, max_fraction: float = 0.001,
                     seed: int = 0) -> dict:
    """The log spec (as a YAML-shaped dict) of the Taobao layout; `paths` maps FILES to paths."""
    ad = {"group": "ad", "from": "ad"}
    features: dict[str, dict] = {
        "adgroup_id": {"group": "ad", "column": "adgroup_id", "min_count": min_count},
        "cate_id": {**ad, "column": "cate_id", "min_count": min_count},
        "campaign_id": {**ad, "column": "campaign_id", "min_count": min_count},
        "customer": {**ad, "column": "customer", "min_count": min_count},
        "brand": {**ad, "column": "brand", "min_count": min_count},
        "price": {**ad, "column": "price", "bins": list(PRICE_BINS)},
        "pid": {"group": "context", "column": "pid", "type": "str"},
    }
    for c in PROFILE_COLUMNS:
        features[c] = {"group": "user", "from": "profile", "column": c}
    features["hist_cate_id"] = {"group": "behavior", "column": "cate", "aligned_with": "cate_id"}
    features["hist_brand"] = {"group": "behavior", "column": "brand", "aligned_with": "brand"}
    split = ({"valid": valid, "test": test} if valid_start is None and test_start is None
             else {"valid_start": valid_start, "test_start": test_start})
    return {
        "name": "taobao",
        "max_history": max_history,
        "embedding_dim": embedding_dim,
        "impressions": {"path": paths["raw_sample"], "format": "csv", "user": "user",
                        "timestamp": "time_stamp",
                        "label": {"column": "clk", "positive": [1], "negative": [0]}},
        "behaviors": {"path": paths["behavior_log"], "format": "csv", "user": "user",
                      "timestamp": "time_stamp",
                      "type": {"column": "btag", "keep": list(keep_types)}},
        "joins": {
            "ad": {"path": paths["ad_feature"], "format": "csv", "key": "adgroup_id",
                   "column": "adgroup_id"},
            "profile": {"path": paths["user_profile"], "format": "csv", "key": "userid",
                        "column": "user"},
        },
        "features": features,
        "split": split,
        "malformed": {"max_fraction": max_fraction, "show": 5},
        "seed": seed,
    }


def taobao_spec(input_dir: str | Path, **options) -> LogSpec:
    """The validated spec for the Taobao files under `input_dir` (options: see
    `taobao_spec_dict`)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: Taobao input directory not found")
    paths = {name: _locate(input_dir, name) for name in FILES}
    return parse_spec(taobao_spec_dict(paths, **options), input_dir, f"taobao preset "
                      f"({input_dir})")


def prepare_taobao(input_dir: str | Path, output_dir: str | Path, *, overwrite: bool = False,
                   address: str | None = None, num_cpus: int | None = None,
                   vocab_from: str | Path | None = None, count_decay: float | None = None,
                   **options) -> LogReport:
    """Prepare the Taobao click log for DIN with the Ray Data pipeline (see
    `din_ray.data.logs.pipeline.prepare_logs`, which also explains `vocab_from` and
    `count_decay`)."""
    return prepare_logs(taobao_spec(input_dir, **options), output_dir, overwrite=overwrite,
                        address=address, num_cpus=num_cpus, vocab_from=vocab_from,
                        count_decay=count_decay)
