"""Shared pieces of the serving tests: a tiny trained checkpoint, request payloads built from
real test rows, and offline scores computed the way `din-ray evaluate` does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from builders import write_tiny_dataset

from din_ray.checkpoint import load_model
from din_ray.data.format import PreparedDataset
from din_ray.schema import OOV_ID, PAD_ID
from din_ray.train.loop import TrainConfig, forward, run_local


def train_tiny(root: Path, model: str = "din", name: str | None = None, **overrides) -> Path:
    """Train `model` for one epoch on a tiny dataset (TrainConfig `overrides` on top); returns
    the train output directory ROOT/<name or model>."""
    data = root / "data"
    if not data.exists():
        write_tiny_dataset(data, rows=600, seed=0)
    out = root / (name or model)
    run_local(TrainConfig(**{**dict(data=str(data), output=str(out), model=model, epochs=1,
                                    batch_size=64, embedding_dim=8, attention_hidden=(16, 8),
                                    mlp_hidden=(16, 8), threads=1, seed=1), **overrides}))
    return out


def raw_items(data: Path) -> dict[int, str]:
    """Dense item id -> raw id string (the tiny data's item vocabulary is i<k>)."""
    t = pq.read_table(data / "vocab" / "item_id.parquet")
    return dict(zip(t.column("id").to_pylist(), t.column("raw").to_pylist()))


def payloads(data: Path, n: int, candidates: int = 6, seed: int = 0) -> list[dict]:
    """Requests for `n` test rows: the row's history (raw item ids; categories are dense ids,
    the tiny data has no category vocabulary) and `candidates` ads including the row's own."""
    ds = PreparedDataset.open(data)
    rows = ds.read_split("test")
    raw = raw_items(data)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hist = rows["hist_item_id"][i]
        real = hist != PAD_ID
        items = [int(rows["item_id"][i])] + rng.choice(sorted(raw), candidates - 1).tolist()
        cates = [int(rows["cate_id"][i])] + rng.integers(2, 6, candidates - 1).tolist()
        out.append({
            "history": {"item_id": [raw[int(h)] for h in hist[real]],
                        "cate_id": [int(c) for c in rows["hist_cate_id"][i][real]]},
            "candidates": [{"item_id": raw[int(it)], "cate_id": c}
                           for it, c in zip(items, cates)],
        })
    return out


def offline_scores(checkpoint: Path, payload: dict, id_filter=None
                   ) -> tuple[list[float], np.ndarray | None]:
    """CTR of every candidate via `checkpoint.load_model` + `train.forward` on the equivalent
    prepared batch (the user's history repeated per candidate), and DIN's attention weights
    (C, history kept). `id_filter` (a `regularization.IdFilter`) is applied to the batch as
    evaluation applies it."""
    model, tables, c = load_model(checkpoint)
    t = pq.read_table(checkpoint / "vocab" / "item_id.parquet")
    vocab = dict(zip(t.column("raw").to_pylist(), t.column("id").to_pylist()))
    L = c.schema.max_history
    hist_items = [vocab.get(str(x), OOV_ID) for x in payload["history"]["item_id"]][-L:]
    hist_cates = [x if 2 <= x < c.schema.tables["cate_id"][0] else OOV_ID
                  for x in payload["history"]["cate_id"]][-L:]
    cands = payload["candidates"]
    C = len(cands)
    batch = {"hist_item_id": torch.zeros(C, L, dtype=torch.long),
             "hist_cate_id": torch.zeros(C, L, dtype=torch.long),
             "item_id": torch.tensor([vocab.get(str(x["item_id"]), OOV_ID) for x in cands]),
             "cate_id": torch.tensor([x["cate_id"] for x in cands])}
    batch["hist_item_id"][:, :len(hist_items)] = torch.tensor(hist_items, dtype=torch.long)
    batch["hist_cate_id"][:, :len(hist_cates)] = torch.tensor(hist_cates, dtype=torch.long)
    if id_filter is not None:
        batch = {k: torch.from_numpy(v) for k, v in
                 id_filter({k: v.numpy() for k, v in batch.items()}).items()}
    with torch.no_grad():
        probs = torch.sigmoid(forward(model, tables, batch)).tolist()
        weights = None
        if hasattr(model, "attention"):
            emb = tables.lookup(model.sparse_inputs(batch))
            _, w = model.user_interest(emb, batch)
            weights = w[:, :len(hist_items)].numpy()
    return probs, weights


# Requests every server must refuse, with the status and field its error names. Limits assumed:
# max_candidates=8, max_body_bytes=4000 (the tiny schema has no user or context features).
GOOD_CANDIDATE = {"item_id": "i3", "cate_id": 2}
BAD_REQUESTS = [
    (b"{bad json", 400, "body"),
    (b"\xff\xfe\x00", 400, "body"),
    (b"[1, 2]", 422, "body"),
    (b"{}", 422, "candidates"),
    ({"candidates": []}, 422, "candidates"),
    ({"candidates": {"item_id": "i3"}}, 422, "candidates"),
    ({"candidates": [GOOD_CANDIDATE] * 9}, 422, "candidates"),  # limit is 8 here
    ({"candidates": [GOOD_CANDIDATE, {"item_id": "i4"}]}, 422, "candidates[1].cate_id"),
    ({"candidates": [{**GOOD_CANDIDATE, "price": 3}]}, 422, "candidates[0].price"),
    ({"candidates": [{"item_id": 1.5, "cate_id": 2}]}, 422, "candidates[0].item_id"),
    ({"candidates": [{"item_id": None, "cate_id": 2}]}, 422, "candidates[0].item_id"),
    ({"candidates": [{"item_id": "i3", "cate_id": "Drama"}]}, 422, "candidates[0].cate_id"),
    ({"candidates": ["i3"]}, 422, "candidates[0]"),
    ({"candidates": [GOOD_CANDIDATE], "history": {"item_id": ["i1", "i2"], "cate_id": [2]}},
     422, "history.cate_id"),
    ({"candidates": [GOOD_CANDIDATE], "history": {"item_id": ["i1"]}}, 422, "history.cate_id"),
    ({"candidates": [GOOD_CANDIDATE], "history": {"hist_item_id": ["i1"], "cate_id": [2]}},
     422, "history.hist_item_id"),
    ({"candidates": [GOOD_CANDIDATE], "history": {"item_id": "i1", "cate_id": [2]}},
     422, "history.item_id"),
    ({"candidates": [GOOD_CANDIDATE], "history": {"item_id": ["i1", True],
                                                  "cate_id": [2, 3]}}, 422, "history.item_id[1]"),
    ({"candidates": [GOOD_CANDIDATE], "history": [["i1", 2]]}, 422, "history"),
    ({"candidates": [GOOD_CANDIDATE], "foo": 1}, 422, "foo"),
    ({"candidates": [GOOD_CANDIDATE], "explain": "yes"}, 422, "explain"),
    ({"candidates": [GOOD_CANDIDATE], "user": {"age": 3}}, 422, "user.age"),
    ({"candidates": [GOOD_CANDIDATE], "context": {"hour": 3}}, 422, "context.hour"),
    ({"candidates": [GOOD_CANDIDATE], "history": {"item_id": ["i1"] * 800,
                                                  "cate_id": [2] * 800}}, 413, "body"),
]


# --- fuzzing (hypothesis): valid bodies mutated at every position and type, and pathological JSON
def fuzz_strategies():
    """Hypothesis strategies for hostile request bodies (imported lazily: hypothesis is a test
    extra). Returns `bodies(valid)`: a strategy of raw HTTP bodies (bytes) derived from the list
    of valid JSON payloads `valid`."""
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**200, max_value=2**200),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
        st.sampled_from(["i3", "i29", "\ud800", "\x00", "2", "1e999", "NaN", ""]))
    values = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=12)

    def paths(obj, prefix=()):
        """Every position in a JSON tree: (path to the container, key or index)."""
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield prefix, k
                yield from paths(v, prefix + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                yield prefix, i
                yield from paths(v, prefix + (i,))

    @st.composite
    def mutated(draw, valid):
        body = json.loads(json.dumps(draw(st.sampled_from(valid))))
        for _ in range(draw(st.integers(1, 3))):
            spots = list(paths(body))
            if not spots:
                break
            where, key = draw(st.sampled_from(spots))
            parent = body
            for step in where:
                parent = parent[step]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[key] = draw(values)
            elif action == "delete":
                del parent[key]
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(values)
            else:
                parent.insert(draw(st.integers(0, len(parent))), draw(values))
        return json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")

    @st.composite
    def byte_edits(draw, valid):
        """A valid body with a few raw bytes replaced, inserted or cut (broken JSON, bad UTF-8)."""
        data = bytearray(json.dumps(draw(st.sampled_from(valid))).encode())
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data)))
            byte = draw(st.integers(0, 255))
            op = draw(st.sampled_from(["set", "insert", "cut"]))
            if op == "insert" or i == len(data):
                data.insert(i, byte)
            elif op == "set":
                data[i] = byte
            else:
                del data[i:i + draw(st.integers(1, 8))]
        return bytes(data)

    def pathological(valid: list[dict]) -> list[bytes]:
        good = json.dumps(valid[0])
        cand = json.dumps(valid[0]["candidates"][0])
        return [
            b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
            b"[" * 3000, ('{"candidates": [' + "[" * 1500 + "]" * 1500 + "]}").encode(),
            b"1" * 5000, ('{"candidates": [{"item_id": ' + "9" * 4400 + ', "cate_id": 2}]}'
                          ).encode(),
            ('{"candidates": [{"item_id": 1' + "0" * 400 + ', "cate_id": 2}]}').encode(),
            b'{"candidates": [{"item_id": 1e999, "cate_id": 2}]}',
            b'{"candidates": [{"item_id": NaN, "cate_id": 2}]}',
            b'{"candidates": [{"item_id": "i3", "cate_id": Infinity}]}',
            b'{"candidates": [{"item_id": "i3", "cate_id": -Infinity}]}', b"NaN",
            ('{"candidates": [' + cand + '], "candidates": [' + cand + "]}").encode(),
            b'{"candidates": [{"item_id": "i3", "item_id": "i4", "cate_id": 2}]}',
            ('{"candidates": [' + ",".join([cand] * 100_000) + "]}").encode(),
            b'{"candidates": [' + b"1," * 200_000 + b"1]}",
            ('{"history": {"item_id": [' + ",".join(['"i3"'] * 50_000) + '], "cate_id": ['
             + ",".join(["2"] * 50_000) + ']}, "candidates": [' + cand + "]}").encode(),
            b'{"candidates": [{"item_id": "\\ud800", "cate_id": 2}]}',
            b'{"candidates": [{"\\udfff": "i3", "cate_id": 2}]}',
            b'{"\\ud800": 1, "candidates": [' + cand.encode() + b"]}",
            b'{"candidates": [{"item_id": "\xff\xfe", "cate_id": 2}]}',
            b"\xef\xbb\xbf" + good.encode(), b"\xff\xfe" + good.encode("utf-16-le"),
            good.encode("utf-32"), b"\x00" * 64, b"", b" ", b"null", b'"x"', b"{}" * 3,
            good.encode() + b"garbage", b'{"candidates": [{"item_id": "i3", "cate_id": 2}]',
        ]

    def bodies(valid: list[dict]):
        return st.one_of(mutated(valid), byte_edits(valid), st.sampled_from(pathological(valid)),
                         st.binary(max_size=64))

    return bodies, pathological
