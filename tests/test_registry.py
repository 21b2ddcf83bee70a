"""sfd/registry.py: every named choice is one registry entry beside its code; unknown names list the
valid ones, a name is registered once, and a plugin module (SFD_PLUGINS) adds a sampler and a REPA
target source that the real entry points then run."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sfd.config import (
    MODEL_PRESETS,
    SAMPLING_PRESETS,
    TRAIN_PRESETS,
    ConfigError,
    SamplingConfig,
    train_preset,
)
from sfd.data.reader import MODES
from sfd.diffusion import REPA_MODES, SCHEDULES, AsyncClock
from sfd.guidance import INTERVAL_MODES
from sfd.kernels import KERNELS
from sfd.registry import Registry, UnknownChoice, load_plugins
from sfd.repa_targets import REPA_TARGET_SOURCES
from sfd.samplers import GRIDS, SAMPLERS, sample
from tests.test_sample_eval import assets, model_flags  # noqa: F401 - the tiny checkpoint fixture
from tests.test_train import TINY, make_cache

REPO = Path(__file__).resolve().parents[1]

# Each toy is this one file: a midpoint sampler with the samplers' signature, and REPA targets that
# are the stored ones scaled by 2 (so an mse REPA loss tells them apart from the stored ones).
PLUGIN = '''
import torch

from sfd.diffusion import per_channel
from sfd.repa_targets import StoredTargets, repa_target_source
from sfd.samplers import SAMPLERS, SampleResult, fixed_grid


@SAMPLERS.register("midpoint")
def sample_midpoint(fn, x0, y, clock, *, num_steps=8, grid="exact", shift=None, callback=None):
    """Explicit midpoint on the exact phase grid: 2 evaluations per step."""
    x, nfe, steps = x0, 0, 0

    def drift(x, tau, phase):
        tau = tau.to(x.dtype).expand(len(x))
        v = fn(x, *clock.times(tau), y)
        rates = clock.rates(tau)
        if rates is not None:
            return v * per_channel(*rates, x.shape[1], clock.semantic_chans, x.ndim)
        moves = per_channel(torch.tensor([phase.texture_moves]), torch.tensor([phase.semantic_moves]),
                            x.shape[1], clock.semantic_chans, x.ndim)
        return torch.where(moves, v, torch.zeros_like(v))

    for points, phase in fixed_grid(clock, num_steps, "exact", shift):
        for a, b in zip(points[:-1], points[1:]):
            h = (b - a).to(x.dtype)
            x = x + h * drift(x + h / 2 * drift(x, a, phase), (a + b) / 2, phase)
            nfe, steps = nfe + 2, steps + 1
    return SampleResult(x, nfe, steps)


@repa_target_source("stored_x2")
class ScaledTargets(StoredTargets):
    def __init__(self, cache, device="cpu", autocast_dtype=None):
        super().__init__(cache, device, autocast_dtype)
        self.how = "stored DINO tokens x 2 (plugin)"

    def __call__(self, batch):
        return 2 * super().__call__(batch)
'''


@pytest.fixture
def plugin(tmp_path: Path) -> dict[str, str]:
    """The environment of a subprocess that loads the plugin module through SFD_PLUGINS."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_choices.py").write_text(textwrap.dedent(PLUGIN))
    return {**os.environ, "SFD_PLUGINS": "toy_choices", "PYTHONPATH": f"{folder}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


# ---- the registry itself ------------------------------------------------------------------------------


REGISTRIES = {
    "sampler": (SAMPLERS, ("euler", "heun", "dopri5")),
    "grid": (GRIDS, ("exact", "authors")),
    "interval mode": (INTERVAL_MODES, ("both", "tex", "sem")),
    "schedule": (SCHEDULES, ("offset", "power", "learned")),
    "REPA loss mode": (REPA_MODES, ("cos", "mse", "cos_mse")),
    "REPA target source": (REPA_TARGET_SOURCES, ("stored", "semvae", "none")),
    "reader mode": (MODES, ("memory", "pagecache")),
    "kernel setting": (KERNELS, ("eager", "compile", "triton")),
}


@pytest.mark.parametrize("what", REGISTRIES)
def test_unknown_names_list_the_valid_ones(what: str) -> None:
    registry, names = REGISTRIES[what]
    assert registry.names() == names  # saved configs keep parsing: the same strings
    with pytest.raises(UnknownChoice, match=f"unknown .*'nope'; choose one of {re.escape(' | '.join(names))}$"):
        registry["nope"]
    assert isinstance(UnknownChoice("x"), (ConfigError, ValueError))


def test_unknown_names_through_configs_and_dispatch() -> None:
    with pytest.raises(ConfigError, match=re.escape("method must be one of euler | heun | dopri5, got 'midpoint'")):
        SamplingConfig(method="midpoint")
    with pytest.raises(ConfigError, match=re.escape("repa_targets must be one of stored | semvae | none, got 'dino'")):
        train_preset("tiny", "repa_targets=dino")
    with pytest.raises(ConfigError, match=re.escape("data_mode must be one of memory | pagecache")):
        train_preset("tiny", "data_mode=stream")
    with pytest.raises(ValueError, match=re.escape("choose one of euler | heun | dopri5")):
        sample(lambda x, *_: x, torch.zeros(1, 2, 1, 1), torch.zeros(1, dtype=torch.long), AsyncClock(0.0, 1), method="rk4")
    with pytest.raises(ValueError, match=re.escape("unknown schedule 'cosine'; choose one of offset | power | learned")):
        AsyncClock(0.3, 4, "cosine")


def test_a_name_is_registered_once() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)

    @reg.register("b")
    def b() -> int:
        return 2

    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a", 3)
    assert reg["a"] == 1 and reg["b"] is b and reg.names() == ("a", "b")
    with pytest.raises(ValueError, match="sampler 'euler' is already registered"):
        SAMPLERS.register("euler", lambda *a, **k: None)
    assert SAMPLERS.names() == ("euler", "heun", "dopri5")


def test_presets_name_registered_choices() -> None:
    # The presets are built while sfd.config loads, before the registries can be imported
    # (sfd/config.py _choice); rebuilding them now checks every choice they name.
    for cfg in MODEL_PRESETS.values():
        dataclasses.replace(cfg)
    for cfg in TRAIN_PRESETS.values():
        dataclasses.replace(cfg)
        dataclasses.replace(cfg.model)
    for cfg in SAMPLING_PRESETS.values():
        dataclasses.replace(cfg)


def test_a_missing_plugin_module_is_one_error() -> None:
    with pytest.raises(UnknownChoice, match="SFD_PLUGINS: cannot import plugin module 'no_such_plugin_module'"):
        load_plugins("no_such_plugin_module")


# ---- plugins through the real entry points ---------------------------------------------------------------


def test_plugin_sampler_runs_in_sample_grid(plugin: dict[str, str], assets: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "grid.png"
    args = ["sample/grid.py", *model_flags(assets), "--classes", "1,2", "--per-class", "2", "--out", str(out)]
    proc = run([*args, "--sampler", "midpoint", "--steps", "4"], plugin)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["sampling"]["method"] == "midpoint" and summary["nfe_per_batch"] == [8]  # 4 steps × 2
    # Without the plugin the name is unknown: one error line listing the valid samplers, exit 2.
    bare = {k: v for k, v in plugin.items() if k != "SFD_PLUGINS"}
    proc = run([*args, "-o", "method=midpoint"], bare)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: method must be one of euler | heun | dopri5, got 'midpoint'"


def test_plugin_repa_target_source_trains(plugin: dict[str, str], tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.zarr").path
    common = [*TINY, "--cache", str(cache), "-o", "max_steps=2", "-o", "repa_mode=mse"]

    def repa(run_dir: Path) -> list[float]:
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["repa"] for r in lines if r["event"] == "train"]

    proc = run(["train/main.py", *common, "--out-dir", str(tmp_path / "x2"), "-o", "repa_targets=stored_x2"], plugin)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "REPA targets: stored DINO tokens x 2 (plugin)" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "x2" / "config.json").read_text())["repa_targets"] == "stored_x2"
    proc = run(["train/main.py", *common, "--out-dir", str(tmp_path / "stored")], plugin)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scaled, stored = repa(tmp_path / "x2"), repa(tmp_path / "stored")
    # Step 1 has the same weights and batch in both runs: only the targets differ.
    assert len(scaled) == len(stored) == 2 and scaled[0] > 0 and scaled[0] != pytest.approx(stored[0], rel=1e-3)
