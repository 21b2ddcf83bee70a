"""bench/gpu.py, the first GPU hour's script, runs every stage on the CPU (--smoke) before a GPU
session spends device time on it, and --help names every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "bench" / "gpu.py"


def env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}


def test_help_lists_every_stage() -> None:
    sys.path.insert(0, str(REPO))
    from bench.gpu import STAGES

    done = subprocess.run([sys.executable, str(GPU), "--help"], env=env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    for stage in STAGES:
        assert f"``{stage}``" in done.stdout, stage
    assert set(STAGES) == {"kernels", "train", "sample", "encode", "inception", "optimizer"}


@pytest.mark.slow
def test_smoke_runs_every_stage_on_cpu(tmp_path: Path) -> None:
    # 8.5 min wall on a 2-core machine at load 7-8: compiles of the tiny model, one
    # compiled sampler, the fused optimizer pass; then each stage once at tiny sizes.
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(GPU), "--smoke", "--out", str(out), "--kernels", "eager", "compile"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["skipped"] == [], result["skipped"]
    assert {r["variant"] for r in result["kernels"]} == {"triton", "inductor", "eager"}
    assert {(r["kernels"], r["weight_cast"]) for r in result["train"]} == {("eager", "autocast"), ("compile", "autocast"), ("eager", "optimizer")}
    assert all(r["img_per_s"] > 0 and r["optimizer_ema"]["median_s"] > 0 for r in result["train"])
    runs = {(r["method"], r["guide"] is not None, r["compiled"]) for r in result["sample"]}
    assert {("dopri5", True, True), ("dopri5", True, False), ("euler", False, False), ("euler", True, False)} <= runs
    assert all(r["nfe"] > 0 and r["hours_50k"] > 0 for r in result["sample"])
    assert result["encode"][0]["img_per_s"] > 0 and result["inception"][0]["img_per_s"] > 0
    opt = result["optimizer"][0]
    assert opt["torch"]["bytes_per_param"] == 44 and opt["fused+cast"]["bytes_per_param"] == 46
    assert opt["fused+copies"]["bytes_per_param"] == 42 and opt["fused+copies"]["median_ms"] > 0
    assert done.stdout.strip().splitlines()[-1].startswith("SUMMARY cpu")
