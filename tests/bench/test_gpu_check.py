"""benches/gpu_check.sh in its CPU rehearsal (DRY=1): every stage runs and the files come out."""
import json
import os
import subprocess
import tarfile
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
    assert list(stages) == ["env", "wheels", "build", "microdit_info_after_build", "gpu_tests", "triton_tests",
                            "bench_precision", "bench_attention", "report"]
    assert all(rc == "0" for rc in stages.values()), (stages, (tmp_path / "gpu_check.log").read_text()[-3000:])
    outs = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert len(outs) <= 8  # what the device tool returns
    assert "results.tar.gz" in outs and "gpu_check.log" in outs
    main = next(p for p in tmp_path.glob("*.json") if not p.name.endswith("-cost.json"))
    res = json.loads(main.read_text())
    # issue 11's rows: phases 1 and 3, the fast and the published ops, at both precisions
    assert set(res["phases"]) == {"1", "3"}
    assert all(res["phases"][p]["fast"]["images_per_s"] > 0 for p in res["phases"])
    rows = {(int(ph), c["backends"], c["precision"]): c for ph, run in res["runs"].items() for c in run["configs"]}
    assert all(rows[(ph, b, pr)]["status"] == "ok" for ph in (1, 3) for b in ("reference", "fast")
               for pr in ("fp32", "fp8"))
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = tar.getnames()
        attn = json.load(tar.extractfile(next(n for n in names if n.startswith("results/attention/")
                                              and n.endswith(".json") and not n.endswith("-cost.json"))))
    by = {(int(ph), c["backends"]): c for ph, run in attn["runs"].items() for c in run["configs"]
          if c["precision"] == "fp32"}
    assert by[(1, "attention=reference")]["status"] == "ok" and by[(3, "attention=sdpa_cudnn")]["status"] == "ok"
    # a backend this machine cannot run is listed with its reason, not tried
    assert by[(1, "attention=flash_attn")]["status"] == "skipped" and by[(1, "attention=flash_attn")]["reason"]
    assert list(tmp_path.glob("*-cost.png"))
    # everything goes to $OUT: the rehearsal leaves the checkout's committed results alone
    assert sorted((ROOT / "benches" / "results").iterdir()) == before
