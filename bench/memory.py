"""Training memory per GPU without a GPU: LightningDiT built under FakeTensorMode, one real
training step traced with torch's MemTracker.

Reports, per model and per-GPU batch (bf16 autocast, REPA on, AdamW, EMA), with and without
activation checkpointing: parameters, gradients, AdamW states and EMA (fp32, exact from the
tensors), the traced peak of the whole steady-state step (second step: optimizer states exist)
and the activations + temporaries alive at that peak. The step
runs on fake *CPU* tensors, since autograd on fake CUDA tensors needs a CUDA context: CPU autocast
casts the same matmuls to bf16, and SDPA takes its flash path (saving only log-sum-exp), as on a
GPU. What the compiler's partitioner saves differs from eager autograd; the eager figure is the
upper bound, and bench/gpu.py measures the real peak on a device.

Usage: python bench/memory.py [--models XL/1 1p0B/1] [--batch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfd.config import model_preset  # noqa: E402
from sfd.models.lightningdit import LightningDiT  # noqa: E402

GiB = 1024**3


def measure(name: str, batch: int, checkpointing: bool, fused: bool = False) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg = model_preset(name)
    dev = torch.device("cpu")
    t0 = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True), dev:
        model = LightningDiT(cfg).train()
        model.grad_checkpointing = checkpointing
        model.use_kernels(fused)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        g = cfg.input_size
        x = torch.randn(batch, cfg.in_channels, g, g)
        t = torch.rand(batch)
        y = torch.randint(0, cfg.num_classes, (batch,))
        target = torch.randn(batch, g * g, cfg.repa_target_dim)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                v, proj = model(x, (t, t), y, return_repa=True)
            loss = v.float().square().mean() + (proj.float() - target).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # creates the optimizer states: the second step is the steady state
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")[dev]
    n = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    kinds = {str(k.value) if hasattr(k, "value") else str(k): v for k, v in peak.items()}
    act = kinds.get("Activation", 0) + kinds.get("Temp", 0)
    row = {
        "model": name, "batch": batch, "grad_checkpointing": checkpointing, "fused_ops": fused,
        "params": n_all,
        "param_gib": 4 * n_all / GiB,
        "grad_gib": 4 * n / GiB,
        "adamw_gib": 8 * n / GiB,
        "ema_gib": 4 * n_all / GiB,
        "activations_at_peak_gib": act / GiB,
        "traced_peak_gib": kinds["Total"] / GiB,
        "traced_peak_breakdown_gib": {k: v / GiB for k, v in kinds.items()},
        "seconds": time.perf_counter() - t0,
    }
    # The trace holds model, gradients, optimizer and activations; the EMA copy (fp32, never
    # touched by forward/backward) adds its size to every moment of the step.
    row["total_gib"] = row["traced_peak_gib"] + row["ema_gib"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["LightningDiT-XL/1", "LightningDiT-1p0B/1"])
    ap.add_argument("--batch", type=int, default=32, help="per-GPU batch")
    ap.add_argument("--fused", action="store_true", help="also trace the model with the sfd.kernels ops")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for name in args.models:
        for ckpt in (False, True):
            for fused in (False, True) if args.fused else (False,):
                rows.append(measure(name, args.batch, ckpt, fused))
                r = rows[-1]
                print(f"{name} batch {args.batch} checkpointing={ckpt} fused={fused}: params {r['param_gib']:.2f} GiB, "
                      f"grads {r['grad_gib']:.2f}, AdamW {r['adamw_gib']:.2f}, EMA {r['ema_gib']:.2f}, "
                      f"traced peak {r['traced_peak_gib']:.2f} GiB (activations then {r['activations_at_peak_gib']:.2f}) "
                      f"-> {r['total_gib']:.1f} GiB with the EMA ({r['seconds']:.0f} s to trace)", flush=True)
    print("\n| model | batch | activation checkpointing | params | grads | AdamW | EMA | activations at the peak | peak incl. EMA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tag = " (fused ops)" if r["fused_ops"] else ""
        print(f"| {r['model']}{tag} | {r['batch']} | {'on' if r['grad_checkpointing'] else 'off'} | {r['param_gib']:.2f} | "
              f"{r['grad_gib']:.2f} | {r['adamw_gib']:.2f} | {r['ema_gib']:.2f} | {r['activations_at_peak_gib']:.2f} | "
              f"{r['total_gib']:.1f} GiB |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
