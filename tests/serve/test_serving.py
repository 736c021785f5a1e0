"""Serving core without Ray: request validation, raw-id mapping, scores equal offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from serve_helpers import (
    BAD_REQUESTS,
    GOOD_CANDIDATE,
    fuzz_strategies,
    offline_scores,
    payloads,
    train_tiny,
)

from din_ray.checkpoint import ID_FILTER, CheckpointError
from din_ray.data.format import PreparedDataset
from din_ray.data.ids import BinnedIds, HashedIds, RawIdError, Vocabulary
from din_ray.embeddings.regularization import IdFilter
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import ModelConfig, build_model, model_names
from din_ray.model.layers import Dice
from din_ray.schema import OOV_ID, Feature, Schema
from din_ray.serve.request import ParsedRequest, RequestError, RequestLimits, RequestParser
from din_ray.serve.scoring import Scorer, ServedModel, load_vocabularies, resolve_checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    return {"root": root, "din": train_tiny(root, "din"), "base": train_tiny(root, "base")}


@pytest.fixture(scope="module")
def din(runs):
    return ServedModel.load(runs["din"], RequestLimits(max_candidates=8, max_body_bytes=4000))


def _score(served: ServedModel, payload: dict) -> dict:
    parsed = served.parser.parse_body(json.dumps(payload).encode())
    return served.response(parsed, served.scorer.score([parsed])[0])


def test_vocabulary_maps_raw_ids_as_strings_and_unseen_to_oov():
    v = Vocabulary("item_id", 10, {"296": 5, "Comedy": 7})
    assert v.encode(296) == v.encode("296") == 5
    assert v.encode("Comedy") == 7
    assert v.encode("never-seen") == v.encode(1234) == OOV_ID
    for bad in (True, 2.5, None, [1], {"a": 1}):
        with pytest.raises(RawIdError, match="expected a string or integer id"):
            v.encode(bad)
    dense = Vocabulary("cate_id", 6, None)  # no vocabulary file: dense ids pass through
    assert [dense.encode(i) for i in (0, 1, 2, 5, 6, -3)] == [1, 1, 2, 5, 1, 1]
    with pytest.raises(RawIdError, match="dense integer id"):
        dense.encode("3")


def test_resolve_checkpoint_accepts_checkpoint_train_and_tune_dirs(runs, tmp_path):
    ckpt = runs["din"] / "checkpoint"
    assert resolve_checkpoint(ckpt) == ckpt
    assert resolve_checkpoint(runs["din"]) == ckpt
    tune = tmp_path / "tune"
    tune.mkdir()
    (tune / "best.json").write_text(json.dumps({"checkpoint": str(ckpt), "gauc": 0.6}))
    assert resolve_checkpoint(tune) == ckpt
    (tune / "best.json").write_text(json.dumps({"checkpoint": "trial/checkpoint"}))
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tune)  # best.json names a missing directory
    (tune / "best.json").write_text("[]")
    with pytest.raises(CheckpointError, match="best.json"):
        resolve_checkpoint(tune)
    with pytest.raises(CheckpointError):
        resolve_checkpoint(tmp_path)


def test_scores_equal_offline_predictions(runs, din):
    for payload in payloads(runs["root"] / "data", 5):
        served = _score(din, payload)
        offline, _ = offline_scores(runs["din"] / "checkpoint", payload)
        assert len(served["scores"]) == len(payload["candidates"])
        np.testing.assert_allclose(served["scores"], offline, atol=1e-5, rtol=0)
        assert served["model"]["name"] == "din" and len(served["model"]["version"]) == 12
        assert "explain" not in served


def test_a_filter_trained_model_serves_the_ids_it_was_trained_on(runs):
    # reg="filter" maps all but the most frequent ids to OOV in training and evaluation; the
    # checkpoint carries that remapping and serving applies it after the vocabulary.
    out = train_tiny(runs["root"], "din", name="din-filter", reg="filter", filter_top_k=4)
    assert (out / "checkpoint" / ID_FILTER).exists()
    served = ServedModel.load(out, RequestLimits(max_candidates=8, max_body_bytes=4000))
    data = PreparedDataset.open(runs["root"] / "data")
    id_filter = IdFilter(data.schema, data.counts(), 4)
    filtered = 0
    for payload in payloads(runs["root"] / "data", 5):
        parsed = served.parser.parse(payload)
        filtered += int((parsed.candidates["item_id"] == OOV_ID).sum())
        offline, _ = offline_scores(out / "checkpoint", payload, id_filter)
        got = served.response(parsed, served.scorer.score([parsed])[0])["scores"]
        np.testing.assert_allclose(got, offline, atol=1e-5, rtol=0)
    assert filtered > 0  # the requests do hold ids the filter dropped
    assert served.info()["vocabularies"]["item_id"]["filter_kept_ids"] == 4


def test_candidate_order_is_kept(runs, din):
    payload = payloads(runs["root"] / "data", 1, candidates=7, seed=3)[0]
    forward = _score(din, payload)["scores"]
    payload["candidates"] = payload["candidates"][::-1]
    assert _score(din, payload)["scores"] == pytest.approx(forward[::-1], abs=1e-6)


def test_explain_gives_attention_weights_of_kept_history(runs, din):
    payload = payloads(runs["root"] / "data", 8, seed=1)
    payload = max(payload, key=lambda p: len(p["history"]["item_id"]))  # a non-empty history
    payload["explain"] = True
    out = _score(din, payload)
    _, weights = offline_scores(runs["din"] / "checkpoint", payload)
    n = len(payload["history"]["item_id"])
    assert out["explain"]["history_used"] == n > 0
    assert np.asarray(out["explain"]["weights"]).shape == (len(payload["candidates"]), n)
    np.testing.assert_allclose(out["explain"]["weights"], weights, atol=1e-5)


def test_long_history_keeps_the_most_recent(runs, din):
    L = din.parser.max_len
    payload = payloads(runs["root"] / "data", 1)[0]
    payload["history"] = {"item_id": [f"i{k}" for k in range(2, 2 + L + 3)],
                          "cate_id": [2 + k % 4 for k in range(L + 3)], }
    payload["explain"] = True
    long = _score(din, payload)
    recent = {"item_id": payload["history"]["item_id"][-L:],
              "cate_id": payload["history"]["cate_id"][-L:]}
    short = _score(din, {**payload, "history": recent})
    assert long["scores"] == short["scores"]
    assert long["explain"]["history_dropped"] == 3 and long["explain"]["history_used"] == L
    oldest = {"item_id": payload["history"]["item_id"][:L],
              "cate_id": payload["history"]["cate_id"][:L]}
    assert _score(din, {**payload, "history": oldest})["scores"] != long["scores"]


def test_a_batch_of_requests_scores_like_each_alone(runs, din):
    reqs = [din.parser.parse(p) for p in payloads(runs["root"] / "data", 4, seed=5)]
    reqs.append(din.parser.parse({"candidates": [{"item_id": "i4", "cate_id": 3}]}))  # no history
    together = din.scorer.score(reqs)
    for r, t in zip(reqs, together):
        assert t.ctr == pytest.approx(din.scorer.score([r])[0].ctr, abs=1e-6)


def test_base_model_explain_is_null_with_a_note(runs):
    base = ServedModel.load(runs["base"])
    payload = {**payloads(runs["root"] / "data", 1)[0], "explain": True}
    out = _score(base, payload)
    assert out["explain"] is None and "no per-behaviour activation weights" in out["explain_note"]
    offline, weights = offline_scores(runs["base"] / "checkpoint", payload)
    assert weights is None
    np.testing.assert_allclose(out["scores"], offline, atol=1e-5, rtol=0)


def test_user_and_context_features_are_shared_by_candidates():
    schema = Schema((
        Feature("age", "user", "age", 7, 4),
        Feature("item_id", "ad", "item_id", 20, 4),
        Feature("hist_item_id", "behavior", "item_id", 20, 4, 4, "item_id"),
        Feature("hour", "context", "hour", 26, 4),
    ))
    model = build_model(schema, ModelConfig(attention_hidden=(8,), mlp_hidden=(8,))).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    tables = EmbeddingTables(model.table_specs(), init_std=0.5).eval()
    vocabs = {"age": Vocabulary("age", 7, {"30-39": 3}), "item_id": Vocabulary("item_id", 20, None),
              "hour": Vocabulary("hour", 26, None)}
    parser = RequestParser(schema, vocabs)
    req = parser.parse({"user": {"age": "30-39"}, "context": {"hour": 13},
                        "history": {"item_id": [5, 6, 7, 8, 9]},
                        "candidates": [{"item_id": i} for i in (3, 4, 19, 25)]})
    assert req.user == {"age": 3, "hour": 13} and req.history_dropped == 1
    got = Scorer(model, tables, schema).score([req])[0].ctr
    full = {"age": torch.full((4,), 3), "hour": torch.full((4,), 13),
            "hist_item_id": torch.tensor([[6, 7, 8, 9]] * 4),
            "item_id": torch.tensor([3, 4, 19, OOV_ID])}
    with torch.no_grad():
        want = torch.sigmoid(model(tables.lookup(model.sparse_inputs(full)), full)).tolist()
    np.testing.assert_allclose(got, want, atol=1e-6)
    for payload, field in (({"context": {"hour": 1}, "candidates": [{"item_id": 3}]}, "user"),
                           ({"user": {}, "context": {"hour": 1},
                             "candidates": [{"item_id": 3}]}, "user.age"),
                           ({"user": {"age": 1}, "candidates": [{"item_id": 3}]}, "context"),
                           ({"user": {"age": 1}, "context": {"hour": 1, "day": 2},
                             "candidates": [{"item_id": 3}]}, "context.day")):
        with pytest.raises(RequestError) as e:
            parser.parse(payload)
        assert e.value.field == field


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("attention", ["prelu", "dice"])
@pytest.mark.parametrize("users", [1, 2])  # one request (one history), a batch of two
def test_served_scores_equal_forward_for_every_model(name, attention, users):
    """Whatever path the Scorer takes (the user side once per user with the fused one-history
    attention, or the repeated batch), a served model scores what its own `forward` in
    evaluation mode scores on the repeated batch, for one request and for a batch of them."""
    torch.manual_seed(0)
    dim, L = 4, 5
    schema = Schema((
        Feature("age", "user", "age", 7, dim),
        Feature("item_id", "ad", "item_id", 30, dim),
        Feature("cate_id", "ad", "cate_id", 8, dim),
        Feature("hist_item_id", "behavior", "item_id", 30, dim, L, "item_id"),
        Feature("hist_cate_id", "behavior", "cate_id", 8, dim, L, "cate_id"),
        Feature("hour", "context", "hour", 26, dim),
    ))
    model = build_model(schema, ModelConfig(model=name, attention_hidden=(8, 4),
                                            mlp_hidden=(8, 4),
                                            attention_activation=attention)).eval()
    for p in model.parameters():  # trained-looking weights: the zero logit layer included
        torch.nn.init.normal_(p, std=0.5)
    for m in model.modules():
        if isinstance(m, Dice):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    tables = EmbeddingTables(model.table_specs(), init_std=0.5).eval()
    hist_item = np.array([[5, 6, 7, 0, 0], [9, 3, 4, 12, 8]])  # 3 and 5 behaviours
    hist_cate = np.array([[2, 3, 3, 0, 0], [4, 2, 5, 6, 7]])
    requests = [ParsedRequest({"age": 3 + u, "hour": 10 + u},
                              {"hist_item_id": hist_item[u], "hist_cate_id": hist_cate[u]},
                              int((hist_item[u] > 0).sum()), 0,
                              {"item_id": np.array([11, 5, 20]) + u,
                               "cate_id": np.array([3, 2, 6]) + u}, False)
                 for u in range(users)]
    got, _ = Scorer(model, tables, schema).logits(requests)

    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    repeated = {"age": torch.tensor([3, 4])[owner], "hour": torch.tensor([10, 11])[owner],
                "hist_item_id": torch.from_numpy(hist_item)[owner],
                "hist_cate_id": torch.from_numpy(hist_cate)[owner],
                "item_id": torch.tensor([11, 5, 20, 12, 6, 21]),
                "cate_id": torch.tensor([3, 2, 6, 4, 3, 7])}
    repeated = {k: v[:3 * users] for k, v in repeated.items()}
    # With autograd on, `forward` takes the plain path throughout (the evaluation fast paths of
    # the attention unit and the MLP run only without it), and the histories keep their padding.
    want = model(tables.lookup(model.sparse_inputs(repeated)), repeated).detach()
    assert got.shape == (3 * users,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("body,status,field", BAD_REQUESTS)
def test_bad_requests_name_the_field(din, body, status, field):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(RequestError) as e:
        din.parser.parse_body(raw)
    assert (e.value.status, e.value.field) == (status, field), e.value
    assert e.value.to_dict()["error"]["field"] == field


def test_hint_for_behaviour_names_in_history(din):
    with pytest.raises(RequestError, match="keyed by the ad feature: 'item_id'"):
        din.parser.parse({"candidates": [GOOD_CANDIDATE],
                          "history": {"hist_item_id": [], "cate_id": []}})


def test_vocabularies_are_loaded_from_the_checkpoint(runs, din):
    vocabs = load_vocabularies(din.path, din.checkpoint.schema)
    assert vocabs["item_id"].mapping["i7"] == 7 and vocabs["cate_id"].mapping is None
    info = din.info()
    assert info["vocab_sizes"] == {"item_id": 30, "cate_id": 6}
    assert info["request"]["history"] == ["item_id", "cate_id"]
    assert info["model"]["checkpoint"] == str(din.path) and "valid_gauc" in info["metrics"]


def _every_encoder_parser() -> RequestParser:
    """A parser whose tables use every raw-id encoder: a vocabulary, dense ids, hashed strings,
    hashed integers and numeric bins, with user, context, ad and behaviour features."""
    schema = Schema((
        Feature("city", "user", "city", 12, 4),
        Feature("age", "user", "age", 7, 4),
        Feature("hour", "context", "hour", 9, 4),
        Feature("item_id", "ad", "item_id", 30, 4),
        Feature("cate_id", "ad", "cate_id", 6, 4),
        Feature("hist_item_id", "behavior", "item_id", 30, 4, 5, "item_id"),
        Feature("hist_cate_id", "behavior", "cate_id", 6, 4, 5, "cate_id"),
    ))
    vocabs = {"item_id": Vocabulary("item_id", 30, {f"i{k}": k for k in range(2, 30)}),
              "cate_id": Vocabulary("cate_id", 6, None),
              "city": HashedIds("city", 12, 10, "str"), "hour": HashedIds("hour", 9, 7, "int"),
              "age": BinnedIds("age", 7, [18.0, 30.0, 45.0, 60.0])}
    return RequestParser(schema, vocabs, RequestLimits(max_candidates=50,
                                                       max_body_bytes=4 << 20))


FUZZ_VALID = [
    {"user": {"city": "Paris", "age": 33}, "context": {"hour": 13},
     "history": {"item_id": ["i3", "i4", 7], "cate_id": [2, 3, 4]},
     "candidates": [{"item_id": "i5", "cate_id": 2}, {"item_id": 9, "cate_id": 5}],
     "explain": True},
    {"user": {"city": 17, "age": "70"}, "context": {"hour": "8"},
     "candidates": [{"item_id": "new", "cate_id": 99}]},
]


def test_fuzzed_bodies_parse_or_get_a_4xx_naming_the_field():
    """Every body (valid ones mutated at every position and type, raw byte edits, pathological
    JSON) either parses into in-range dense ids or raises a 4xx `RequestError` whose JSON
    renders the way the Serve app sends it (UTF-8, no NaN)."""
    hypothesis = pytest.importorskip("hypothesis")
    bodies, pathological = fuzz_strategies()
    parser = _every_encoder_parser()
    for p in FUZZ_VALID:
        parser.parse(p)  # the seeds themselves are valid
    tried = []

    def check(body: bytes) -> None:
        tried.append(body)
        try:
            req = parser.parse_body(body)
        except RequestError as e:
            assert 400 <= e.status < 500, e
            rendered = json.dumps(e.to_dict(), ensure_ascii=False, allow_nan=False)
            assert json.loads(rendered.encode("utf-8"))["error"]["field"]
            return
        rows = {f.name: f.vocab_size for f in parser.schema.features}
        ids = {**req.user, **req.history, **req.candidates}
        for name, value in ids.items():
            value = np.asarray(value)
            assert ((0 <= value) & (value < rows[name])).all(), (name, value)
        assert 1 <= req.num_candidates <= parser.limits.max_candidates

    for body in pathological(FUZZ_VALID):
        check(body)
    hypothesis.settings(max_examples=1000, deadline=None, database=None, derandomize=True)(
        hypothesis.given(bodies(FUZZ_VALID))(check))()
    print(f"fuzzed the parser with {len(tried)} bodies")
    assert len(tried) > 1000
