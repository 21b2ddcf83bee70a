"""`just demo` end to end, in its quick size: the same stages and artefacts as the full demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_quick_produces_every_artefact(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "pipeline/demo.py", "--out", str(out), "--quick"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SFD demo finished" in proc.stdout and "sample grid" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    grid = Image.open(summary["grid_png"])
    assert grid.width > 64 * 4 and grid.height > 64 * 10  # 10 classes x 4 samples of 64 px, with captions
    assert Image.open(summary["loss_curves_png"]).width > 0
    # The checkpoints come from the torchrun (2-process) training run.
    assert any((out / "train" / "checkpoints").iterdir())
    assert (out / "train" / "metrics.jsonl").read_text().count('"event": "train"') >= 2

    # Honesty: the distance uses a random-init Inception and is never called FID.
    metrics = json.loads(Path(summary["metrics_json"]).read_text())
    text = json.dumps(metrics)
    assert "FD_random-inception" in text and '"FID"' not in text
    assert "stand-in" in json.dumps(summary["stand_ins"]) and "not FID" in json.dumps(summary["stand_ins"])
