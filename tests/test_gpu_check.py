"""benchmarks/gpu_check.py's CPU dry run: the device check works before it meets a GPU.

The sections run in-process on tiny sizes. Left out here: `tests` (the GPU-marked tests in a
subprocess; the suite runs tests/train/test_device.py itself) and `ray_losses` (two Ray Train runs,
about two minutes on a loaded 2-core machine, too much for the suite; its dry run is
`python benchmarks/gpu_check.py --dry-run-cpu --sections ray_losses`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402


def test_dry_run_writes_every_section(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--dry-run-cpu", "--sections", "throughput", "serving",
                         "--output", str(out), "--work", str(tmp_path / "work")])
    result = json.loads(out.read_text())
    assert rc == 0, result
    assert result["device"] == "cpu" and result["ok"]
    runs = result["throughput"]["runs"]
    assert {(r["precision"], r["batch_size"]) for r in runs} == {
        (p, b) for p in ("fp32", "bf16") for b in gpu_check.CPU_SIZES.batch_sizes}
    assert all(r["samples_per_s"] > 0 for r in runs)
    assert result["serving"]["candidates"] == 200 and result["serving"]["median_ms"] > 0
    assert "gpu_check on cpu (dry run)" in capsys.readouterr().out
