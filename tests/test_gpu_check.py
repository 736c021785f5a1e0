"""benchmarks/gpu_check.py's CPU dry run: the device check works before it meets a GPU.

The sections run in-process on tiny sizes; `tests` (the GPU-marked tests in a subprocess) is
left out here, since the suite runs tests/test_device.py itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402


@pytest.mark.timeout(300)
def test_dry_run_writes_every_section(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--dry-run-cpu", "--sections", "ray_losses", "throughput", "serving",
                         "--output", str(out), "--work", str(tmp_path / "work")])
    result = json.loads(out.read_text())
    assert rc == 0, result
    assert result["device"] == "cpu" and result["ok"]
    # Two Ray Train runs on the same data and seed: the same per-step losses.
    losses = result["ray_losses"]
    assert losses["steps_compared"] >= gpu_check.CPU_SIZES.loss_steps
    assert losses["max_abs_diff"] <= 1e-6
    runs = result["throughput"]["runs"]
    assert {(r["precision"], r["batch_size"]) for r in runs} == {
        (p, b) for p in ("fp32", "bf16") for b in gpu_check.CPU_SIZES.batch_sizes}
    assert all(r["samples_per_s"] > 0 for r in runs)
    assert result["serving"]["candidates"] == 200 and result["serving"]["median_ms"] > 0
    assert "gpu_check on cpu (dry run)" in capsys.readouterr().out
