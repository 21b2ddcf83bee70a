"""GPU training throughput per kernel setting, and the fused kernels against what they replace.

One prepared script for a first GPU session (~8 min on one H100/H200 with the defaults):

1. the training step of LightningDiT XL/1 and B/1 at the paper's per-GPU batch (256 over 8
   GPUs = 32), bf16 autocast, REPA on, fused AdamW, EMA every step — for each
   ``kernels`` setting (eager | compile | triton): step time (median and spread over timed
   steps), img/s, MFU (model FLOPs / the device's dense bf16 peak), peak memory, and the time of
   optimizer + EMA alone;
2. per kernel: ``adaln_norm`` forward and backward at XL/1's shape against the compiled
   (inductor) and eager references — time, bytes by the budget in bench/budget.py, achieved
   bandwidth against a measured copy bandwidth and the datasheet peak;
3. the optimizer + EMA as in the trainer (fused AdamW, foreach lerp) against one compiled
   function doing both (the next candidate of docs/performance.md).

The step is the trainer's (train/main.py TrainStep) reduced to one process: the same forward,
sfd_loss, backward, fused AdamW and foreach EMA lerp; data are random tensors of the real shapes.
Runs go in priority order and stop at ``--budget-s`` (the rest are listed as skipped), so a
session with a fixed device allowance always gets the most important numbers.

Writes JSON (``--out``) and prints one summary line. On a machine without CUDA it says so and
exits 0.

    python bench/gpu.py --out runs/bench/gpu.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.budget import model_numbers  # noqa: E402
from sfd.config import model_preset  # noqa: E402
from sfd.diffusion import sfd_loss  # noqa: E402
from sfd.kernels import resolve  # noqa: E402
from sfd.kernels.adaln_norm import adaln_norm, reference  # noqa: E402
from sfd.models.lightningdit import LightningDiT  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity) and HBM bandwidth by device name.
DATASHEET = {
    "H200": (989e12, 4.8e12),
    "H100 SXM": (989e12, 3.35e12),
    "H100 80GB HBM3": (989e12, 3.35e12),
    "H100 NVL": (835e12, 3.9e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H100": (989e12, 3.35e12),
    "H800": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
    "L40S": (362e12, 0.864e12),
}


def datasheet(name: str) -> tuple[float, float] | None:
    for key, value in DATASHEET.items():  # most specific first
        if key in name:
            return value
    return None


class Timer:
    """CUDA events on a GPU; wall clock in ``--smoke`` mode on the CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        if cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.t1 - self.t0


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cuda_time(fn, warmup: int, steps: int, dev: torch.device | None = None) -> list[float]:
    """Seconds per call, each call timed with CUDA events (wall clock off CUDA)."""
    cuda = dev is None or dev.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        with Timer(cuda) as t:
            fn()
        times.append(t.seconds())
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def copy_bandwidth(dev: torch.device) -> float:
    """Achievable HBM bandwidth (bytes/s): a 1 GiB device-to-device copy, read + write."""
    src = torch.empty(2**28 if dev.type == "cuda" else 2**22, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    t = statistics.median(cuda_time(lambda: dst.copy_(src), 3, 10, dev))
    return 2 * src.numel() * 4 / t


# ---------------------------------------------------------------------------------------------
# 1. The training step


def train_step_run(name: str, kernels: str, batch: int, warmup: int, steps: int, dev: torch.device) -> dict:
    policy = resolve(kernels, dev)
    cfg = model_preset(name)
    torch.manual_seed(0)
    model = LightningDiT(cfg).to(dev).train()
    model.use_kernels(policy.fused)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = [e for p, e in zip(model.parameters(), ema.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    loss_fn = functools.partial(sfd_loss, semantic_chans=cfg.semantic_chans, repa_weight=1.0, repa_mode="cos")
    net = model
    if policy.compile:
        net, loss_fn = torch.compile(model), torch.compile(loss_fn)

    g = cfg.input_size
    x_t = torch.randn(batch, cfg.in_channels, g, g, device=dev)
    target = torch.randn_like(x_t)
    t_sem = torch.rand(batch, device=dev)
    t_tex = (t_sem - 0.3).clamp_min(0)
    y = torch.randint(0, cfg.num_classes, (batch,), device=dev)
    drop = (torch.rand(batch, device=dev) < 0.1).long()
    repa_target = torch.randn(batch, (g // cfg.patch_size) ** 2, cfg.repa_target_dim, device=dev)
    opt_times: list[Timer] = []
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step() -> None:
        with torch.autocast(**amp):
            pred, proj = net(x_t, (t_tex, t_sem), y, return_repa=True, force_drop_ids=drop)
        terms = loss_fn(pred, target, repa_projection=proj, repa_target=repa_target, t_tex=t_tex, t_sem=t_sem)
        terms.total.backward()
        torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        with Timer(dev.type == "cuda") as t:
            opt.step()
            torch._foreach_lerp_(ema_params, params, 1e-4)
        opt.zero_grad(set_to_none=True)
        opt_times.append(t)

    t0 = time.perf_counter()
    step()  # compile (when compiling) and the optimizer states
    sync(dev)
    first_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    opt_times.clear()
    times = cuda_time(step, warmup, steps, dev)
    opt_s = [t.seconds() for t in opt_times[warmup:]]
    flops_img = model_numbers(name, batch)["train_gflop_per_image"] * 1e9
    peak_flops = datasheet(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    med = statistics.median(times)
    out = {
        "model": name, "kernels": kernels, "policy": policy.note, "batch": batch, "step": summary(times),
        "first_step_s": first_s, "img_per_s": batch / med, "optimizer_ema": summary(opt_s),
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "model_gflop_per_image": flops_img / 1e9,
        "mfu": flops_img * batch / med / peak_flops[0] if peak_flops else None,
    }
    torch._dynamo.reset()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# 2. The kernel against what it replaces


def kernel_run(dev: torch.device, bandwidth: float, warmup: int, steps: int, shape=(32, 256, 1152)) -> list[dict]:
    """adaln_norm at XL/1's shape, batch 32, in the autocast layout (fp32 residual, bf16 rest)."""
    B, N, D = shape
    torch.manual_seed(0)
    x = torch.randn(B, N, D, device=dev, requires_grad=True)
    y = torch.randn(B, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gate, shift, scale = (torch.randn(B, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    w = torch.ones(D, device=dev, requires_grad=True)
    inputs = (x, y, gate, w, shift, scale)
    dh = torch.randn(B, N, D, device=dev, dtype=torch.bfloat16)
    dres = torch.randn(B, N, D, device=dev)
    # Bytes by the budget (bench/budget.py): fwd R x4 y2 W res4 h2 = 12 B/elem; bwd R dh2 res4
    # y2 dres4 W dx4 dy2 = 18 B/elem. The same bytes are the minimum for every variant.
    elems = B * N * D
    fwd_bytes, bwd_bytes = 12 * elems, 18 * elems
    compiled_ref = torch.compile(reference)
    variants = {"triton": adaln_norm, "inductor": compiled_ref, "eager": reference}
    rows = []

    # First, correctness of the compiled Triton kernel (the CPU tests ran the interpreter):
    # largest difference to eager, relative to the largest magnitude, per output and gradient.
    errors = {}
    outs = {}
    for name in ("triton", "eager"):
        h, res = variants[name](*inputs, 1e-6, torch.bfloat16)
        grads = torch.autograd.grad((h, res), inputs, (dh, dres))
        outs[name] = [h, res, *grads]
    for label, a, b in zip(("h", "res", "dx", "dy", "dgate", "dweight", "dshift", "dscale"), outs["triton"], outs["eager"]):
        errors[label] = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
    print("adaln_norm triton vs eager, max relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    del outs
    for name, fn in variants.items():
        def fwd(fn=fn):
            return fn(*inputs, 1e-6, torch.bfloat16)

        def fwd_bwd(fn=fn):
            h, res = fn(*inputs, 1e-6, torch.bfloat16)
            torch.autograd.backward((h, res), (dh, dres))

        t_fwd = statistics.median(cuda_time(fwd, warmup, steps, dev))
        t_all = statistics.median(cuda_time(fwd_bwd, warmup, steps, dev))
        t_bwd = max(t_all - t_fwd, 1e-9)
        rows.append({
            "kernel": "adaln_norm (gated residual + RMSNorm + modulate)", "variant": name,
            "shape": [B, N, D], "fwd_ms": 1e3 * t_fwd, "bwd_ms": 1e3 * t_bwd,
            "fwd_gbps": fwd_bytes / t_fwd / 1e9, "bwd_gbps": bwd_bytes / t_bwd / 1e9,
            "fwd_of_copy_bw": fwd_bytes / t_fwd / bandwidth, "bwd_of_copy_bw": bwd_bytes / t_bwd / bandwidth,
            "max_rel_error_vs_eager": errors if name == "triton" else None,
        })
        for t in inputs:
            t.grad = None
    torch._dynamo.reset()
    return rows


# ---------------------------------------------------------------------------------------------
# 3. Optimizer + EMA


def optimizer_run(name: str, dev: torch.device, warmup: int, steps: int) -> dict:
    cfg = model_preset(name)
    model = LightningDiT(cfg).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {"model": name, "params": sum(p.numel() for p in params)}
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)  # fused AdamW exists on CPU too

    def fused_step():
        fused.step()
        torch._foreach_lerp_(ema, params, 1e-4)

    out["fused_adamw_foreach_ema"] = summary(cuda_time(fused_step, warmup, steps, dev))
    # A float lr is a constant to dynamo (no recompiles: it never changes here).
    compiled_opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    @torch.compile(fullgraph=False)
    def compiled_step():
        compiled_opt.step()
        torch._foreach_lerp_(ema, params, 1e-4)

    try:
        out["compiled_adamw_and_ema"] = summary(cuda_time(compiled_step, warmup + 2, steps, dev))
    except Exception as e:  # report, do not lose the rest of the session
        out["compiled_adamw_and_ema"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    torch._dynamo.reset()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/gpu.json"))
    ap.add_argument("--batch", type=int, default=32, help="per-GPU batch (paper: 256 over 8 GPUs)")
    ap.add_argument("--models", nargs="+", default=["LightningDiT-XL/1", "LightningDiT-B/1"])
    ap.add_argument("--kernels", nargs="+", default=["compile", "triton", "eager"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting new runs after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="check the script on the CPU: tiny model, wall-clock timers")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.batch, args.warmup, args.steps = ["tiny"], 4, 1, 2
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device on this machine, nothing measured (see docs/performance.md for the command)")
        return
    else:
        dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke test: figures mean nothing)"
    sheet = datasheet(name)
    t_start = time.perf_counter()
    bandwidth = copy_bandwidth(dev)
    result = {
        "device": name, "torch": torch.__version__, "datasheet_flops_bw": sheet, "copy_bandwidth_gbps": bandwidth / 1e9,
        "train": [], "kernels": [], "optimizer": [], "skipped": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    # Priority order: the kernel check is quick and is what this branch changes; then XL/1
    # compile vs triton (the claim), the optimizer, eager XL/1, then B/1.
    plan = [("kernels", None, None)]
    for i, model in enumerate(args.models):
        plan += [("train", model, k) for k in args.kernels if k != "eager"]
        if i == 0:
            plan.append(("optimizer", model, None))
        plan += [("train", model, k) for k in args.kernels if k == "eager"]
    for what, model, kernels in plan:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            result["skipped"].append({"run": [what, model, kernels], "why": f"time budget ({elapsed:.0f} s > {args.budget_s:.0f} s)"})
            continue
        try:
            if what == "kernels":
                rows = kernel_run(dev, bandwidth, args.warmup, args.steps, (2, 16, 72) if args.smoke else (32, 256, 1152))
                result["kernels"] += rows
                for r in rows:
                    print(f"adaln_norm {r['variant']}: fwd {r['fwd_ms']:.3f} ms ({r['fwd_of_copy_bw']:.0%} of copy BW), "
                          f"bwd {r['bwd_ms']:.3f} ms ({r['bwd_of_copy_bw']:.0%})", flush=True)
            elif what == "optimizer":
                result["optimizer"].append(optimizer_run(model, dev, args.warmup, args.steps))
                print(f"optimizer {model}: {json.dumps(result['optimizer'][-1])}", flush=True)
            else:
                r = train_step_run(model, kernels, args.batch, args.warmup, args.steps, dev)
                result["train"].append(r)
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (unknown device peak)"
                mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
                print(f"{model} {kernels}: {r['step']['median_s'] * 1e3:.1f} ms/step "
                      f"[{r['step']['min_s'] * 1e3:.1f}-{r['step']['max_s'] * 1e3:.1f}], {r['img_per_s']:.0f} img/s, "
                      f"MFU {mfu}, peak memory {mem}, optimizer+EMA "
                      f"{r['optimizer_ema']['median_s'] * 1e3:.1f} ms, first step {r['first_step_s']:.0f} s", flush=True)
        except Exception as e:  # one failing setting must not cost the session its other numbers
            result["skipped"].append({"run": [what, model, kernels], "why": f"{type(e).__name__}: {e}"[:500]})
            print(f"{what} {model} {kernels}: FAILED {type(e).__name__}: {e}", flush=True)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        save()
    result["seconds"] = time.perf_counter() - t_start
    save()
    parts = [f"{r['model'].split('-')[-1]} {r['kernels']} {r['img_per_s']:.0f} img/s"
             + (f" MFU {r['mfu']:.0%}" if r["mfu"] else "") for r in result["train"]]
    print(f"SUMMARY {name}: " + "; ".join(parts) + f"; {len(result['skipped'])} skipped; JSON {args.out}")


if __name__ == "__main__":
    main()
