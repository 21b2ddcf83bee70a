"""The per-parameter update side by side: today's three passes vs sfd.optim's one pass.

Variants, timed interleaved over the same parameter set (fresh random gradients each round):

- ``torch``: the ``optimizer=torch`` block — get_total_norm / clip_grad_norm_, torch.optim.AdamW
  (fused kernel on CUDA, foreach on CPU), then ``torch._foreach_lerp_`` for the EMA;
- ``fused-ref``: :class:`sfd.optim.FusedAdamWEMA` with ``compiled=False`` (torch's foreach
  sequence in one call: the same passes, so the same time — the check that the reference costs
  nothing extra);
- ``fused``: ``compiled=True`` — the norm, then one compiled pass for clip + AdamW + EMA;
- ``fused+cast``: ``fused``, then the bf16 cast of every Linear weight that autocast does in each
  forward (``weight_cast=autocast``; here one foreach copy into bf16 buffers, R4 W2);
- ``fused+copies``: ``weight_cast=optimizer`` — the one pass also writes those bf16 copies (W2,
  sfd/weight_copies.py), so no cast follows. ``fused+copies`` vs ``fused+cast`` is the claim.

Parameter sets have the real shapes of LightningDiT-B/1 and -XL/1 (the trainable tensors of
``LightningDiT(model_preset(name))``, REPA projector included). ``--blocks N`` keeps the first N
transformer blocks (same tensor shapes, fewer of them) when the whole set does not fit in host
memory (XL/1 needs 5 fp32 copies of 675 M parameters = 13.5 GB); times are then also reported per
million parameters, which is what scales.

Usage:
    python bench/param_pass.py --models LightningDiT-B/1 --rounds 7
    python bench/param_pass.py --models LightningDiT-XL/1 --blocks 4 --clip 1.0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sfd import optim  # noqa: E402
from sfd.config import model_preset  # noqa: E402
from sfd.models.lightningdit import LightningDiT  # noqa: E402
from sfd.weight_copies import WeightCopies  # noqa: E402

# Bytes per fp32 parameter each variant moves (docs in sfd/optim.py); the GPU figure to compare.
BYTES = {
    "torch": {"norm": 4, "clip": 8, "adamw": 28, "ema": 12},
    "fused": {"norm": 4, "one pass": 36},
    "fused+cast": {"norm": 4, "one pass": 36, "bf16 cast of the weights": 6},
    "fused+copies": {"norm": 4, "one pass + bf16 copies": 38},
}
VARIANTS = ("torch", "fused-ref", "fused", "fused+cast", "fused+copies")


def bytes_per_param(variant: str, clip: bool) -> int:
    parts = BYTES["torch" if variant == "fused-ref" else variant]  # fused-ref runs torch's passes
    return sum(v for k, v in parts.items() if clip or k != "clip")


def parameter_set(name: str, blocks: int | None, device: torch.device) -> tuple[list[torch.Tensor], list[bool]]:
    """The trainable tensors, and which of them are Linear weights (the ones with bf16 copies)."""
    cfg = model_preset(name)
    with torch.device("meta"):
        model = LightningDiT(cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if blocks is not None:
        names = [n for n in names if not n.startswith("blocks.") or int(n.split(".")[1]) < blocks]
    shapes = dict(model.named_parameters())
    linear = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    g = torch.Generator(device="cpu").manual_seed(0)
    return [(torch.randn(shapes[n].shape, generator=g) * 0.02).to(device) for n in names], [n in linear for n in names]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_model(name: str, blocks: int | None, rounds: int, clip: float, device: torch.device,
                variants: tuple[str, ...] = VARIANTS) -> dict:
    base, is_linear = parameter_set(name, blocks, device)
    n = sum(p.numel() for p in base)
    runs = {}
    for variant in variants:
        params = [p.clone().requires_grad_() for p in base]
        emas = [p.detach().clone() for p in base]
        copies = None
        if variant in ("fused+cast", "fused+copies"):  # bf16 copies of the Linear weights
            copies = WeightCopies([(p, p.detach().to(torch.bfloat16)) for p, lin in zip(params, is_linear) if lin])
        opt = optim.build_optimizer(
            "torch" if variant == "torch" else "fused", params, emas, lr=1e-4, betas=(0.9, 0.999),
            weight_decay=0.0, ema_decay=0.9999, grad_clip=clip, compiled=variant not in ("torch", "fused-ref"),
            device=device,
        )
        runs[variant] = (params, emas, opt, copies)
    g = torch.Generator(device=device).manual_seed(1)

    def step(variant: str) -> None:
        params, emas, opt, copies = runs[variant]
        norm = optim.grad_norm(opt, params, clip)
        optim.update(opt, params, emas, 0.9999, norm, copies if variant == "fused+copies" else None)
        if variant == "fused+cast":  # what autocast's casts cost each forward, as one pass
            copies.refresh()

    def set_grads() -> None:
        grads = [torch.randn(p.shape, generator=g, device=device) * 1e-3 for p in base]
        for params, _, _, _ in runs.values():
            for p, gr in zip(params, grads):
                p.grad = gr.clone()

    # Warm-up: state allocation and, for `fused`, the compile (reported apart).
    compile_s = {}
    for variant in runs:
        set_grads()
        compile_s[variant] = timed(lambda v=variant: step(v), device)
    times: dict[str, list[float]] = {v: [] for v in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # interleaved, alternating order
        for variant in order:
            set_grads()
            times[variant].append(timed(lambda v=variant: step(v), device))
    out = {"model": name, "blocks": blocks, "params": n, "linear_weight_share": sum(p.numel() for p, lin in zip(base, is_linear) if lin) / n,
           "clip": clip, "device": str(device), "first_call_s": compile_s}
    ref = statistics.median(times["torch"])
    for v, ts in times.items():
        med = statistics.median(ts)
        out[v] = {
            "median_ms": 1e3 * med, "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts),
            "ms_per_mparam": 1e3 * med / (n / 1e6), "vs_torch": med / ref,
            "bytes_per_param": bytes_per_param(v, clip > 0),
            "effective_gb_s": bytes_per_param(v, clip > 0) * n / med / 1e9,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Usage:")[1])
    ap.add_argument("--models", nargs="+", default=["LightningDiT-B/1", "LightningDiT-XL/1"])
    ap.add_argument("--blocks", type=int, default=None, help="keep the first N blocks (host memory); default all")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--clip", type=float, default=0.0, help="grad_clip (0 = the authors' setting)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    results = []
    for name in args.models:
        r = bench_model(name, args.blocks, args.rounds, args.clip, device)
        results.append(r)
        label = f"{name}" + (f" (first {args.blocks} blocks)" if args.blocks else "")
        print(f"\n{label}: {r['params'] / 1e6:.1f} M params on {r['device']}, grad_clip {args.clip}; "
              f"first calls (state + compile) {', '.join(f'{k} {v:.1f} s' for k, v in r['first_call_s'].items())}")
        print("| variant | bytes/param | median ms | min-max ms | ms per M params | vs torch | effective GB/s |")
        print("|---|---|---|---|---|---|---|")
        for v in (v for v in VARIANTS if v in r):
            x = r[v]
            print(f"| {v} | {x['bytes_per_param']} | {x['median_ms']:.1f} | {x['min_ms']:.1f}-{x['max_ms']:.1f} | "
                  f"{x['ms_per_mparam']:.2f} | {x['vs_torch']:.2f} | {x['effective_gb_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
