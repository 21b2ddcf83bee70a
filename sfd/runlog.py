"""What a training run records besides its checkpoints: its metrics log and profiler traces.

:class:`MetricsLog` — ``metrics.jsonl`` (the source of truth, plotted by eval/plot.py) and, when
asked, the same numbers as TensorBoard scalars under ``<run_dir>/tb``; both trainers keep one
(``train/main.py``, ``pipeline/train_semvae.py``). A record is a flat JSON object with ``step`` and ``event`` (``train``, ``sample``, ...); a record
with a ``png`` path also logs that image. Opened on resume, the log first drops lines past the
resumed step: a killed run may have logged steps its checkpoint lacks. Rank 0 only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLog", "StepProfiler", "parse_profile_steps"]


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


# ---------------------------------------------------------------------------------------------
# Profiler traces
#
# ``-o profile_steps=A:B``: a torch.profiler trace of training steps A..B−1, written to the run.
#
# Files go to ``<run_dir>/profile/``: ``trace-rank<r>-steps<A>-<B>.json`` (Chrome trace: open in
# https://ui.perfetto.dev or chrome://tracing; CPU ops, CUDA kernels, shapes and memory events) and,
# on CUDA, ``memory-rank<r>-steps<A>-<B>.pickle`` (the allocator's snapshot with stack traces, for
# https://pytorch.org/memory_viz). Steps count as the trainer's ``step`` before the step runs, so
# ``0:3`` covers the first three steps (and the compile, if any); pick a window after warm-up
# (e.g. ``20:25``) for steady-state kernels. Nothing is recorded outside the window.


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """``""`` → None; ``"A:B"`` with 0 ≤ A < B → (A, B); anything else raises ValueError."""
    if not spec:
        return None
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"profile_steps must be A:B (two step numbers, e.g. 20:25), got {spec!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"profile_steps A:B needs 0 <= A < B, got {spec!r}")
    return a, b


class StepProfiler:
    """Starts before step A, stops after step B−1, writes the trace (and CUDA memory snapshot)."""

    def __init__(self, spec: str, run_dir: Path, rank: int, device: torch.device) -> None:
        window = parse_profile_steps(spec)
        assert window is not None
        self.start, self.stop = window
        self.dir, self.rank, self.cuda = Path(run_dir) / "profile", rank, device.type == "cuda"
        self.prof: torch.profiler.profile | None = None
        self.written: list[Path] = []

    def before_step(self, step: int) -> None:
        if step != self.start or self.prof is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False)
        self.prof.__enter__()

    def after_step(self, step: int) -> None:
        """``step`` = the step count after the step ran."""
        if self.prof is not None and step >= self.stop:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}-steps{self.start}-{self.stop}"
        trace = self.dir / f"trace-{stem}.json"
        prof.export_chrome_trace(str(trace))
        self.written.append(trace)
        if self.cuda:
            snapshot = self.dir / f"memory-{stem}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snapshot)
