"""`just study` on a tiny budget: every stage runs and the table has what docs/study.md needs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_tiny_budget_produces_its_table(tmp_path: Path) -> None:
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "pipeline/study.py", "--out", str(out), "--preset", "tiny", "--steps", "2", "--evals", "1",
           "--samples", "6", "--seeds", "2", "--variants", "dt0.3,no-semantic", "--jobs", "2",
           "-o", "guidance_scales=2,4", "-o", "grid_per_class=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    table = summary["table"]
    assert set(table["unguided"]) == {"dt0.3", "no-semantic"}
    for part in ("unguided", "guided"):
        for variant, rows in table[part].items():
            assert list(rows) == ["2"], (part, variant)  # one evaluated checkpoint, at the last step
            for metric in ("judge_accuracy", "FD_judge"):
                cell = rows["2"][metric]
                seeds = cell["per_seed"]
                assert set(seeds) == {"0", "1"}  # every seed reported, none dropped
                assert 0 <= cell["min"] <= cell["mean"] <= cell["max"]
                assert math.isfinite(cell["std"])
                assert cell["mean"] == pytest.approx(sum(seeds.values()) / 2)
    # Guidance: every scale judged on the validation split, the lowest mean FD chosen, and the
    # reported guided numbers are that scale's, on the test split.
    for variant, by_scale in table["validation"].items():
        assert set(map(float, by_scale)) == {2.0, 4.0}
        best = min(by_scale, key=lambda w: by_scale[w]["FD_judge"]["mean"])
        assert float(best) == table["choice"][variant] == summary["chosen_guidance_scale"][variant]
    for s in (0, 1):
        lines = [json.loads(x) for x in (out / "no-semantic" / f"seed{s}" / "eval.jsonl").read_text().splitlines()]
        assert {(x["setting"], x["ref"]) for x in lines} == {("unguided", "test"), ("cfg2", "val"), ("cfg4", "val"), ("guided", "test")}
        (guided,) = [x for x in lines if x["setting"] == "guided"]
        assert f"cfg_scale={table['choice']['no-semantic']:g}" in guided["sampling"]
    for metric in ("judge_accuracy", "FD_judge"):
        assert metric in summary["ceiling_real_test"]
    md = (out / "study_table.md").read_text()
    assert "± " in md and "no semantic channels" in md and "Per seed" in md and "validation split" in md
    assert "guided: difference to no semantic channels, same seed" in md  # the paired comparison, guided too
    assert (out / "study.png").stat().st_size > 0 and (out / "grids.png").stat().st_size > 0
    assert summary["verdicts"] and all(" vs " in v for v in summary["verdicts"])
    # The seeds differ: the runs are not one run copied.
    firsts = [json.loads((out / "dt0.3" / f"seed{s}" / "eval.jsonl").read_text().splitlines()[0]) for s in (0, 1)]
    assert firsts[0]["FD_judge"] != firsts[1]["FD_judge"]

    # --report-only rebuilds the same table from the eval logs without training anything.
    (out / "study_table.md").unlink()
    again = subprocess.run([*cmd, "--report-only"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (out / "study_table.md").read_text() == md and "== train" not in again.stdout
