"""Byte/FLOP budget of a LightningDiT training step on an H100/H200: which non-matmul chains
cost what in eager, compiled and fused form, and what each fused kernel should win.

An analytic model (no device needed), written down so that the GPU run (bench/gpu.py) can check
it: per token and per block, the bytes each elementwise/reduction chain moves between the
matmuls, under three settings —

- eager: every aten op reads its inputs and writes its output (autocast bf16: the residual
  stream stays fp32, branch outputs and matmul inputs are bf16, norms compute in fp32);
- compile: inductor fuses each chain between two matmuls/SDPA into one kernel in the forward;
  in the backward it cannot fuse the row reduction of an RMSNorm gradient (over D) with the
  column reductions of its adaLN/weight gradients (over tokens), so those re-read their inputs;
- triton: the `adaln_norm` op of sfd/kernels (one pass forward, one pass backward incl. column
  sums), across blocks: each MLP residual is added inside the next block's norm1 pass (as built;
  the first integration kept it within a block: "triton, within a block" for comparison).

Plus the per-parameter traffic of the optimizer step and of the weights' bf16 casts
(``--optimizer``, ``--weight-cast``).

Usage: python bench/budget.py [--batch 32] [--optimizer fused|torch] [--weight-cast autocast|optimizer] [--clip] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfd.config import model_preset  # noqa: E402
from sfd.models.lightningdit import count_params  # noqa: E402

DEVICES = {  # dense bf16 FLOP/s (no sparsity), HBM bytes/s
    "H100-SXM": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
}
# Efficiencies assumed for the prediction (the GPU run measures them).
MATMUL_EFF = 0.70  # of dense peak, GEMMs of 8192 tokens x 768..4608
ATTN_EFF = 0.35  # flash attention at N = 256, head_dim 64/72: short sequences
HBM_EFF = 0.80  # of peak bandwidth for streaming elementwise kernels


@dataclass(frozen=True)
class Chain:
    """Bytes per token of one chain, in units of D (hidden) and Hf (SwiGLU hidden) elements' bytes."""

    name: str
    fwd: tuple[float, float]  # (coefficient of D, coefficient of Hf)
    bwd: tuple[float, float]
    note: str

    def bytes(self, D: int, Hf: int, which: str) -> float:
        a, b = getattr(self, which)
        return a * D + b * Hf


# Bytes per token per block. Derivations in docs/performance.md ("Byte budget"): fp32 = 4,
# bf16 = 2 bytes; (D, Hf) coefficients.
EAGER = [
    Chain("norm1 + modulate + cast", (50, 0), (100, 0), "RMSNorm 28 (pow, mean, 2 muls on fp32), modulate 16, bf16 cast 6"),
    Chain("qk RMSNorm + RoPE", (184, 0), (368, 0), "per q and k: norm 40 (fp32 round trip), RoPE 52 (cos, rotate, stack, sin, add, cast)"),
    Chain("attn gated residual", (14, 0), (28, 0), "gate*a 4, x + 10"),
    Chain("norm2 + modulate + cast", (50, 0), (100, 0), "as norm1"),
    Chain("SwiGLU", (0, 10), (0, 20), "silu 4, mul 6"),
    Chain("MLP gated residual", (14, 0), (28, 0), "as attention's"),
]
COMPILE = [
    Chain("MLP residual(prev) + norm1 + modulate", (12, 0), (34, 0),
          "fwd R x4 m2 W x4 h2; bwd: row-reduction kernel 16 (dh2 x4 dres4 -> dx4 dm2), "
          "dscale/dshift 6, dweight 6, dgate 6 (column sums re-read their inputs)"),
    Chain("qk RMSNorm + RoPE", (8, 0), (24, 0), "fwd R q,k 4 W 4; bwd 12 + dv into dqkv 4 + two weight-grad sums 8"),
    Chain("attn residual + norm2 + modulate", (12, 0), (34, 0), "as above"),
    Chain("SwiGLU", (0, 6), (0, 10), "fwd R 4 W 2; bwd R 6 W 4: one kernel each way already"),
]
TRITON_IN_BLOCK = [
    Chain("norm1 + modulate (adaln_norm)", (6, 0), (10, 0), "fwd R x4 W h2; bwd R dh2 x4 W dx4"),
    Chain("MLP gated residual (left to inductor)", (10, 0), (24, 0),
          "fwd R x4 m2 W x4; bwd dm, dgate 12 + the add of norm1's dx to the residual grad 12"),
    Chain("qk RMSNorm + RoPE (inductor)", (8, 0), (24, 0), "unchanged"),
    Chain("attn residual + norm2 + modulate (adaln_norm)", (12, 0), (18, 0),
          "fwd R x4 a2 W x4 h2; bwd R dh2 res4 a2 dres4 W dx4 da2 (+ partial sums)"),
    Chain("SwiGLU (inductor)", (0, 6), (0, 10), "unchanged"),
]
TRITON_ACROSS = [
    Chain("MLP residual(prev) + norm1 + modulate (adaln_norm)", (12, 0), (18, 0), "the residual of block i-1 fused into block i's norm1"),
    Chain("qk RMSNorm + RoPE (inductor)", (8, 0), (24, 0), "unchanged"),
    Chain("attn residual + norm2 + modulate (adaln_norm)", (12, 0), (18, 0), ""),
    Chain("SwiGLU (inductor)", (0, 6), (0, 10), "unchanged"),
]
SETTINGS = {"eager": EAGER, "compile": COMPILE, "triton, within a block": TRITON_IN_BLOCK, "triton": TRITON_ACROSS}

# Parameter traffic per optimizer step, bytes per fp32 parameter, by TrainConfig.optimizer
# (sfd/optim.py has the table) ...
PARAM_BYTES = {
    "torch": {"grad norm": 4, "AdamW (torch fused)": 28, "EMA lerp": 12},
    "fused": {"grad norm": 4, "clip + AdamW + EMA (one pass)": 36},
}
CLIP_BYTES = {"torch": 8, "fused": 0}  # grad_clip > 0: clip_grad_norm_ rescales every gradient in place (R4 W4)
# ... and by TrainConfig.weight_cast (sfd/weight_copies.py). autocast: every fp32 weight cast to
# bf16 in forward (R4 W2), the bf16 weight gradient the GEMM wrote cast back to fp32 in backward
# (R2 W4). optimizer: the pass also writes the bf16 copy (W2; with optimizer=torch a separate
# cast pass, R4 W2), and the weight-gradient GEMM writes fp32 directly (+2 over its bf16 output).
CAST_BYTES = {
    ("autocast", "torch"): {"weight cast fwd": 6, "weight-grad cast bwd": 6},
    ("autocast", "fused"): {"weight cast fwd": 6, "weight-grad cast bwd": 6},
    ("optimizer", "torch"): {"bf16 copy (own pass)": 6, "fp32 weight-grad GEMM output": 2},
    ("optimizer", "fused"): {"bf16 copy (in the pass)": 2, "fp32 weight-grad GEMM output": 2},
}


def param_bytes_per_param(optimizer: str, clip: bool = False, weight_cast: str = "autocast") -> int:
    return (sum(PARAM_BYTES[optimizer].values()) + sum(CAST_BYTES[weight_cast, optimizer].values())
            + (CLIP_BYTES[optimizer] if clip else 0))


def model_numbers(name: str, batch: int, optimizer: str = "fused", clip: bool = False, weight_cast: str = "autocast") -> dict:
    cfg = model_preset(name)
    D, depth, N = cfg.hidden_size, cfg.depth, (cfg.input_size // cfg.patch_size) ** 2
    Hf = int(2 / 3 * int(D * cfg.mlp_ratio))
    params = count_params(cfg)
    # Matmul FLOPs per token per block, forward: qkv 6D², proj 2D², w12 4·D·Hf, w3 2·Hf·D;
    # attention QKᵀ and PV 4·N·D. Training = 3x forward.
    gemm_fwd = 2 * (3 * D * D + D * D + 2 * D * Hf + Hf * D)
    attn_fwd = 4 * N * D
    tokens = batch * N
    out = {"model": name, "D": D, "Hf": Hf, "depth": depth, "tokens_per_image": N, "batch": batch, "params": params}
    out["train_gflop_per_image"] = 3 * (gemm_fwd + attn_fwd) * depth * N / 1e9
    out["bytes_per_token_block"] = {
        s: {"fwd": sum(c.bytes(D, Hf, "fwd") for c in chains), "bwd": sum(c.bytes(D, Hf, "bwd") for c in chains)}
        for s, chains in SETTINGS.items()
    }
    # Parameter traffic per step (56 B/param with torch's AdamW + EMA lerp and autocast's casts,
    # 52 with the one pass, 44 with the one pass writing the bf16 copies; + 8 for torch with grad_clip).
    out["optimizer"], out["grad_clip"], out["weight_cast"] = optimizer, clip, weight_cast
    out["param_bytes_per_param"] = {f"{o}, weight_cast={w}": param_bytes_per_param(o, clip, w) for w, o in CAST_BYTES}
    param_bytes = params * param_bytes_per_param(optimizer, clip, weight_cast)
    out["param_traffic_gb"] = param_bytes / 1e9
    predictions = {}
    for dev, (flops, bw) in DEVICES.items():
        t_gemm = 3 * gemm_fwd * depth * tokens / (flops * MATMUL_EFF)
        t_attn = 3 * attn_fwd * depth * tokens / (flops * ATTN_EFF)
        t_param = param_bytes / (bw * HBM_EFF)
        per = {}
        for s in SETTINGS:
            b = out["bytes_per_token_block"][s]
            t_elem = (b["fwd"] + b["bwd"]) * depth * tokens / (bw * HBM_EFF)
            step = t_gemm + t_attn + t_elem + t_param
            per[s] = {
                "elementwise_ms": 1e3 * t_elem,
                "step_ms": 1e3 * step,
                "img_per_s": batch / step,
                "mfu": out["train_gflop_per_image"] * 1e9 * batch / step / flops,
            }
        predictions[dev] = {"matmul_ms": 1e3 * t_gemm, "attention_ms": 1e3 * t_attn, "param_traffic_ms": 1e3 * t_param, **per}
    out["predictions"] = predictions
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="per-GPU batch (paper: 256 over 8 GPUs = 32)")
    ap.add_argument("--models", nargs="+", default=["LightningDiT-B/1", "LightningDiT-XL/1"])
    ap.add_argument("--optimizer", default="fused", choices=sorted(PARAM_BYTES), help="TrainConfig.optimizer (parameter traffic)")
    ap.add_argument("--weight-cast", default="autocast", choices=("autocast", "optimizer"), help="TrainConfig.weight_cast")
    ap.add_argument("--clip", action="store_true", help="grad_clip > 0 (the authors clip nothing)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()
    results = [model_numbers(m, args.batch, args.optimizer, args.clip, args.weight_cast) for m in args.models]
    print(f"assumed efficiencies: matmul {MATMUL_EFF:.0%}, attention {ATTN_EFF:.0%}, HBM {HBM_EFF:.0%} of peak")
    print("parameter traffic, bytes per parameter per step: " + "; ".join(
        f"optimizer={o}, weight_cast={w}: {' + '.join(f'{k} {v}' for k, v in (PARAM_BYTES[o] | CAST_BYTES[w, o]).items())}"
        f"{f' + clip {CLIP_BYTES[o]}' if args.clip and CLIP_BYTES[o] else ''} = {param_bytes_per_param(o, args.clip, w)}"
        for w, o in CAST_BYTES))
    for r in results:
        D = r["D"]
        print(f"\n{r['model']}: D={D} Hf={r['Hf']} depth={r['depth']} batch={r['batch']} "
              f"{r['train_gflop_per_image']:.0f} GFLOP/img, parameter traffic {r['param_traffic_gb']:.1f} GB/step "
              f"(optimizer={r['optimizer']}, weight_cast={r['weight_cast']}, "
              f"{r['param_bytes_per_param'][r['optimizer'] + ', weight_cast=' + r['weight_cast']]} B/param)")
        print("| setting | fwd B/token/block | bwd | total | vs compile |")
        print("|---|---|---|---|---|")
        base = sum(r["bytes_per_token_block"]["compile"].values())
        for s, b in r["bytes_per_token_block"].items():
            tot = b["fwd"] + b["bwd"]
            print(f"| {s} | {b['fwd'] / 1e3:.1f} KB | {b['bwd'] / 1e3:.1f} KB | {tot / 1e3:.1f} KB | {tot / base:.2f} |")
        for dev, p in r["predictions"].items():
            print(f"{dev}: matmul {p['matmul_ms']:.1f} ms, attention {p['attention_ms']:.1f} ms, "
                  f"params/optimizer/EMA {p['param_traffic_ms']:.1f} ms; " + "; ".join(
                      f"{s} {p[s]['elementwise_ms']:.1f} ms elementwise -> {p[s]['step_ms']:.1f} ms/step, "
                      f"{p[s]['img_per_s']:.0f} img/s, MFU {p[s]['mfu']:.0%}" for s in SETTINGS))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
