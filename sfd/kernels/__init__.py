"""Fused Triton kernels, their eager references, and the one switch that selects them.

``kernels`` (a run setting, decided once by the entry point):

- ``eager``: plain PyTorch ops, no ``torch.compile``;
- ``compile``: ``torch.compile`` over the eager ops (inductor fuses what it can);
- ``triton``: ``torch.compile`` with the chains inductor leaves unfused replaced by the custom
  ops of this package (``adaln_norm``: gated residual + RMSNorm + adaLN modulate, forward and
  backward). The ops are ``torch.library`` custom ops, so they sit inside the compiled graph.
  Off CUDA they run their eager references — the same model and call path, only slower than
  inductor's code, so on CPU ``triton`` resolves to ``compile`` (see :func:`resolve`).

docs/performance.md has the byte budget that chose the kernels and the GPU command that checks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sfd.kernels._triton import HAVE_TRITON, INTERPRET
from sfd.registry import Registry


@dataclass(frozen=True)
class KernelPolicy:
    requested: str
    compile: bool  # torch.compile the model and loss
    fused: bool  # route the model through sfd.kernels' custom ops
    note: str  # one line for the run log

    def describe(self) -> str:
        return f"{self.requested} -> {self.note}"


# ``kernels``: name → the policy it resolves to on a device (``policy(name, device)``).
KERNELS: Registry[Callable[[str, torch.device], KernelPolicy]] = Registry("kernel setting")


@KERNELS.register("eager")
def _eager(kernels: str, device: torch.device) -> KernelPolicy:
    return KernelPolicy(kernels, False, False, "eager ops, not compiled")


@KERNELS.register("compile")
def _compile(kernels: str, device: torch.device) -> KernelPolicy:
    return KernelPolicy(kernels, True, False, "torch.compile (inductor) over eager ops")


@KERNELS.register("triton")
def _triton(kernels: str, device: torch.device) -> KernelPolicy:
    if device.type == "cuda" and HAVE_TRITON:
        return KernelPolicy(kernels, True, True, "torch.compile + sfd.kernels Triton ops (adaln_norm)")
    if INTERPRET and HAVE_TRITON:
        return KernelPolicy(kernels, True, True, "torch.compile + sfd.kernels ops in the Triton interpreter")
    why = "no CUDA device" if device.type != "cuda" else "triton is not installed"
    return KernelPolicy(kernels, True, False, f"{why}: torch.compile over the eager references")


def resolve(kernels: str, device: torch.device) -> KernelPolicy:
    """What ``kernels`` means on ``device``: compile or not, fused ops or not, and why."""
    return KERNELS[kernels](kernels, device)


__all__ = ["KERNELS", "KernelPolicy", "resolve"]
