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
    assert "real held-out images (ceiling)" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    grid = Image.open(summary["grid_png"])
    assert grid.width >= 24 * 8 and grid.height >= 24 * 6  # 6 classes x 8 samples of 24 px, with captions
    assert Image.open(summary["loss_curves_png"]).width > 0
    # The checkpoints come from the torchrun (2-process) training run.
    assert any((out / "train" / "checkpoints").iterdir())
    assert (out / "train" / "metrics.jsonl").read_text().count('"event": "train"') >= 2

    # The judge's numbers for guided, unguided and real images; honestly named, never FID.
    metrics = summary["metrics"]
    assert len(metrics) == 3 and "real held-out images (ceiling)" in metrics
    for m in metrics.values():
        assert 0.0 <= m["judge_accuracy"] <= 1.0 and m["FD_judge"] >= 0.0
    assert 0.0 <= summary["semantic_encoder"]["linear_probe_heldout_accuracy"] <= 1.0
    assert summary["cpu_seconds"] > 0 and "encode" in summary["stage_cpu_seconds"]
    text = json.dumps(summary)
    assert '"FID"' not in text and "not FID" in text
    # The encode job loaded the demo's ViT through the DINOv2 weight path, not a random init.
    cache_zarr = json.loads((out / "cache" / "zarr.json").read_text())
    assert cache_zarr["attributes"]["dino_encoder"]["kind"] == "weights"
