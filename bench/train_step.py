"""Training-step speed: the trainer's step (eager and compiled) against a plain eager loop, and
the achieved FLOP/s against this machine's measured fp32 matmul peak.

The reference loop is what the authors' train.py does per step (docs/method.md §6): model forward with
label dropout inside the model, the SFD loss, backward, AdamW, and an EMA update parameter by
parameter. The trainer's step (train/main.py TrainStep) adds the global-batch draws, the
all-rank agreement on losses/NaN and the foreach EMA. Both run on the same synthetic batch.

FLOPs are counted analytically: 2 per multiply-add of every Linear/conv applied per token
(patch embed, qkv, proj, SwiGLU, final layer, REPA projector on its tokens) or per sample (adaLN,
timestep MLPs), plus attention's QKᵀ and AV (4·N²·D per layer and sample); training = 3× forward.
The peak is the best fp32 torch.mm rate over a few large shapes, measured here.

Example:
    python bench/train_step.py --model LightningDiT-B/1 --batch 8 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sfd import runtime
from sfd.config import ModelConfig, model_preset, train_preset
from sfd.data.reader import LatentBatch
from sfd.diffusion import noise_composite, sample_training_times, sfd_loss
from sfd.models.lightningdit import LightningDiT, count_params

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the entry folders are packages of the repository root


def train_flops(cfg: ModelConfig, batch: int, with_repa: bool) -> float:
    """FLOPs of one training step (forward + backward ≈ 3 × forward) for ``batch`` samples."""
    D, H, L, C, p = cfg.hidden_size, cfg.swiglu_hidden, cfg.depth, cfg.in_channels, cfg.patch_size
    N = (cfg.input_size // p) ** 2
    per_token = L * (3 * D * D + D * D + 2 * D * H + H * D) + D * p * p * C + C * p * p * D
    if with_repa:
        P = cfg.repa_projector_dim
        per_token += D * P + P * P + P * cfg.repa_target_dim
    per_sample = L * 6 * D * D + 2 * D * D + 2 * (256 * D // 2 + (D // 2) ** 2)
    attention = L * 4 * N * N * D
    forward = batch * (2 * per_token * N + 2 * per_sample + attention)
    return 3.0 * forward


def matmul_peak(device: torch.device, sizes=((2048, 2048, 2048), (2048, 768, 3072), (3072, 3072, 3072))) -> float:
    """Best measured fp32 matmul FLOP/s over ``sizes`` (m, k, n)."""
    best = 0.0
    for m, k, n in sizes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        for _ in range(2):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            a @ b
            reps += 1
        sync(device)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, warmup: int, steps: int, device: torch.device) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    for i in range(warmup):
        step_fn(i)
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step_fn(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="LightningDiT-B/1", help="model preset (sfd/config.py MODEL_PRESETS)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (includes compilation)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled trainer step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from train import main as trainer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    precision = "bf16" if on_cuda else "fp32"
    cfg = train_preset("sfd-b", f"global_batch={args.batch}", f"precision={precision}", "sample_every=0")
    cfg = dataclasses.replace(cfg, model=model_preset(args.model), model_name=args.model)
    m = cfg.model
    B = args.batch
    gen = torch.Generator().manual_seed(0)
    batch = LatentBatch(
        x=torch.randn(B, m.in_channels, m.input_size, m.input_size, generator=gen),
        y=torch.randint(0, m.num_classes, (B,), generator=gen),
        repa=torch.randn(B, (m.input_size // m.patch_size) ** 2, m.repa_target_dim, generator=gen),
        rows=np.arange(B), flips=np.zeros(B, dtype=np.int64),
    )
    autocast_dtype = torch.bfloat16 if on_cuda else None
    loss_kw = dict(
        semantic_chans=m.semantic_chans, semantic_weight=cfg.semantic_weight, use_cosine_loss=True,
        repa_weight=cfg.repa_weight, repa_mode=cfg.repa_mode,
    )

    def fresh() -> tuple[LightningDiT, LightningDiT, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = LightningDiT(m).to(device).train()
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=0.0, fused=True if on_cuda else None)
        return model, ema, opt

    def reference_loop() -> tuple[list[float], float]:
        """The authors' eager step: dropout inside the model, per-parameter EMA."""
        model, ema, opt = fresh()
        x1, y, repa = batch.x.to(device), batch.y.to(device), batch.repa.to(device)

        def step(i: int) -> None:
            t_tex, t_sem = sample_training_times(B, cfg.delta_t, device=device)
            x_t, target, _ = noise_composite(x1, t_tex, t_sem, m.semantic_chans)
            with runtime.autocast(device, autocast_dtype):
                pred, proj = model(x_t, (t_tex, t_sem), y, return_repa=True)
            loss = sfd_loss(pred, target, repa_projection=proj, repa_target=repa, **loss_kw).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.mul_(cfg.ema_decay).add_(p, alpha=1 - cfg.ema_decay)

        return time_steps(step, args.warmup, args.steps, device)

    def trainer_step(compiled: bool) -> tuple[list[float], float]:
        model, ema, opt = fresh()
        loss_fn = functools.partial(sfd_loss, mask_clamped=False, **loss_kw)
        net = model
        if compiled:
            net, loss_fn = torch.compile(model), torch.compile(loss_fn)
        run_cfg = dataclasses.replace(cfg, kernels="compile" if compiled else "eager")
        step = trainer.TrainStep(run_cfg, net, model, ema, opt, loss_fn, runtime.Dist(0, 1, 0, device, False), B, autocast_dtype)
        try:
            return time_steps(lambda i: step(batch, i), args.warmup, args.steps, device)
        finally:
            torch._dynamo.reset()

    # The CPU may be shared: measure the peak before and after the steps and keep the higher one.
    peak_before = matmul_peak(device)
    results = {"reference_eager": reference_loop(), "trainer_eager": trainer_step(False)}
    if not args.no_compile:
        results["trainer_compiled"] = trainer_step(True)

    peak_after = matmul_peak(device)
    peak = max(peak_before, peak_after)
    flops = train_flops(m, B, with_repa=True)
    summary = {
        "model": args.model, "batch": B, "device": str(device), "precision": precision,
        "threads": torch.get_num_threads(), "params": count_params(m),
        "train_flops_per_step": flops, "matmul_peak_flops": peak,
        "matmul_peak_before_after": [peak_before, peak_after], "variants": {},
    }
    print(f"{args.model}, batch {B}, {precision} on {device} ({torch.get_num_threads()} threads)")
    print(
        f"analytic training FLOPs per step: {flops / 1e9:.1f} G; measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s "
        f"(before {peak_before / 1e9:.1f}, after {peak_after / 1e9:.1f})"
    )
    # Best step: on a shared CPU, other load only ever adds time, so the minimum is the estimate.
    print(f"{'variant':<18}{'best step s':>12}{'median s':>10}{'first s':>9}{'GFLOP/s':>9}{'of peak':>9}")
    for name, (times, first) in results.items():
        t, med = min(times), statistics.median(times)
        rate = flops / t
        summary["variants"][name] = {
            "step_s": t, "median_s": med, "steps_s": times, "first_s": first, "flops_per_s": rate,
            "fraction_of_peak": rate / peak,
        }
        print(f"{name:<18}{t:>12.3f}{med:>10.3f}{first:>9.2f}{rate / 1e9:>9.1f}{rate / peak:>9.1%}")
    ref = summary["variants"]["reference_eager"]["step_s"]
    for name in summary["variants"]:
        summary["variants"][name]["speedup_vs_reference"] = ref / summary["variants"][name]["step_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
