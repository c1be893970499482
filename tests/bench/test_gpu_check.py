"""benches/gpu_check.sh in its CPU rehearsal (DRY=1): every stage runs and the files come out."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    before = sorted((ROOT / "benches" / "results").iterdir())
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benches" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = dict(line.split() for line in (tmp_path / "stages.txt").read_text().splitlines())
    assert list(stages) == ["env", "build", "microdit_info_after_build", "gpu_tests", "kernel_benches", "bench",
                            "bench_fp8", "report"]
    assert all(rc == "0" for rc in stages.values()), (stages, (tmp_path / "gpu_check.log").read_text()[-3000:])
    outs = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert len(outs) <= 8  # what the device tool returns
    assert "results.tar.gz" in outs and "gpu_check.log" in outs
    main = next(p for p in tmp_path.glob("*.json") if not p.name.endswith("-cost.json"))
    res = json.loads(main.read_text())
    assert set(res["phases"]) == {"1", "2", "3", "4"}
    assert all(res["phases"][p]["fast"]["images_per_s"] > 0 for p in res["phases"])
    assert list(tmp_path.glob("*-cost.png"))
    # everything goes to $OUT: the rehearsal leaves the checkout's committed results alone
    assert sorted((ROOT / "benches" / "results").iterdir()) == before
