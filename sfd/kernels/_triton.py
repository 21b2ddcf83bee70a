"""Where Triton may run: a CUDA tensor, or any tensor under ``TRITON_INTERPRET=1`` (CPU tests).

Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated*, so the variable must be set
before ``sfd.kernels`` is first imported; the kernel tests run in a subprocess for that reason.
Without Triton installed the custom ops still exist and run their eager references.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = None

HAVE_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernel (not the eager reference) handles tensor ``t``."""
    return HAVE_TRITON and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


TL_DTYPES = {} if tl is None else {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype):
    if dtype not in TL_DTYPES:
        raise TypeError(f"Triton kernels of sfd.kernels take float32/bfloat16/float16, got {dtype}")
    return TL_DTYPES[dtype]


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number; it only sets how rows are grouped


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
