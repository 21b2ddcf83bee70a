"""The first GPU hour: every stage a user pays for, measured next to its prediction.

One prepared script for a first GPU session on one H100/H200. Stages run in priority order and
stop starting new runs at ``--budget-s`` (the rest are listed as skipped), so a session with a
fixed device allowance gets the most important numbers first. Next to every measured number it
prints the prediction of bench/predictions.py (the table docs/performance.md cites).

Stages (``--stages``, in this order):

``kernels``    the compiled Triton ``adaln_norm`` against eager at XL/1's shape (largest relative
               error per output and gradient), then its forward/backward time and bandwidth next
               to inductor's code and eager for the same chain.
``train``      the training step of XL/1 (then B/1) at the paper's per-GPU batch (256 over 8
               GPUs = 32), bf16 autocast, REPA on, the one-pass AdamW + EMA of sfd/optim.py —
               per ``kernels`` setting (compile, triton first; eager last), and triton with
               ``weight_cast=optimizer`` (bf16 weight copies written by the one pass, right after
               triton): step time (median, min-max), img/s, MFU (model FLOPs / dense bf16 peak),
               peak memory, optimizer time.
``sample``     XL/1 sampling at batch ``--sample-batch``, fp32 + TF32 as the authors: Euler with
               250 steps and dopri5 at the paper's tolerances (atol 1e-6, rtol 1e-3, authors'
               grid), each without and with AutoGuidance (B/1 guide), compiled and eager: NFE,
               samples/s and the predicted hours for 50,000 samples.
``encode``     the encode job's per-image cost: texture VAE f16d32 encoder + DINOv2-B/14 (random
               weights of the real architectures) on both flips in bf16 autocast: img/s per GPU.
``inception``  Inception-v3 feature extraction in fp32 (no TF32, as eval/fid.py): img/s.
``optimizer``  the per-parameter update alone (bench/param_pass.py): torch's AdamW + EMA lerp
               against sfd/optim.py's one pass, and the pass writing the bf16 weight copies
               against the pass + autocast's cast; half of XL/1's blocks.

Writes JSON (``--out``) and one ``SUMMARY`` line. Without CUDA it says so and exits 0;
``--smoke`` runs every stage on the CPU at tiny sizes (figures mean nothing) so the script is
checked before device time is spent (tests/test_gpu_bench.py).

    python bench/gpu.py --out runs/bench/gpu.json              # or: just bench-gpu
    python bench/gpu.py --stages sample encode --budget-s 300
    python bench/gpu.py --smoke --out /tmp/gpu-smoke.json
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import param_pass  # noqa: E402
from bench.budget import model_numbers  # noqa: E402
from bench.predictions import PREDICTIONS, device_key  # noqa: E402
from sfd import optim, weight_copies  # noqa: E402
from sfd.config import DINO_PRESETS, TEXTURE_VAE_PRESETS, SamplingConfig, model_preset  # noqa: E402
from sfd.diffusion import sfd_loss  # noqa: E402
from sfd.guidance import build_velocity_fn, compile_mode, compile_velocity_fn  # noqa: E402
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


def train_step_run(name: str, kernels: str, batch: int, warmup: int, steps: int, dev: torch.device,
                   weight_cast: str = "autocast") -> dict:
    policy = resolve(kernels, dev)
    cfg = model_preset(name)
    torch.manual_seed(0)
    model = LightningDiT(cfg).to(dev).train()
    model.use_kernels(policy.fused)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # weight_cast=optimizer: bf16 copies the one pass writes and the forward reads (sfd/weight_copies.py).
    copies = weight_copies.attach(model, torch.bfloat16) if weight_cast == "optimizer" else None
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = [e for p, e in zip(model.parameters(), ema.parameters()) if p.requires_grad]
    opt = optim.build_optimizer(
        "fused", params, ema_params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, ema_decay=0.9999,
        grad_clip=0.0, compiled=policy.compile, device=dev,
    )
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
    # bf16 autocast on the GPU; in the CPU smoke only where the copies need it (their code path).
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" or copies is not None)

    def step() -> None:
        with torch.autocast(**amp):
            pred, proj = net(x_t, (t_tex, t_sem), y, return_repa=True, force_drop_ids=drop)
        terms = loss_fn(pred, target, repa_projection=proj, repa_target=repa_target, t_tex=t_tex, t_sem=t_sem)
        terms.total.backward()
        norm = optim.grad_norm(opt, params, 0.0)
        with Timer(dev.type == "cuda") as t:
            optim.update(opt, params, ema_params, 0.9999, norm, copies)
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
        "model": name, "kernels": kernels, "weight_cast": weight_cast, "policy": policy.note, "batch": batch, "step": summary(times),
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


OPTIMIZER_VARIANTS = ("torch", "fused", "fused+cast", "fused+copies")


def optimizer_run(name: str, dev: torch.device, rounds: int, smoke: bool) -> dict:
    """torch's AdamW + EMA lerp against the one pass, and the one pass writing the bf16 copies
    against it followed by autocast's cast (bench/param_pass.py), interleaved. Half of XL/1's
    blocks (≈ 340 M parameters): four variants' states then fit an 80 GB GPU; ms per M params scale."""
    # The smoke test keeps one compile of the pass (CPU compiles take minutes): the copies' one.
    variants = ("torch", "fused+cast", "fused+copies") if smoke else OPTIMIZER_VARIANTS
    return param_pass.bench_model(name, 2 if smoke else 14, rounds, 0.0, dev, variants)


# ---------------------------------------------------------------------------------------------
# 4. Sampling


def random_dit(name: str, dev: torch.device, seed: int) -> LightningDiT:
    """Random weights of the real architecture; the zero-initialised output layers are perturbed so
    the velocity is not 0 (dopri5's step control would then have nothing to control)."""
    torch.manual_seed(seed)
    model = LightningDiT(model_preset(name))
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.02)
    return model.to(dev).eval()


def sampling_run(main_name: str, guide_name: str | None, method: str, compiled: bool, batch: int, dev: torch.device,
                 smoke: bool) -> dict:
    from sfd.samplers import generate_latents

    model = random_dit(main_name, dev, 0)
    guide = random_dit(guide_name, dev, 1) if guide_name else None
    kw: dict = {"method": method, "seed": 0}
    if method == "euler":
        kw |= {"num_steps": 4 if smoke else 250, "grid": "authors"}
    else:
        kw |= {"atol": 1e-6, "rtol": 1e-3, "grid": "authors"}  # the paper's protocol (eval/paper_fid.py)
    if guide is not None:
        kw |= {"guide_ckpt": f"random {guide_name}", "ag_scale": 1.5}
    # The path sample/grid.py and eval/fid.py gen take: the guided velocity function built once and
    # compiled by SamplingConfig.compile (CUDA graphs on CUDA), shared by every batch.
    sampling = SamplingConfig(**kw, compile="on" if compiled else "off")
    how = f"compile_velocity_fn ({compile_mode(sampling.compile, dev)})" if compiled else "eager"
    fn = compile_velocity_fn(build_velocity_fn(model, sampling, guide), batch, compile_mode(sampling.compile, dev))
    labels, indices = [i % 1000 if not smoke else i % 10 for i in range(batch)], list(range(batch))
    t0 = time.perf_counter()
    warm = dataclasses.replace(sampling, num_steps=2) if method == "euler" else sampling
    generate_latents(model, labels, indices, warm, guide, fn=fn)  # compile and warm-up
    sync(dev)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, nfe = generate_latents(model, labels, indices, sampling, guide, fn=fn)
    sync(dev)
    seconds = time.perf_counter() - t0
    rate = batch / seconds
    torch._dynamo.reset()
    return {
        "model": main_name, "guide": guide_name, "method": method, "compiled": compiled, "compile_how": how,
        "batch": batch, "nfe": nfe, "seconds": seconds, "first_call_s": first_s, "img_per_s": rate,
        "hours_50k": 50_000 / rate / 3600, "precision": "fp32 + TF32" if dev.type == "cuda" else "fp32",
    }


# ---------------------------------------------------------------------------------------------
# 5. The encode job's models, 6. Inception


def encode_run(batch: int, dev: torch.device, warmup: int, steps: int, smoke: bool) -> dict:
    from sfd.models.autoencoder import AutoencoderKL
    from sfd.models.dino import DinoEncoder

    tex_cfg = TEXTURE_VAE_PRESETS["tiny" if smoke else "f16d32"]
    dino_cfg = DINO_PRESETS["tiny" if smoke else "dinov2_vitb14_reg"]
    torch.manual_seed(0)
    vae = AutoencoderKL(tex_cfg).to(dev).eval()
    dino = DinoEncoder(dino_cfg).to(dev).eval()
    size = tex_cfg.resolution if smoke else 256
    x = torch.rand(2 * batch, 3, size, size, device=dev) * 2 - 1  # both flips of `batch` images in [-1, 1]
    amp = dict(device_type=dev.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def step() -> None:
        with torch.autocast(**amp):  # the encode job's --precision bf16
            vae.encode(x)
            dino(x)

    times = cuda_time(step, warmup, steps, dev)
    return {"texture_vae": "tiny" if smoke else "f16d32", "dino": "tiny" if smoke else "dinov2_vitb14_reg",
            "images_per_batch": batch, "step": summary(times), "img_per_s": batch / statistics.median(times),
            "precision": "bf16 autocast"}


def inception_run(batch: int, dev: torch.device, warmup: int, steps: int, smoke: bool) -> dict:
    from sfd.models.inception import InceptionV3

    torch.manual_seed(0)
    net = InceptionV3().to(dev).eval()
    images = torch.randint(0, 256, (batch, 64 if smoke else 256, 64 if smoke else 256, 3), dtype=torch.uint8, device=dev)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as eval/fid.py
    try:
        with torch.no_grad():
            times = cuda_time(lambda: net(images), warmup, steps, dev)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    return {"batch": batch, "step": summary(times), "img_per_s": batch / statistics.median(times), "precision": "fp32, no TF32"}


STAGES = ("kernels", "train", "sample", "encode", "inception", "optimizer")


def predicted(pred: dict | None, key: str, field: str = "img_per_s") -> str:
    """`` (predicted X)`` from bench/predictions.py, or nothing without a prediction."""
    if pred is None or key not in pred:
        return " (no prediction for this device)"
    v = pred[key]
    extra = f", MFU {v['mfu']:.0%}" if field == "img_per_s" and "mfu" in v else ""
    return f" (predicted {v[field]:.1f} img/s{extra})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Stages"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/gpu.json"))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to run (priority order kept)")
    ap.add_argument("--batch", type=int, default=32, help="per-GPU training batch (paper: 256 over 8 GPUs)")
    ap.add_argument("--models", nargs="+", default=["LightningDiT-XL/1", "LightningDiT-B/1"], help="training models")
    ap.add_argument("--kernels", nargs="+", default=["compile", "triton", "eager"])
    ap.add_argument("--sample-batch", type=int, default=125, help="samples per sampling batch")
    ap.add_argument("--encode-batch", type=int, default=64, help="images per encode batch (x2 flips)")
    ap.add_argument("--inception-batch", type=int, default=250)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=600, help="stop starting new runs after this many seconds (480 fits a 15-min device allowance)")
    ap.add_argument("--smoke", action="store_true", help="every stage on the CPU at tiny sizes, wall-clock timers")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.batch, args.warmup, args.steps = ["tiny"], 4, 1, 2
        args.sample_batch, args.encode_batch, args.inception_batch = 2, 2, 2
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device on this machine, nothing measured (see docs/performance.md for the command)")
        return
    else:
        dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # the trainer's and the samplers' default
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke test: figures mean nothing)"
    key = device_key(name) if dev.type == "cuda" else None
    pred = PREDICTIONS.get(key) if key else None
    sheet = datasheet(name)
    t_start = time.perf_counter()
    bandwidth = copy_bandwidth(dev)
    result = {
        "device": name, "torch": torch.__version__, "datasheet_flops_bw": sheet, "copy_bandwidth_gbps": bandwidth / 1e9,
        "prediction_device": key, "train": [], "kernels": [], "sample": [], "encode": [], "inception": [],
        "optimizer": [], "skipped": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    # Priority order: the kernel check (quick), the first model's compiled training step (the
    # claim), then what a user pays for after training — sampling, encoding, Inception — then
    # the optimizer alone, the remaining models and eager.
    first, *rest = args.models
    sample_name, guide_name = ("tiny", "tiny") if args.smoke else ("LightningDiT-XL/1", "LightningDiT-B/1")
    plan: list[tuple] = [("kernels",)]
    plan += [("train", first, k) for k in args.kernels if k != "eager"]
    # weight_cast=optimizer with triton: the setting of the 45 % MFU prediction (with --kernels
    # lacking triton, e.g. the smoke test's, the first setting given).
    plan.append(("train", first, "triton" if "triton" in args.kernels else args.kernels[0], "optimizer"))
    for method in ("dopri5", "euler"):
        for guide in (guide_name, None):
            # --smoke: one compiled sampler (the code path), the other three eager (CPU compiles are slow)
            compiled = not args.smoke or (method == "dopri5" and guide is not None)
            plan.append(("sample", sample_name, guide, method, compiled))
    plan += [("encode",), ("inception",), ("optimizer", first)]
    plan += [("sample", sample_name, guide_name, "dopri5", False)]  # compiled vs eager
    plan += [("train", m, k) for m in rest for k in args.kernels if k != "eager"]
    plan += [("train", m, k) for m in args.models for k in args.kernels if k == "eager"]
    plan = [p for p in plan if p[0] in args.stages]
    for what, *spec in plan:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            result["skipped"].append({"run": [what, *spec], "why": f"time budget ({elapsed:.0f} s > {args.budget_s:.0f} s)"})
            continue
        try:
            if what == "kernels":
                rows = kernel_run(dev, bandwidth, args.warmup, args.steps, (2, 16, 72) if args.smoke else (32, 256, 1152))
                result["kernels"] += rows
                for r in rows:
                    print(f"adaln_norm {r['variant']}: fwd {r['fwd_ms']:.3f} ms ({r['fwd_of_copy_bw']:.0%} of copy BW), "
                          f"bwd {r['bwd_ms']:.3f} ms ({r['bwd_of_copy_bw']:.0%})", flush=True)
            elif what == "train":
                model, kernels, *cast = spec
                cast = cast[0] if cast else "autocast"
                r = train_step_run(model, kernels, args.batch, args.warmup, args.steps, dev, cast)
                result["train"].append(r)
                setting = kernels + (" weight_cast=optimizer" if cast == "optimizer" else "")
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (unknown device peak)"
                mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
                print(f"train {model} {setting}: {r['step']['median_s'] * 1e3:.1f} ms/step "
                      f"[{r['step']['min_s'] * 1e3:.1f}-{r['step']['max_s'] * 1e3:.1f}], {r['img_per_s']:.0f} img/s"
                      f"{predicted(pred, f'train {model} {kernels} optimizer=fused' + setting[len(kernels):])}, "
                      f"MFU {mfu}, peak memory {mem}, optimizer+EMA (one pass) "
                      f"{r['optimizer_ema']['median_s'] * 1e3:.1f} ms, first step {r['first_step_s']:.0f} s", flush=True)
            elif what == "sample":
                model, guide, method, compiled = spec
                r = sampling_run(model, guide, method, compiled, args.sample_batch, dev, args.smoke)
                result["sample"].append(r)
                solver = "euler-250" if method == "euler" else "dopri5"
                pkey = f"sample XL/1 {solver}{' + AutoGuidance (B/1 guide)' if guide else ''}"
                print(f"sample {model}{' + AutoGuidance ' + guide if guide else ''} {method} "
                      f"({'compiled: ' + r['compile_how'] if compiled else 'eager'}): NFE {r['nfe']}, "
                      f"{r['img_per_s']:.2f} img/s{predicted(pred, pkey)}, 50K samples in {r['hours_50k']:.2f} h"
                      + (f" (predicted {pred[pkey]['hours_50k']:.2f} h)" if pred else "")
                      + f", first call {r['first_call_s']:.0f} s", flush=True)
            elif what == "encode":
                r = encode_run(args.encode_batch, dev, args.warmup, args.steps, args.smoke)
                result["encode"].append(r)
                print(f"encode {r['texture_vae']} + {r['dino']} (2 flips, {r['precision']}): {r['img_per_s']:.1f} img/s"
                      f"{predicted(pred, 'encode (texture VAE + DINOv2-B/14, 2 flips)')}", flush=True)
            elif what == "inception":
                r = inception_run(args.inception_batch, dev, args.warmup, args.steps, args.smoke)
                result["inception"].append(r)
                print(f"inception ({r['precision']}): {r['img_per_s']:.1f} img/s{predicted(pred, 'Inception features')}", flush=True)
            elif what == "optimizer":
                (model,) = spec
                r = optimizer_run(model, dev, 3 if args.smoke else 7, args.smoke)
                result["optimizer"].append(r)
                print(f"optimizer {model} ({r['params'] / 1e6:.0f} M params): " + ", ".join(
                    f"{v} {r[v]['median_ms']:.2f} ms [{r[v]['min_ms']:.2f}-{r[v]['max_ms']:.2f}] "
                    f"({r[v]['bytes_per_param']} B/param, {r[v]['effective_gb_s']:.0f} GB/s)"
                    for v in OPTIMIZER_VARIANTS if v in r), flush=True)
        except Exception as e:  # one failing setting must not cost the session its other numbers
            result["skipped"].append({"run": [what, *spec], "why": f"{type(e).__name__}: {e}"[:500]})
            print(f"{what} {spec}: FAILED {type(e).__name__}: {e}", flush=True)
            torch._dynamo.reset()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        save()
    result["seconds"] = time.perf_counter() - t_start
    save()
    parts = [f"{r['model'].split('-')[-1]} {r['kernels']}{'+copies' if r['weight_cast'] == 'optimizer' else ''} {r['img_per_s']:.0f} img/s"
             + (f" MFU {r['mfu']:.0%}" if r["mfu"] else "") for r in result["train"]]
    parts += [f"sample {r['method']}{'+AG' if r['guide'] else ''}{' compiled' if r['compiled'] else ''} "
              f"{r['img_per_s']:.2f} img/s" for r in result["sample"]]
    parts += [f"encode {r['img_per_s']:.0f} img/s" for r in result["encode"]]
    parts += [f"inception {r['img_per_s']:.0f} img/s" for r in result["inception"]]
    print(f"SUMMARY {name}: " + "; ".join(parts) + f"; {len(result['skipped'])} skipped; JSON {args.out}")


if __name__ == "__main__":
    main()
