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
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,  # a hang guard; under `-n 2` it shares the CPU
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SFD demo finished" in proc.stdout and "sample grid" in proc.stdout
    assert "real test images (ceiling)" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    grid = Image.open(summary["grid_png"])
    assert grid.width >= 24 * 2 and grid.height >= 24 * 10  # 10 classes x 2 samples of 24 px, with captions
    assert Image.open(summary["loss_curves_png"]).width > 0
    # The checkpoints come from the torchrun (2-process) training run.
    assert any((out / "train" / "checkpoints").iterdir())
    metrics_log = (out / "train" / "metrics.jsonl").read_text()
    assert metrics_log.count('"event": "train"') >= 2

    # The judge's numbers for guided, unguided and real images; honestly named, never FID.
    metrics = summary["metrics"]
    assert len(metrics) == 4 and "real test images (ceiling)" in metrics
    for m in metrics.values():
        assert 0.0 <= m["judge_accuracy"] <= 1.0 and m["FD_judge"] >= 0.0
    text = json.dumps(summary)
    assert '"FID"' not in text and "not FID" in text

    # It learned: a model that ignored its class label, or a broken sampler or decoder, lands at
    # chance (10 %; with 100 samples, 20 % or more happens by chance about once in a thousand runs);
    # the quick run's guided samples must reach twice chance (the full demo reaches ~55 %).
    chance = summary["chance_accuracy"]
    assert chance == 0.1
    guided = next(v for k, v in metrics.items() if k.startswith("samples, guided"))
    assert guided["num_images"] == 100 and guided["judge_accuracy"] >= 2 * chance, metrics
    assert summary["judge"]["heldout_accuracy"] >= 0.8  # the referee itself works on real test images

    # Every choice on the validation split: the guidance candidates were judged there, the
    # lowest FD chosen; the reported numbers are test-split numbers.
    g = summary["guidance"]
    assert g["chosen"] == min(g["validation"], key=lambda n: g["validation"][n]["FD_judge"])
    lines = [json.loads(x) for x in (out / "train" / "eval.jsonl").read_text().splitlines()]
    assert {x["ref"] for x in lines} == {"val"} and g["chosen"] in {x["setting"] for x in lines}

    # Quality during training (eval_every) ran and was recorded (the quick preset skips the
    # post-hoc EMA sweep: tests/test_posthoc_ema.py covers its maths).
    assert [r["step"] for r in summary["quality_during_training"]] == [250, 500]
    assert summary["posthoc_ema"] is None

    # The learned encoders went in through the released files' weight paths: the ViT as DINOv2
    # (--dino), the autoencoder as the LDM VAE (--texture-vae, its architecture from the file).
    attrs = json.loads((out / "cache" / "zarr.json").read_text())["attributes"]
    assert attrs["dino_encoder"]["kind"] == "weights"
    assert attrs["texture_encoder"]["kind"] == "weights", attrs["texture_encoder"]
    assert summary["texture_autoencoder"]["test_split"]["autoencoder_posterior_mean"]["psnr_db"] > 10
    assert "without labels" in summary["stand_ins"]["semantic encoder"]
    assert summary["cpu_seconds"] > 0 and any(k.startswith("encode") for k in summary["stage_cpu_seconds"])
