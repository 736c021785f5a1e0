"""The Taobao display-ad click log preset on small hand-made files in its exact layout (header
with a trailing space, NULL brands, empty profile cells, the four btag values), prepared through
the CLI on a real local Ray: features joined from ad_feature and user_profile, behaviour
sequences aligned with cate_id/brand and strictly earlier than each impression, and the preset
equal to examples/taobao.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from din_ray.cli import main as cli_main
from din_ray.data.format import PreparedDataset
from din_ray.data.ids import load_encoders
from din_ray.data.logs.spec import load_spec
from din_ray.data.logs.taobao import PRICE_BINS, taobao_spec
from din_ray.schema import OOV_ID, PAD_ID

RAW_SAMPLE = """
user,time_stamp,adgroup_id,pid,nonclk,clk
581738,1494137644,1,430548_1007,1,0
581738,1494137700,2,430539_1007,0,1
449818,1494638778,3,430548_1007,1,0
914836,1494650879,4,430548_1007,1,0
914836,1494651029,5,430548_1007,0,1
914836,1494651100,1,430539_1007,1,0
449818,1494700000,2,430548_1007,1,0
"""
AD_FEATURE = """
adgroup_id,cate_id,campaign_id,customer,brand,price
1,6406,83237,1,95471,170.0
2,6406,27489,1,NULL,199.0
3,1610,44478,3,370,5.9
4,4280,353787,4,95471,53.0
5,1610,44478,3,370,12.5
"""
# The released file's header ends with a space after new_user_class_level.
USER_PROFILE = """
userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,new_user_class_level\x20
234,0,5,2,5,,3,0,3
581738,0,2,2,2,1,3,0,2
449818,3,0,1,0,2,3,0,
"""
BEHAVIOR_LOG = """
user,time_stamp,btag,cate,brand
581738,1494137000,pv,6406,95471
581738,1494137644,cart,1610,370
581738,1494137650,fav,4280,95471
914836,1494650000,pv,1610,370
914836,1494651029,buy,6406,95471
914836,1494700000,pv,4280,95471
449818,1494600000,pv,1610,
"""


def write_taobao(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("raw_sample", RAW_SAMPLE), ("ad_feature", AD_FEATURE),
                       ("user_profile", USER_PROFILE), ("behavior_log", BEHAVIOR_LOG)):
        (root / f"{name}.csv").write_text(text.strip("\n") + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    root = write_taobao(tmp_path_factory.mktemp("taobao") / "raw")
    out = root.parent / "out"
    # Train: before 1494600000; valid: up to 1494651100; test: the rest.
    code = cli_main(["prepare", "taobao", "--input", str(root), "--output", str(out),
                     "--max-history", "3", "--valid-start", "1494600000",
                     "--test-start", "1494651050"])
    return code, PreparedDataset.open(out)


def test_schema_has_profile_context_ad_and_aligned_behaviour_features(prepared):
    code, ds = prepared
    assert code == 0
    s = ds.schema
    assert [f.name for f in s.group("ad")] == ["adgroup_id", "cate_id", "campaign_id",
                                                "customer", "brand", "price"]
    assert [f.name for f in s.group("context")] == ["pid"]
    assert len(s.group("user")) == 8
    assert s.feature("hist_cate_id").table == "cate_id"
    assert s.feature("hist_brand").table == "brand"
    assert s.feature("price").vocab_size == 2 + len(PRICE_BINS) + 1
    assert ds.manifest["rows"] == {"train": 2, "valid": 3, "test": 2}


def test_rows_join_features_and_keep_only_earlier_behaviours(prepared):
    _, ds = prepared
    cate, brand, ad = ds.vocab("cate_id"), ds.vocab("brand"), ds.vocab("adgroup_id")
    train = ds.read_split("train")
    order = sorted(range(2), key=lambda i: int(train["adgroup_id"][i]))
    first, second = order if ad["1"] < ad["2"] else order[::-1]
    # Impression at 1494137644: the cart behaviour at the same second is NOT in its history.
    assert train["hist_cate_id"][first].tolist() == [cate["6406"], PAD_ID, PAD_ID]
    assert train["hist_brand"][first].tolist() == [brand["95471"], PAD_ID, PAD_ID]
    # At 1494137700 all three earlier behaviours, oldest first.
    assert train["hist_cate_id"][second].tolist() == [cate["6406"], cate["1610"], cate["4280"]]
    # Ad 2's brand is NULL in ad_feature: OOV, and its price 199.0 falls in bin [100, 200).
    assert train["brand"][second] == OOV_ID
    assert train["price"][second] == 2 + PRICE_BINS.index(100) + 1
    # Serving bins a request's raw price the same way (no vocabulary file for price).
    price = load_encoders(ds.root, ds.schema)["price"]
    assert price.encode(199.0) == price.encode("199") == train["price"][second]
    # The profile of user 581738 joined: final_gender_code 2 and age_level 2 are known ids.
    assert train["age_level"][first] != OOV_ID and train["final_gender_code"][first] != OOV_ID

    test = ds.read_split("test")
    users = test["user"].tolist()
    # User 914836 at 1494651100: the pv at 1494650000 and the buy at 1494651029; never the pv
    # at 1494700000 (future).
    i = users.index(914836)
    assert test["hist_cate_id"][i].tolist() == [cate["1610"], cate["6406"], PAD_ID]
    # User 914836 has no profile row: every profile feature is OOV.
    assert test["cms_segid"][i] == OOV_ID and test["occupation"][i] == OOV_ID
    # User 449818 at 1494700000: one behaviour with an empty brand -> OOV, not PAD.
    j = users.index(449818)
    assert test["hist_cate_id"][j].tolist() == [cate["1610"], PAD_ID, PAD_ID]
    assert test["hist_brand"][j].tolist() == [OOV_ID, PAD_ID, PAD_ID]
    report = ds.manifest["params"]["report"]
    profile = next(f for f in report["files"] if f["path"].endswith("user_profile.csv"))
    assert profile["missing"] == {"pvalue_level": 1, "new_user_class_level": 1}
    raw = next(f for f in report["files"] if f["path"].endswith("raw_sample.csv"))
    assert raw["join_misses"] == {"profile": 3} and raw["malformed"] == 0


def test_preset_equals_the_example_yaml(tmp_path):
    root = write_taobao(tmp_path / "data" / "taobao")
    example = Path(__file__).parents[2] / "examples" / "taobao.yaml"
    shutil.copy(example, tmp_path / "examples.yaml")
    (tmp_path / "ex").mkdir()
    shutil.copy(example, tmp_path / "ex" / "taobao.yaml")
    from_yaml = load_spec(tmp_path / "ex" / "taobao.yaml")  # paths ../data/taobao/*.csv
    preset = taobao_spec(root)
    assert from_yaml.features == preset.features
    assert from_yaml.joins[0].key == preset.joins[0].key == "adgroup_id"
    assert (Path(from_yaml.impressions.source.paths[0]).resolve()
            == Path(preset.impressions.source.paths[0]).resolve())


def test_missing_taobao_file_is_named(tmp_path):
    root = write_taobao(tmp_path / "raw")
    (root / "ad_feature.csv").unlink()
    with pytest.raises(FileNotFoundError, match="ad_feature.csv"):
        taobao_spec(root)
