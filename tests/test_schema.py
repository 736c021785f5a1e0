"""Schema validation and (de)serialisation."""

import json

import pytest
from builders import tiny_schema

from din_ray.schema import Feature, Schema, SchemaError


def test_round_trip(tmp_path):
    s = tiny_schema()
    s.save(tmp_path / "schema.json")
    assert Schema.load(tmp_path) == s
    assert s.tables == {"item_id": (30, 4), "cate_id": (6, 4)}
    assert s.max_history == 5
    assert s.with_embedding_dim(8).tables["item_id"] == (30, 8)


@pytest.mark.parametrize("change, message", [
    ({"group": "profile"}, "group must be one of"),
    ({"vocab_size": 2}, "vocab_size must be > 2"),
    ({"embedding_dim": 0}, "embedding_dim must be > 0"),
    ({"max_len": None}, "max_len > 0"),
    ({"aligned_with": "nope"}, "not an ad feature"),
    ({"table": "other"}, "must share table"),
])
def test_invalid_features_are_rejected_with_the_feature_named(tmp_path, change, message):
    raw = tiny_schema().to_dict()
    raw["features"][2].update(change)
    (tmp_path / "schema.json").write_text(json.dumps(raw))
    with pytest.raises(SchemaError, match=message) as err:
        Schema.load(tmp_path)
    assert "hist_item_id" in str(err.value) or "aligned_with" in str(err.value)


def test_structural_errors(tmp_path):
    with pytest.raises(SchemaError, match="duplicate"):
        Schema((Feature("a", "ad", "a", 5, 2), Feature("a", "ad", "a", 5, 2)))
    with pytest.raises(SchemaError, match="shares table"):
        Schema((Feature("a", "ad", "t", 5, 2), Feature("b", "ad", "t", 6, 2)))
    (tmp_path / "schema.json").write_text("{not json")
    with pytest.raises(SchemaError, match="invalid JSON at line 1"):
        Schema.load(tmp_path)
    with pytest.raises(SchemaError, match="unknown keys"):
        Schema.from_dict({**tiny_schema().to_dict(), "bogus": 1})
    with pytest.raises(SchemaError, match="not found"):
        Schema.load(tmp_path / "missing.json")
