"""Post-hoc EMA (EDM2, Karras et al. 2024): power-function EMA profiles kept during training,
their periodic snapshots, and the least-squares reconstruction of any EMA width afterwards.

docs/method.md §15 states the method and its equations; in short:

- a profile with exponent γ averages the weights seen so far with weights ∝ τ^γ. It is kept by
  θ̂_t = β_t·θ̂_{t−1} + (1 − β_t)·θ_t with β_t = (1 − 1/t)^(γ+1), t = 1, 2, … the optimiser step
  (β_1 = 0: the profile starts at the first trained weights, so it needs no warm-up);
- its width relative to the training length is σ_rel = √((γ+1) / ((γ+2)²(γ+3))), and
  :func:`sigma_rel_to_gamma` inverts it (the decreasing branch of that function, γ ≥ γ*);
- every ``ema_snapshot_every`` steps the trainer stores every profile (:func:`write_snapshot`);
- a profile of another width at a time T is the combination Σ x_i θ̂_i of stored snapshots whose
  averaging kernels best match the wanted kernel in L2 (:func:`solve_coefficients`); the kernels
  are power functions, so the Gram matrix of their inner products has a closed form.

Files: ``<run>/ema_snapshots/<step:07d>.safetensors`` (tensors ``<k>/<param name>`` for profile
k, and ``fixed/<name>`` for the frozen parameters and buffers, so a snapshot alone rebuilds a
model; metadata: step, σ_rel and γ per profile, the model config, the run config and the latent
statistics) with ``ema_snapshots/manifest.json`` (size and SHA-256 of each, sfd/manifest.py's
format, updated one entry at a time so a long run never re-hashes its history). The profiles'
running state travels in each training checkpoint as ``posthoc_ema.safetensors`` so a resumed
run continues them bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sfd.checkpoint import WeightsError, read_safetensors, save_safetensors
from sfd.manifest import manifest_add, manifest_remove, verify_checkpoint

__all__ = [
    "SNAPSHOT_DIR", "STATE_FILE", "EDM2_SNAPSHOT_IMAGES", "gamma_to_sigma_rel", "sigma_rel_to_gamma",
    "parse_sigma_rels", "PowerEMA", "snapshot_path", "list_snapshots", "write_snapshot", "read_snapshot",
    "verify_snapshots", "drop_snapshots_after", "profile_gram", "solve_coefficients", "reconstruct",
]

SNAPSHOT_DIR = "ema_snapshots"
STATE_FILE = "posthoc_ema.safetensors"  # inside a training checkpoint directory
SNAPSHOT_FORMAT = "sfd-posthoc-ema-1"
EDM2_SNAPSHOT_IMAGES = 8_000_000  # EDM2's snapshot interval (images), the ema_snapshot_every=0 default
_NAME = re.compile(r"^(\d+)\.safetensors$")


# ---------------------------------------------------------------------------------------------
# γ ↔ σ_rel


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the kernel ∝ τ^γ on [0, 1]."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


# σ_rel(γ) rises from 0 at γ = −1 to a peak, then falls to 0. The peak is where the derivative of
# log σ_rel² = log(γ+1) − 2 log(γ+2) − log(γ+3) vanishes: 1/(γ+1) − 2/(γ+2) − 1/(γ+3) = 0, which
# after clearing denominators is γ² + 3γ + 1 = 0, so γ* = (√5 − 3)/2 ≈ −0.382 and σ_rel ≤ 0.3003.
GAMMA_PEAK = (math.sqrt(5.0) - 3.0) / 2.0
SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_PEAK)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ ≥ γ* with σ_rel(γ) = ``sigma_rel``: the root of the cubic
    σ²(γ+2)²(γ+3) − (γ+1) = 0 on the falling branch (the cubic's other root above −1 lies on the
    rising branch, a kernel piled up at τ = 0 that weights the earliest weights most)."""
    s = float(sigma_rel)
    if not 0.0 < s < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel}")
    # σ_rel is strictly decreasing on [γ*, ∞): bracket, then bisect to float precision (the cubic's
    # closed-form roots lose digits for small σ, where γ ~ σ^(-2) is large).
    lo, hi = GAMMA_PEAK, 1.0
    while gamma_to_sigma_rel(hi) > s:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gamma_to_sigma_rel(mid) > s:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def parse_sigma_rels(spec: str) -> tuple[float, ...]:
    """``"0.05,0.1"`` → (0.05, 0.1); empty → (). Raises ValueError naming the bad entry."""
    out: list[float] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"sigma_rel {part!r} is not a number (write e.g. 0.05,0.1)") from None
        if not 0.0 < value < SIGMA_REL_MAX:
            raise ValueError(f"sigma_rel {value} is outside (0, {SIGMA_REL_MAX:.4f}) (EDM2 uses 0.05 and 0.10)")
        if value in out:
            raise ValueError(f"sigma_rel {value} is listed twice")
        out.append(value)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The profiles during training


class PowerEMA:
    """Power-function EMA profiles of a model's trainable parameters (one fp32 copy each).

    The trainer keeps one on rank 0 only: the parameters are replicated under DDP, so every
    rank would hold the same numbers, and only rank 0 writes files. ``update(t)`` after the
    optimiser step that made step t (1-based); skipped (non-finite) steps are not averaged in,
    as with the classic EMA.
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]) -> None:
        if not sigma_rels:
            raise ValueError("PowerEMA needs at least one sigma_rel")
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # Frozen parameters and persistent buffers never change: stored as they are in snapshots.
        trainable = set(self.names)
        self.model = model
        self.fixed_names = [k for k in model.state_dict() if k not in trainable]
        self.profiles = [[p.detach().clone().float() for p in self.params] for _ in self.gammas]
        self.step = 0

    @torch.no_grad()
    def update(self, t: int) -> None:
        """Average in the weights after optimiser step ``t`` (β_t = (1 − 1/t)^(γ+1))."""
        for gamma, prof in zip(self.gammas, self.profiles):
            beta = (1.0 - 1.0 / t) ** (gamma + 1.0)  # a Python double: the same on every resume
            torch._foreach_lerp_(prof, self.params, 1.0 - beta)
        self.step = t

    def metadata(self, step: int) -> dict[str, str]:
        return {
            "format": SNAPSHOT_FORMAT, "step": str(int(step)),
            "sigma_rels": json.dumps(list(self.sigma_rels)), "gammas": json.dumps(list(self.gammas)),
        }

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"{k}/{n}": t for k, prof in enumerate(self.profiles) for n, t in zip(self.names, prof)}

    def save_state(self, path: str | os.PathLike[str], step: int) -> None:
        """The running profiles, for a training checkpoint (atomic, safetensors)."""
        save_safetensors(self.state_tensors(), path, self.metadata(step))

    def load_state(self, path: str | os.PathLike[str], step: int) -> None:
        """Continue from a training checkpoint's profiles (same widths, same step, same tensors)."""
        meta, tensors = read_safetensors(Path(path), True)
        saved = tuple(json.loads(meta.get("sigma_rels", "[]")))
        if saved != self.sigma_rels:
            raise ValueError(f"{path} holds profiles of sigma_rel {list(saved)}, the run asks for {list(self.sigma_rels)}")
        if int(meta.get("step", -1)) != step:
            raise ValueError(f"{path} holds profiles of step {meta.get('step')}, the checkpoint is step {step}")
        want = self.state_tensors()
        if tensors.keys() != want.keys():
            raise ValueError(f"{path} holds other tensors than the model's trainable parameters")
        for k, dst in want.items():
            if tensors[k].shape != dst.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model {tuple(dst.shape)}")
            dst.copy_(tensors[k])
        self.step = step

    def snapshot_tensors(self) -> dict[str, Tensor]:
        sd = self.model.state_dict()
        return self.state_tensors() | {f"fixed/{n}": sd[n] for n in self.fixed_names}


# ---------------------------------------------------------------------------------------------
# Snapshots on disk


def snapshot_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR


def snapshot_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    return snapshot_dir(run_dir) / f"{step:07d}.safetensors"


def list_snapshots(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Snapshot files of a run, sorted by step number (temporary files of a cut write skipped)."""
    d = snapshot_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if p.is_file() and (m := _NAME.match(p.name)))


def write_snapshot(
    run_dir: str | os.PathLike[str], step: int, ema: PowerEMA, *, model_config: Any,
    run_config: Mapping[str, Any] | None = None, latent_stats: Mapping[str, Any] | None = None,
) -> Path:
    """Store every profile at ``step``: the file atomically, then its manifest entry."""
    from sfd.config import to_json

    path = snapshot_path(run_dir, step)
    meta = ema.metadata(step) | {
        "model_config": to_json(model_config, indent=None),
        "run_config": json.dumps(None if run_config is None else dict(run_config)),
    }
    if latent_stats is not None:
        meta["latent_stats"] = json.dumps(dict(latent_stats))
    save_safetensors(ema.snapshot_tensors(), path, meta)
    manifest_add(path.parent, [path.name])
    return path


def drop_snapshots_after(run_dir: str | os.PathLike[str], step: int) -> list[int]:
    """Remove snapshots past ``step`` (a resumed run replays those steps and writes them again;
    without this, a resume with a smaller max_steps would leave snapshots of a future it never
    reaches). Returns the steps removed."""
    gone = [(s, p) for s, p in list_snapshots(run_dir) if s > step]
    if gone:
        manifest_remove(snapshot_dir(run_dir), [p.name for _, p in gone])
        for _, p in gone:
            p.unlink(missing_ok=True)
    return [s for s, _ in gone]


def verify_snapshots(run_dir: str | os.PathLike[str]) -> list[str]:
    """Problems of a run's snapshots (empty = every file listed, present and intact)."""
    d = snapshot_dir(run_dir)
    if not d.is_dir():
        return []
    problems = verify_checkpoint(d, required=())
    listed = _manifest_names(d)
    problems += [f"{p.name} is not in the manifest (its write was cut short)" for _, p in list_snapshots(run_dir)
                 if p.name not in listed]
    return problems


def _manifest_names(d: Path) -> set[str]:
    from sfd.manifest import MANIFEST

    try:
        return set(json.loads((d / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError):
        return set()


def read_snapshot(path: str | os.PathLike[str], weights: bool = True) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of a snapshot; raises WeightsError for a file that is not one."""
    meta, tensors = read_safetensors(Path(path), weights)
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise WeightsError(f"'{path}' is not a post-hoc EMA snapshot (format {meta.get('format')!r})")
    return meta, tensors


# ---------------------------------------------------------------------------------------------
# Reconstruction


def profile_gram(ts: Sequence[float], gammas: Sequence[float]) -> np.ndarray:
    """Inner products ⟨p_i, p_j⟩ of the kernels p_i(τ) = (γ_i+1) τ^γ_i / t_i^(γ_i+1) on [0, t_i]:
    (γ_i+1)(γ_j+1) min(t_i,t_j)^(γ_i+γ_j+1) / ((γ_i+γ_j+1) t_i^(γ_i+1) t_j^(γ_j+1)). Times should
    be scaled to O(1) by the caller (t^(γ+1) overflows for γ ~ 20 and t ~ 10⁶)."""
    t = np.asarray(ts, dtype=np.float64)[:, None]
    g = np.asarray(gammas, dtype=np.float64)[:, None]
    tj, gj = t.T, g.T
    m = np.minimum(t, tj)
    # In logs: every factor is positive, and the ratio of powers stays in range.
    log = (np.log(g + 1) + np.log(gj + 1) + (g + gj + 1) * np.log(m) - np.log(g + gj + 1)
           - (g + 1) * np.log(t) - (gj + 1) * np.log(tj))
    return np.exp(log)


def solve_coefficients(
    snap_steps: Sequence[int], snap_gammas: Sequence[float], target_step: int, target_gamma: float
) -> tuple[np.ndarray, float]:
    """Coefficients x (one per snapshot) minimising ‖Σ x_i p_i − p_target‖² in L2, and the
    relative residual ‖Σ x_i p_i − p_target‖ / ‖p_target‖ of that fit.

    Setting the gradient to zero gives the normal equations G x = b, G the snapshots' Gram matrix
    and b_i = ⟨p_i, p_target⟩. G is badly conditioned (neighbouring kernels nearly coincide), so it
    is solved by least squares (SVD, tiny singular values cut) rather than inverted.
    """
    scale = float(max(max(snap_steps), target_step))
    ts = [s / scale for s in snap_steps]
    T = target_step / scale
    G = profile_gram(ts, snap_gammas)
    full = profile_gram([*ts, T], [*snap_gammas, target_gamma])
    b, tt = full[:-1, -1], full[-1, -1]
    x = np.linalg.lstsq(G, b, rcond=None)[0]
    resid2 = max(tt - 2 * x @ b + x @ G @ x, 0.0)
    return x, math.sqrt(resid2 / tt)


def reconstruct(
    run_dir: str | os.PathLike[str], sigma_rels: Iterable[float], at_step: int | None = None,
) -> list[dict[str, Any]]:
    """For each width: the reconstructed state dict at ``at_step`` (default: the last snapshot)
    from the run's snapshots up to it, with the fit's coefficients and residual and the
    snapshot's configs. Every snapshot used is checked against the manifest first."""
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise WeightsError(
            f"run '{run_dir}' has no post-hoc EMA snapshots ({snapshot_dir(run_dir)}/<step>.safetensors); train it with "
            "-o posthoc_ema_sigma_rel=0.05,0.1 (and -o ema_snapshot_every=N) to record them"
        )
    T = at_step if at_step is not None else snaps[-1][0]
    if T > snaps[-1][0]:  # past the last snapshot nothing constrains the weights: refuse, don't extrapolate
        raise WeightsError(f"run '{run_dir}' has snapshots up to step {snaps[-1][0]}; pick --at-step <= {snaps[-1][0]}")
    use = [(s, p) for s, p in snaps if s <= T and s > 0]
    if not use:
        raise WeightsError(f"run '{run_dir}' has no snapshot at or before step {T} (first: {snaps[0][0]}); pick a later --at-step")
    problems = [p for p in verify_snapshots(run_dir) if any(p.startswith(q.name) for _, q in use)]
    if problems:
        raise WeightsError(
            f"damaged post-hoc EMA snapshots in {snapshot_dir(run_dir)}: {'; '.join(problems[:4])}; move those files "
            "aside (and pick --at-step before them) or restore them"
        )
    # One header read per snapshot first: the system to solve needs only steps and exponents.
    heads = [read_snapshot(p, weights=False)[0] for _, p in use]
    basis: list[tuple[int, int, float]] = []  # (snapshot index, profile index, γ)
    for i, meta in enumerate(heads):
        for k, g in enumerate(json.loads(meta["gammas"])):
            basis.append((i, k, float(g)))
    steps = [int(heads[i]["step"]) for i, _, _ in basis]
    plans = []
    for s in sigma_rels:
        gamma = sigma_rel_to_gamma(s)
        x, resid = solve_coefficients(steps, [g for _, _, g in basis], T, gamma)
        plans.append((float(s), gamma, x, resid))
    # Then the weights, one snapshot at a time, accumulated in float64 for every width at once.
    sums: list[dict[str, Tensor]] = [{} for _ in plans]
    fixed: dict[str, Tensor] = {}
    for i, (_, p) in enumerate(use):
        _, tensors = read_snapshot(p)
        fixed = {k.removeprefix("fixed/"): v for k, v in tensors.items() if k.startswith("fixed/")}
        for j, (i2, k, _) in enumerate(basis):
            if i2 != i:
                continue
            prefix = f"{k}/"
            for name, v in tensors.items():
                if not name.startswith(prefix):
                    continue
                key = name[len(prefix):]
                for w, (_, _, x, _) in enumerate(plans):
                    acc = sums[w].get(key)
                    term = v.double() * float(x[j])
                    sums[w][key] = term if acc is None else acc.add_(term)
        del tensors
    last = heads[-1]
    out = []
    for w, (s, gamma, x, resid) in enumerate(plans):
        state = {k: v.float() for k, v in sums[w].items()} | fixed
        out.append({
            "sigma_rel": s, "gamma": gamma, "step": T, "state_dict": state, "residual": resid,
            "coefficients": [
                {"snapshot_step": steps[j], "sigma_rel": json.loads(heads[i]["sigma_rels"])[k], "x": float(x[j])}
                for j, (i, k, _) in enumerate(basis)
            ],
            "model_config": json.loads(last["model_config"]),
            "run_config": json.loads(last.get("run_config", "null")),
            "latent_stats": json.loads(last["latent_stats"]) if "latent_stats" in last else None,
        })
    return out
