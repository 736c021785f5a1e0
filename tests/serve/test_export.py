"""`din-ray export`: the torch.export program, loaded by a plain Python process that imports
neither din_ray nor Ray, scores requests exactly as the serving code does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from serve_helpers import payloads, train_tiny

from din_ray.cli import main as cli_main
from din_ray.serve.scoring import ServedModel

SCRIPT = """
import json, sys
import importlib.util
spec = importlib.util.spec_from_file_location("din_export", sys.argv[1] + "/load.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
model = mod.load(sys.argv[1])
requests = json.load(open(sys.argv[2]))
scores = [model.score(r) for r in requests]
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("din_ray", "ray", "pyarrow"))
print(json.dumps({"scores": scores, "leaked": leaked}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = train_tiny(root, "din")
    assert cli_main(["export", "--checkpoint", str(run), "--output", str(root / "exp")]) == 0
    return root, run, root / "exp"


def test_exported_program_scores_equal_serving(exported, tmp_path):
    root, run, out = exported
    requests = payloads(root / "data", 5, seed=3)
    requests[0]["history"] = {"item_id": [], "cate_id": []}  # empty history
    requests[1]["candidates"][0]["item_id"] = "never-seen"  # OOV
    served = ServedModel.load(run)
    want = [s.ctr for s in served.scorer.score([served.parser.parse(r) for r in requests])]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(tmp_path / "requests.json")],
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["leaked"] == []
    for w, g in zip(want, got["scores"], strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)


def test_export_refuses_existing_output(exported):
    _, run, out = exported
    with pytest.raises(FileExistsError):
        from din_ray.serve.export import export_checkpoint

        export_checkpoint(run, out)
    assert (out / "program.pt2").exists() and (out / "load.py").exists()
