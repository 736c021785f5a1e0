"""Synthetic raw logs in the generic impression + behaviour layout, for tests and benchmarks.

    python -c "from din_ray.data.logs.synthetic import write_synthetic_logs as w; w('raw', 10**6)"
    din-ray prepare log --spec raw/log_spec.yaml --output out/logs

    din-ray synthetic-days --output raw --days 5 --drift 0.2 --impressions 20000
    # raw/day-01 ... raw/day-05, each a directory as below (see `write_synthetic_days`)

Writes, under DIR:

    impressions/part-*.parquet   user, time_stamp, adgroup_id, pid, clk
    behaviors/part-*.parquet     user, time_stamp, btag, cate, brand
    ad_feature.parquet           adgroup_id, cate_id, brand, price
    user_profile.parquet         userid, age_level, gender, shopping_level
    log_spec.yaml                the spec that prepares them (`din_ray.data.logs.spec`)

The world follows DIN's premises (paper §3): every user has 2-5 interest categories, 90 % of their
behaviours fall in them (btag pv/cart/fav/buy), and a candidate ad is clicked with probability
sigmoid(CLICK_BIAS + CLICK_STRENGTH * [its category is one of the user's interests] + item
effect), half of the candidates coming from the interests. Events of a user are spread uniformly
over `days` days. Users are generated in chunks of `chunk_users`, each chunk from its own seeded
generator and written as its own files, so memory does not grow with the log size and the same
arguments give the same files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

log = logging.getLogger(__name__)

CLICK_BIAS = -2.5
CLICK_STRENGTH = 2.0
ITEM_EFFECT_STD = 0.5
HISTORY_NOISE = 0.1
BTAGS = ("pv", "cart", "fav", "buy")
BTAG_P = (0.9, 0.04, 0.03, 0.03)
PIDS = ("430548_1007", "430539_1007")
DAY = 86_400


@dataclass(frozen=True)
class SyntheticLogConfig:
    """Sizes of the synthetic world (None: derived from `impressions`)."""

    impressions: int
    behaviors_per_impression: float = 2.0
    users: int | None = None
    items: int | None = None
    categories: int | None = None
    brands: int | None = None
    days: int = 8
    start: int = 1_494_000_000
    seed: int = 0
    chunk_users: int = 50_000

    def __post_init__(self) -> None:
        if self.impressions <= 0:
            raise ValueError(f"impressions must be > 0, got {self.impressions}")
        if self.behaviors_per_impression < 0:
            raise ValueError(f"behaviors_per_impression must be >= 0, got "
                             f"{self.behaviors_per_impression}")
        for name in ("users", "items", "categories", "brands"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if self.days <= 0 or self.chunk_users <= 0:
            raise ValueError(f"days and chunk_users must be > 0, got {self.days}, "
                             f"{self.chunk_users}")

    def resolved(self) -> SyntheticLogConfig:
        users = self.users or max(10, self.impressions // 20)
        items = self.items or max(1000, min(self.impressions // 40, 2_000_000))
        cates = self.categories or max(20, min(items // 100, 10_000))
        brands = self.brands or max(cates, min(items // 10, 200_000))
        return SyntheticLogConfig(**{**asdict(self), "users": users, "items": items,
                                     "categories": cates, "brands": brands})


def spec_dict(max_history: int = 50) -> dict:
    """The log spec of the generated layout (paths relative to the data directory)."""
    return {
        "name": "synthetic-logs",
        "max_history": max_history,
        "impressions": {"path": "impressions", "user": "user", "timestamp": "time_stamp",
                        "label": {"column": "clk", "positive": [1], "negative": [0]}},
        "behaviors": {"path": "behaviors", "user": "user", "timestamp": "time_stamp",
                      "type": {"column": "btag", "keep": list(BTAGS)}},
        "joins": {
            "ad": {"path": "ad_feature.parquet", "key": "adgroup_id", "column": "adgroup_id"},
            "profile": {"path": "user_profile.parquet", "key": "userid", "column": "user"},
        },
        "features": {
            "adgroup_id": {"group": "ad", "column": "adgroup_id", "min_count": 2},
            "cate_id": {"group": "ad", "from": "ad", "column": "cate_id"},
            "brand": {"group": "ad", "from": "ad", "column": "brand", "min_count": 2},
            "price": {"group": "ad", "from": "ad", "column": "price",
                      "bins": [5, 10, 20, 50, 100, 200, 500, 1000]},
            "pid": {"group": "context", "column": "pid", "type": "str"},
            "age_level": {"group": "user", "from": "profile", "column": "age_level"},
            "gender": {"group": "user", "from": "profile", "column": "gender"},
            "shopping_level": {"group": "user", "from": "profile", "column": "shopping_level"},
            "hist_cate_id": {"group": "behavior", "column": "cate", "aligned_with": "cate_id"},
            "hist_brand": {"group": "behavior", "column": "brand", "aligned_with": "brand"},
        },
        "split": {"valid": 0.1, "test": 0.1},
        "malformed": {"max_fraction": 0.001, "show": 5},
    }


def write_synthetic_logs(output_dir: str | Path, impressions: int, *, max_history: int = 50,
                         **kwargs) -> Path:
    """Generate the raw logs (see the module docstring) and their `log_spec.yaml`.

    Args:
        output_dir: directory to create (must not exist).
        impressions: impression rows; behaviours are about `behaviors_per_impression` times more.
        max_history: written into the spec.
        **kwargs: other SyntheticLogConfig fields.
    Returns:
        The path of the written spec.
    """
    cfg = SyntheticLogConfig(impressions, **kwargs).resolved()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=False)
    (out / "impressions").mkdir()
    (out / "behaviors").mkdir()
    world = _World.build(cfg)
    world.write_tables(out)
    rng = np.random.default_rng([cfg.seed, 1])
    # Impressions and behaviours per user: multinomial, so the totals are exact.
    per_user = rng.multinomial(cfg.impressions, np.full(cfg.users, 1.0 / cfg.users))
    n_beh = round(cfg.impressions * cfg.behaviors_per_impression)
    beh_per_user = rng.multinomial(n_beh, np.full(cfg.users, 1.0 / cfg.users))
    chunks = math.ceil(cfg.users / cfg.chunk_users)
    for c in range(chunks):
        u0, u1 = c * cfg.chunk_users, min((c + 1) * cfg.chunk_users, cfg.users)
        world.write_chunk(out, c, np.random.default_rng([cfg.seed, 2, c]), u0,
                          per_user[u0:u1], beh_per_user[u0:u1])
    spec = out / "log_spec.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(max_history), sort_keys=False))
    log.info("wrote %d impressions, %d behaviours of %d users to %s", cfg.impressions, n_beh,
             cfg.users, out)
    return spec


@dataclass
class _World:
    cfg: SyntheticLogConfig
    item_cate: np.ndarray  # (I,)
    item_brand: np.ndarray  # (I,)
    item_effect: np.ndarray  # (I,)
    cate_items: np.ndarray  # (I,) items grouped by category
    cate_start: np.ndarray  # (C,)
    cate_size: np.ndarray  # (C,)

    @classmethod
    def build(cls, cfg: SyntheticLogConfig, cyclic: bool = False) -> _World:
        """`cyclic`: item i is in category i % categories (instead of a random permutation),
        so any `categories` consecutive items cover every category."""
        rng = np.random.default_rng([cfg.seed, 0])
        item_cate = rng.permutation(np.arange(cfg.items) % cfg.categories)
        if cyclic:
            item_cate = np.arange(cfg.items) % cfg.categories
        # Brands belong to one category; an item's brand is one of its category's brands.
        brand_cate = np.arange(cfg.brands) % cfg.categories
        brands_of = np.argsort(brand_cate, kind="stable")
        b_start = np.searchsorted(brand_cate[brands_of], np.arange(cfg.categories))
        b_size = np.bincount(brand_cate, minlength=cfg.categories)
        pick = (rng.random(cfg.items) * b_size[item_cate]).astype(np.int64)
        item_brand = brands_of[b_start[item_cate] + pick]
        cate_items = np.argsort(item_cate, kind="stable")
        cate_start = np.searchsorted(item_cate[cate_items], np.arange(cfg.categories))
        return cls(cfg, item_cate, item_brand, rng.normal(0, ITEM_EFFECT_STD, cfg.items),
                   cate_items, cate_start, np.bincount(item_cate, minlength=cfg.categories))

    def write_tables(self, out: Path) -> None:
        rng = np.random.default_rng([self.cfg.seed, 3])
        n = self.cfg.items
        pq.write_table(pa.table({
            "adgroup_id": np.arange(n, dtype=np.int64) + 1,
            "cate_id": self.item_cate.astype(np.int64) + 1,
            "brand": self.item_brand.astype(np.int64) + 1,
            "price": np.round(np.exp(rng.normal(3.5, 1.2, n)), 2),
        }), out / "ad_feature.parquet")
        u = self.cfg.users
        pq.write_table(pa.table({
            "userid": np.arange(u, dtype=np.int64) + 1,
            "age_level": rng.integers(0, 7, u), "gender": rng.integers(1, 3, u),
            "shopping_level": rng.integers(1, 4, u),
        }), out / "user_profile.parquet")

    def _items_in(self, rng: np.random.Generator, cates: np.ndarray) -> np.ndarray:
        pick = (rng.random(len(cates)) * self.cate_size[cates]).astype(np.int64)
        return self.cate_items[self.cate_start[cates] + pick]

    def active(self, items: np.ndarray) -> _World:
        """The same world with candidates and behaviours drawn from `items` only (every
        category must keep at least one)."""
        keep = np.zeros(self.cfg.items, bool)
        keep[items] = True
        cate_items = self.cate_items[keep[self.cate_items]]
        size = np.bincount(self.item_cate[cate_items], minlength=self.cfg.categories)
        if (size == 0).any():
            raise ValueError(f"{int((size == 0).sum())} categories have no active item")
        start = np.searchsorted(self.item_cate[cate_items], np.arange(self.cfg.categories))
        return _World(self.cfg, self.item_cate, self.item_brand, self.item_effect, cate_items,
                      start, size)

    def write_chunk(self, out: Path, index: int, rng: np.random.Generator, u0: int,
                    n_imp: np.ndarray, n_beh: np.ndarray,
                    user_rng: np.random.Generator | None = None) -> None:
        """Behaviours and impressions of users u0.. (`user_rng`, default `rng`, draws their
        interests: the same generator gives the same users on another day)."""
        cfg = self.cfg
        n_users = len(n_imp)
        user_rng = user_rng or rng
        k = user_rng.integers(2, 6, n_users)  # interests per user
        interests = user_rng.integers(0, cfg.categories, (n_users, 5))  # first k used
        span = cfg.days * DAY

        # Behaviours.
        bu = np.repeat(np.arange(n_users), n_beh)
        slot = (rng.random(len(bu)) * k[bu]).astype(np.int64)
        cate = np.where(rng.random(len(bu)) < HISTORY_NOISE,
                        rng.integers(0, cfg.categories, len(bu)), interests[bu, slot])
        item = self._items_in(rng, cate)
        bts = cfg.start + rng.integers(0, span, len(bu))
        order = np.argsort(bts, kind="stable")  # logs are written in time order
        pq.write_table(pa.table({
            "user": (bu + u0 + 1)[order],
            "time_stamp": bts[order],
            "btag": pa.array(np.array(BTAGS)[rng.choice(4, len(bu), p=BTAG_P)][order]),
            "cate": (cate + 1)[order],
            "brand": (self.item_brand[item] + 1)[order],
        }), out / "behaviors" / f"part-{index:05d}.parquet", row_group_size=262_144)

        # Impressions.
        iu = np.repeat(np.arange(n_users), n_imp)
        from_interest = rng.random(len(iu)) < 0.5
        slot = (rng.random(len(iu)) * k[iu]).astype(np.int64)
        cate = np.where(from_interest, interests[iu, slot],
                        rng.integers(0, cfg.categories, len(iu)))
        item = self._items_in(rng, cate)
        hit = (interests[iu] == cate[:, None]) & (np.arange(5) < k[iu][:, None])
        logit = CLICK_BIAS + CLICK_STRENGTH * hit.any(1) + self.item_effect[item]
        clk = (rng.random(len(iu)) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        its = cfg.start + rng.integers(0, span, len(iu))
        order = np.argsort(its, kind="stable")
        pq.write_table(pa.table({
            "user": (iu + u0 + 1)[order],
            "time_stamp": its[order],
            "adgroup_id": (item + 1)[order],
            "pid": pa.array(np.array(PIDS)[rng.integers(0, 2, len(iu))][order]),
            "clk": clk[order],
        }), out / "impressions" / f"part-{index:05d}.parquet", row_group_size=262_144)


def write_synthetic_days(output_dir: str | Path, days: int, impressions_per_day: int, *,
                         drift: float = 0.2, items: int = 1000, categories: int = 20,
                         max_history: int = 50, seed: int = 0, **kwargs) -> list[Path]:
    """`days` consecutive daily logs of one world whose ads drift: OUT/day-01 ... each a
    directory as `write_synthetic_logs` writes (with its own log_spec.yaml).

    The users and their interests stay the same every day. Day d (0-based) shows the ads
    [d * shift, d * shift + items) with shift = round(drift * items): each day a `drift` share
    of yesterday's ads retires and as many new ads appear (ad ids are global, so an ad keeps its
    raw id on every day it runs). Categories cycle over the ad ids, so every day has ads of
    every category. Day d's events fall on day d (timestamps start + d * 86400 ...).

    Args:
        output_dir: directory to create (must not exist).
        days: number of daily logs (>= 1).
        impressions_per_day: impression rows per day.
        drift: share of the ads replaced each day, in [0, 1].
        items: ads running on any one day (>= categories).
        **kwargs: other SyntheticLogConfig fields (users, brands, behaviors_per_impression, ...).
    Returns:
        The log_spec.yaml path of each day, in order.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if not 0 <= drift <= 1:
        raise ValueError(f"drift must be in [0, 1], got {drift}")
    if items < categories:
        raise ValueError(f"items ({items}) must be >= categories ({categories}) so that every "
                         "day has an ad of every category")
    shift = round(drift * items)
    universe = items + shift * (days - 1)
    start = kwargs.pop("start", SyntheticLogConfig.start)
    cfg = SyntheticLogConfig(impressions_per_day, items=universe, categories=categories,
                             seed=seed, days=1, start=start, **kwargs).resolved()
    world = _World.build(cfg, cyclic=True)  # each day's window of ads covers every category
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=False)
    specs = []
    for d in range(days):
        day_cfg = SyntheticLogConfig(**{**asdict(cfg), "start": start + d * DAY})
        day = _World(day_cfg, *(getattr(world, f) for f in
                                ("item_cate", "item_brand", "item_effect", "cate_items",
                                 "cate_start", "cate_size")))
        day = day.active(np.arange(d * shift, d * shift + items))
        root = out / f"day-{d + 1:02d}"
        (root / "impressions").mkdir(parents=True)
        (root / "behaviors").mkdir()
        day.write_tables(root)
        rng = np.random.default_rng([seed, 1, d])
        per_user = rng.multinomial(impressions_per_day, np.full(cfg.users, 1.0 / cfg.users))
        n_beh = round(impressions_per_day * cfg.behaviors_per_impression)
        beh_per_user = rng.multinomial(n_beh, np.full(cfg.users, 1.0 / cfg.users))
        for c in range(math.ceil(cfg.users / cfg.chunk_users)):
            u0, u1 = c * cfg.chunk_users, min((c + 1) * cfg.chunk_users, cfg.users)
            day.write_chunk(root, c, np.random.default_rng([seed, 2, c, d]), u0,
                            per_user[u0:u1], beh_per_user[u0:u1],
                            user_rng=np.random.default_rng([seed, 2, c]))
        spec = root / "log_spec.yaml"
        spec.write_text(yaml.safe_dump(spec_dict(max_history), sort_keys=False))
        specs.append(spec)
    log.info("wrote %d days of %d impressions (%d ads a day, %d replaced daily) to %s", days,
             impressions_per_day, items, shift, out)
    return specs
