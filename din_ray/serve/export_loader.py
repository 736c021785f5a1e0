"""Load a `din-ray export` directory with torch alone and score requests.

Copied into every export directory as load.py; it imports nothing of din_ray (nor Ray, numpy or
pyarrow), so any Python with torch runs it:

    python DIR/load.py DIR request.json          # prints {"scores": [...]}

    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("din_export", "DIR/load.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    model = mod.load("DIR")
    model.score({"history": {"item_id": ["i3", "i7"], "cate_id": [2, 3]},
                 "candidates": [{"item_id": "i5", "cate_id": 2}]})   # -> [CTR]

Requests are the serving format (`din_ray.serve.request`): raw ids (strings or integers,
compared as strings) for tables with a vocabulary, unknown ones OOV; dense integer ids for tables
without one. Hashed and binned log features are refused here (their encoding lives in
din_ray.data.ids).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PAD_ID, OOV_ID, NUM_RESERVED_IDS = 0, 1, 2


class ExportedModel:
    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        self.program = torch.export.load(root / "program.pt2").module()
        self.schema = json.loads((root / "schema.json").read_text())
        self.info = json.loads((root / "export.json").read_text())
        self.features = self.schema["features"]
        self.rows = {f["table"]: f["vocab_size"] for f in self.features}
        self.vocabs = {p.stem: json.loads(p.read_text()) for p in (root / "vocab").glob("*.json")}
        self.refused = set(self.info.get("encoded_elsewhere", []))

    def encode(self, feature: dict, value, where: str) -> int:
        table = feature["table"]
        if table in self.refused:
            raise ValueError(f"{where}: table {table!r} is hashed or binned; encode it with "
                             "din_ray.data.ids")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"{where}: expected a string or integer id, got {value!r}")
        vocab = self.vocabs.get(table)
        if vocab is not None:
            return vocab.get(str(value), OOV_ID)
        if not isinstance(value, int):
            raise ValueError(f"{where}: table {table!r} has no vocabulary: send a dense id")
        return value if NUM_RESERVED_IDS <= value < self.rows[table] else OOV_ID

    def batch(self, request: dict) -> dict[str, torch.Tensor]:
        """The request as the program's input: one row per candidate, user side repeated."""
        cands = request["candidates"]
        n = len(cands)
        out = {}
        for f in self.features:
            name, group = f["name"], f["group"]
            if group == "ad":
                ids = [self.encode(f, c[name], f"candidates[{i}].{name}")
                       for i, c in enumerate(cands)]
                out[name] = torch.tensor(ids, dtype=torch.long)
            elif group == "behavior":
                key = f["aligned_with"]
                values = list(request.get("history", {}).get(key, []))[-f["max_len"]:]
                ids = [self.encode(f, v, f"history.{key}[{j}]") for j, v in enumerate(values)]
                row = torch.zeros(f["max_len"], dtype=torch.long)
                row[:len(ids)] = torch.tensor(ids, dtype=torch.long)
                out[name] = row.expand(n, -1).clone()
            else:
                section = "context" if group == "context" else "user"
                value = request[section][name]
                out[name] = torch.full((n,), self.encode(f, value, f"{section}.{name}"),
                                       dtype=torch.long)
        return out

    def score(self, request: dict) -> list[float]:
        with torch.no_grad():
            return self.program(self.batch(request)).tolist()


def load(root: str | Path) -> ExportedModel:
    return ExportedModel(root)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python load.py EXPORT_DIR REQUEST.json")
    model = load(sys.argv[1])
    print(json.dumps({"scores": model.score(json.loads(Path(sys.argv[2]).read_text()))}))
