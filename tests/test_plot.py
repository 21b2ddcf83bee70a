"""eval/plot.py: labelled loss, learning-rate and gradient-norm panels from a run's metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_plot_draws_losses_lr_and_grad_norm(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"event": "train", "step": s, "total": 1 / s, "mse": 0.5 / s, "cos": 0.2 / s, "repa": 0.3,
             "lr": 1e-4 * min(1, s / 5), "grad_norm": 1.5e8 if s == 1 else 1 / s} for s in range(1, 21)]
    rows.append({"event": "skip", "step": 21})  # other events are not plotted
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval.jsonl").write_text(json.dumps({"step": 20, "judge_accuracy": 0.5}) + "\n")
    res = subprocess.run([sys.executable, str(REPO / "eval" / "plot.py"), str(run)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # Six panels (4 losses + lr + grad norm) in two rows of three: a 2:1-ish figure, not one strip.
    with Image.open(run / "plots" / "losses.png") as im:
        assert 1.5 < im.width / im.height < 2.5
    assert (run / "plots" / "metrics.png").is_file()
    res = subprocess.run([sys.executable, str(REPO / "eval" / "plot.py"), str(tmp_path / "absent")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no run directory" in res.stderr
