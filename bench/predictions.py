"""Predicted throughput of every GPU stage a user pays for, on one H100-SXM / H200, and the budget
of the whole recipe in GPU-hours. The one table docs/performance.md cites and bench/gpu.py prints
next to each measured number.

The arithmetic, per stage: ``items/s = peak × efficiency / FLOPs per item``, except the training
step, which comes from the byte/FLOP model of bench/budget.py (matmuls + attention + elementwise
bytes + parameter traffic). FLOPs per item are counted by ``torch.utils.flop_counter`` on the real
architectures (meta tensors, no weights; ``--count`` recounts them) and pinned below so the table
reads without running anything. Peaks: dense bf16 989 TFLOP/s and dense TF32 494.5 TFLOP/s
(tensor cores, no sparsity), fp32 67 TFLOP/s (no tensor cores) on both H100-SXM and H200; HBM
3.35 / 4.8 TB/s. Efficiencies are assumptions, stated per stage; the first GPU hour measures them.

    python bench/predictions.py            # the table and the recipe budget
    python bench/predictions.py --count    # recount the FLOPs per item (~30 s on a CPU)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.budget import model_numbers  # noqa: E402

DEVICES = {  # FLOP/s dense: bf16 and TF32 tensor cores, fp32 CUDA cores; HBM bytes/s
    "H100-SXM": {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12, "hbm": 3.35e12},
    "H200": {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12, "hbm": 4.8e12},
}

# FLOPs per item (2 per multiply-add), counted by `--count` with torch.utils.flop_counter.
FLOPS = {
    "LightningDiT-XL/1 forward": 237.27e9,  # one velocity evaluation, 256 tokens
    "LightningDiT-B/1 forward": 46.03e9,  # the AutoGuidance guide
    "texture VAE f16d32 encoder @256": 137.94e9,  # convolutions at 256² (ch 128): the encode job's big part
    "DINOv2-B/14 reg4 @224": 47.08e9,
    "Inception-v3 @299": 11.43e9,
}

# Assumed efficiencies (fraction of the dtype's dense peak reached end to end).
EFF = {
    "sampling": 0.50,  # inference GEMMs at batch 125-250 × 256 tokens, compiled, + elementwise; fp32/TF32 as the authors
    "encode": 0.40,  # convolutions with GroupNorm/SiLU at high resolution (memory-bound parts), bf16
    "inception": 0.50,  # fp32 convolutions without TF32 (eval/fid.py turns TF32 off for features)
}

# Measured NFE per sample: dopri5 with the authors' grid at atol 1e-6 / rtol 1e-3 needed 26
# evaluations on the closed-form Gaussian test (docs/performance.md, "Samplers"); the real
# model's count is measured by bench/gpu.py's sampling stage on the GPU (random weights there,
# so it too is an estimate until the released checkpoints run).
NFE = {"euler-250": 250, "dopri5": 26}

IMAGENET_TRAIN = 1_281_167
FLIPS = 2
FID_SAMPLES = 50_000
PAPER_STEPS, PAPER_BATCH = 4_000_000, 256


def stage_predictions(device: str, batch: int = 32) -> dict[str, dict]:
    """items/s and the arithmetic behind it, per stage, on ``device``."""
    d = DEVICES[device]
    out: dict[str, dict] = {}
    for model in ("LightningDiT-XL/1", "LightningDiT-B/1"):
        for opt, cast in (("torch", "autocast"), ("fused", "autocast"), ("fused", "optimizer")):
            p = model_numbers(model, batch, opt, weight_cast=cast)["predictions"]["H200" if device == "H200" else "H100-SXM"]
            for kernels in ("eager", "compile", "triton"):
                key = f"train {model} {kernels} optimizer={opt}" + (" weight_cast=optimizer" if cast == "optimizer" else "")
                out[key] = {
                    "img_per_s": p[kernels]["img_per_s"], "mfu": p[kernels]["mfu"], "step_ms": p[kernels]["step_ms"],
                    "how": f"bench/budget.py --batch {batch} --optimizer {opt} --weight-cast {cast}: matmul {p['matmul_ms']:.1f} + attention "
                           f"{p['attention_ms']:.1f} + elementwise {p[kernels]['elementwise_ms']:.1f} + parameters "
                           f"{p['param_traffic_ms']:.1f} ms per step of {batch}",
                }
    xl, b = FLOPS["LightningDiT-XL/1 forward"], FLOPS["LightningDiT-B/1 forward"]
    for solver, nfe in NFE.items():
        for guided in (False, True):
            flops = nfe * (xl + (b if guided else 0))
            rate = d["tf32"] * EFF["sampling"] / flops
            key = f"sample XL/1 {solver}{' + AutoGuidance (B/1 guide)' if guided else ''}"
            out[key] = {
                "img_per_s": rate, "hours_50k": FID_SAMPLES / rate / 3600,
                "how": f"{nfe} NFE × ({xl / 1e9:.0f}{f' + {b / 1e9:.0f}' if guided else ''}) GFLOP at "
                       f"{EFF['sampling']:.0%} of TF32 {d['tf32'] / 1e12:.0f} TFLOP/s",
            }
    enc = FLIPS * (FLOPS["texture VAE f16d32 encoder @256"] + FLOPS["DINOv2-B/14 reg4 @224"])
    out["encode (texture VAE + DINOv2-B/14, 2 flips)"] = {
        "img_per_s": d["bf16"] * EFF["encode"] / enc,
        "how": f"2 flips × ({FLOPS['texture VAE f16d32 encoder @256'] / 1e9:.0f} + {FLOPS['DINOv2-B/14 reg4 @224'] / 1e9:.0f}) "
               f"GFLOP at {EFF['encode']:.0%} of bf16 {d['bf16'] / 1e12:.0f} TFLOP/s (JPEG decoding runs on the CPUs beside it)",
    }
    inc = FLOPS["Inception-v3 @299"]
    out["Inception features"] = {
        "img_per_s": d["fp32"] * EFF["inception"] / inc,
        "how": f"{inc / 1e9:.1f} GFLOP at {EFF['inception']:.0%} of fp32 {d['fp32'] / 1e12:.0f} TFLOP/s (no TF32)",
    }
    return out


def recipe_budget(device: str) -> dict[str, dict]:
    """GPU-hours of the paper's recipe on ``device`` (one GPU's hours; divide by the GPU count)."""
    s = stage_predictions(device)
    train = s["train LightningDiT-XL/1 triton optimizer=fused weight_cast=optimizer"]["img_per_s"]
    enc = s["encode (texture VAE + DINOv2-B/14, 2 flips)"]["img_per_s"]
    fid = s["sample XL/1 dopri5 + AutoGuidance (B/1 guide)"]
    inc = s["Inception features"]["img_per_s"]
    return {
        "just encode imagenet": {
            "gpu_hours": IMAGENET_TRAIN / enc / 3600,
            "how": f"{IMAGENET_TRAIN:,} images × 2 flips at {enc:.0f} img/s (SemVAE training not included)",
        },
        "train XL/1, 4M steps at batch 256": {
            "gpu_hours": PAPER_STEPS * PAPER_BATCH / train / 3600,
            "how": f"{PAPER_STEPS * PAPER_BATCH:.3g} images at {train:.0f} img/s per GPU (kernels=triton, optimizer=fused, weight_cast=optimizer, batch 32/GPU)",
        },
        "one just paper-fid row": {
            "gpu_hours": fid["hours_50k"] + FID_SAMPLES / inc / 3600,
            "how": f"50K samples, dopri5 {NFE['dopri5']} NFE with AutoGuidance at {fid['img_per_s']:.1f} img/s, "
                   f"+ Inception at {inc:.0f} img/s",
        },
    }


PREDICTIONS = {dev: stage_predictions(dev) for dev in DEVICES}
RECIPE = {dev: recipe_budget(dev) for dev in DEVICES}


def device_key(name: str) -> str | None:
    """The PREDICTIONS key of a CUDA device name (None when there is no prediction for it)."""
    if "H200" in name:
        return "H200"
    if "H100" in name and "PCIe" not in name and "NVL" not in name:
        return "H100-SXM"
    return None


def count_flops() -> dict[str, float]:
    """Recount FLOPS on meta tensors (no weights, no device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sfd.config import DINO_PRESETS, TEXTURE_VAE_PRESETS, model_preset
    from sfd.models.autoencoder import AutoencoderKL
    from sfd.models.dino import DinoEncoder
    from sfd.models.inception import InceptionV3
    from sfd.models.lightningdit import LightningDiT

    def count(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())

    out = {}
    with torch.device("meta"):
        for name in ("LightningDiT-XL/1", "LightningDiT-B/1"):
            cfg = model_preset(name)
            m = LightningDiT(cfg)
            x, t = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size), torch.rand(1)
            out[f"{name} forward"] = count(lambda m=m, x=x, t=t: m(x, (t, t), torch.zeros(1, dtype=torch.long)))
        img = torch.randn(1, 3, 256, 256)
        vae = AutoencoderKL(TEXTURE_VAE_PRESETS["f16d32"])
        out["texture VAE f16d32 encoder @256"] = count(lambda: vae.quant_conv(vae.encoder(img)))
        dino = DinoEncoder(DINO_PRESETS["dinov2_vitb14_reg"], init_weights=False)
        out["DINOv2-B/14 reg4 @224"] = count(lambda: dino(img))
    inc = InceptionV3()  # its TF-style resize needs real tensors; weights are random
    out["Inception-v3 @299"] = count(lambda: inc(torch.zeros(1, 256, 256, 3, dtype=torch.uint8)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[-1])
    ap.add_argument("--count", action="store_true", help="recount the FLOPs per item and compare with the pinned table")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.count:
        for k, v in count_flops().items():
            print(f"{k}: {v / 1e9:.2f} GFLOP (pinned {FLOPS[k] / 1e9:.2f})")
    for dev, stages in PREDICTIONS.items():
        print(f"\n{dev}: predicted items/s per GPU")
        print("| stage | img/s | arithmetic |")
        print("|---|---|---|")
        for k, v in stages.items():
            extra = f", MFU {v['mfu']:.0%}" if "mfu" in v else (f", 50K in {v['hours_50k']:.2f} h" if "hours_50k" in v else "")
            print(f"| {k} | {v['img_per_s']:.1f}{extra} | {v['how']} |")
        print(f"\n{dev}: the recipe in GPU-hours")
        for k, v in RECIPE[dev].items():
            print(f"- {k}: {v['gpu_hours']:,.1f} GPU-h ({v['how']})")
    if args.json:
        args.json.write_text(json.dumps({"stages": PREDICTIONS, "recipe": RECIPE}, indent=2) + "\n")


if __name__ == "__main__":
    main()
