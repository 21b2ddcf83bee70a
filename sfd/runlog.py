"""A training run's metrics log: ``metrics.jsonl`` (the source of truth, plotted by eval/plot.py)
and, when asked, the same numbers as TensorBoard scalars under ``<run_dir>/tb``.

Any trainer can keep one (the diffusion trainer does; the Semantic-VAE trainer prints instead).
A record is a flat JSON object with ``step`` and ``event`` (``train``, ``sample``, ...); a record
with a ``png`` path also logs that image. Opened on resume, the log first drops lines past the
resumed step: a killed run may have logged steps its checkpoint lacks. Rank 0 only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog"]


class MetricsLog:
    def __init__(self, run_dir: str | Path, tensorboard: bool = False, resume_step: int = 0) -> None:
        path = Path(run_dir) / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if line and _step_of(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        self.file = open(path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is None:
            return
        step, group = record["step"], record.get("event", "train")
        for key, value in record.items():
            if key not in ("step", "event") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{group}/{key}", value, step)
        if record.get("png"):
            import numpy as np
            from PIL import Image

            with Image.open(record["png"]) as im:
                self.tb.add_image("samples/ema_grid", np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a line cut short by a kill
        return float("inf")
