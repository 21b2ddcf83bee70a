"""Run-time policy, decided by entry points only: processes, devices, precision, seeds.

Every entry point (``train/main.py``, ``eval/fid.py``, ``sample/grid.py``, ``pipeline/encode.py``,
``pipeline/train_semvae.py``) calls these; the rest of ``sfd`` sets no global state. One place
for each decision:

- :func:`init_distributed` / :func:`shutdown` — torchrun's environment → rank, world size,
  device; NCCL on GPUs, gloo on CPU. :class:`Dist` carries the answer (``is_main`` for rank-0
  work, :meth:`Dist.say` to print on rank 0, :meth:`Dist.barrier`, :meth:`Dist.sum`).
- :func:`set_precision` — TF32 for matmuls and cuDNN convolutions (CUDA only; a no-op on CPU).
  :func:`autocast_dtype` / :func:`autocast` — the autocast policy (bf16 when asked, on any device).
- :func:`derive_seed` — every derived seed of the project (training steps, samples, the encode
  job's posterior noise), each domain with its formula unchanged so outputs stay bit-identical;
  :func:`rng_state` / :func:`set_rng_state` — the global generators, saved and restored on resume.
- :class:`StopSignals` — SIGTERM/SIGINT set a flag so a long job finishes its step, saves, exits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Dist", "pick_device", "init_distributed", "shutdown", "set_precision", "autocast_dtype",
    "autocast", "describe_autocast", "derive_seed", "rng_state", "set_rng_state", "StopSignals",
]

SEED_MASK = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------
# Processes and devices


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → cuda:local_rank, else mps, else cpu; anything else as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized: bool  # a process group exists (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, msg: str) -> None:
        """Print on rank 0 only, flushed."""
        if self.is_main:
            print(msg, flush=True)

    def barrier(self) -> None:
        if self.initialized and self.world_size > 1:
            dist.barrier()

    def sum(self, x: Tensor) -> Tensor:
        """In-place sum over ranks (the identity on one process)."""
        if self.initialized and self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x


def init_distributed(device: str = "auto", connect: bool = True) -> Dist:
    """Rank, world size and device from torchrun's environment (one process without it).

    ``device`` ``auto`` picks cuda:LOCAL_RANK when CUDA exists (and makes it current), else mps,
    else cpu. ``connect=False`` reads the environment without joining a process group.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launched and connect and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, dev, launched and connect)


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Precision


def set_precision(device: torch.device | str, tf32: bool) -> bool:
    """TF32 matmuls and cuDNN convolutions on CUDA (``tf32``); returns whether TF32 is now on."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return tf32


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """bfloat16 when ``precision`` is ``bf16`` — on every device, CPU included (torch's CPU
    autocast runs matmuls and convolutions in bf16), so a bf16 run on CPU exercises the same
    casts as on a GPU instead of silently running fp32; None (fp32) for ``fp32``. The tiny preset
    and the CPU demo ask for fp32 themselves."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else None


def describe_autocast(dtype: torch.dtype | None, device: torch.device | str) -> str:
    """What ran, for the run log: ``bf16 (cuda autocast)``, ``bf16 (cpu autocast)`` or ``off (fp32)``."""
    return f"bf16 ({torch.device(device).type} autocast)" if dtype is not None else "off (fp32)"


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Seeds


def derive_seed(domain: str, *parts: int) -> int:
    """A 63-bit generator seed from a domain name and integers (a run seed, a step, an index ...).

    ``train`` (seed, step) and ``sample`` (seed, index) hash ``sfd-<domain>:a:b`` with BLAKE2b;
    ``encode`` (seed, part id, row, flip) goes through NumPy's SeedSequence, the formula the
    encode job has always used, so existing caches stay byte-identical when a shard is redone.
    """
    ints = [int(p) for p in parts]
    if domain == "encode":
        state = np.random.SeedSequence(ints).generate_state(2, np.uint32)
        return ((int(state[0]) << 32) | int(state[1])) & SEED_MASK
    digest = hashlib.blake2b(f"sfd-{domain}:{':'.join(map(str, ints))}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & SEED_MASK


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators (CPU, and ``device``'s on CUDA) as plain tensors, for a checkpoint."""
    # The trainer's step draws are stateless (seeded by (seed, step)); the global generators are
    # saved so any other use of them (an added dropout, say) also resumes exactly.
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Stopping on request


class StopSignals:
    """SIGTERM/SIGINT set :attr:`received`: the job finishes its step, saves and exits.

    A second signal of the same kind gets the previous handler (Ctrl-C twice aborts at once).
    """

    def __init__(self, say: Callable[[str], None]) -> None:
        self.received: str | None = None
        self.say = say
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])
        self.say(f"{self.received}: finishing this step, saving a checkpoint, then exiting (again to abort)")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
