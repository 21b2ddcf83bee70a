"""sfd.runtime: the one seed function keeps every earlier derivation's output; policy helpers."""

from __future__ import annotations

import numpy as np
import torch

from sfd.runtime import (
    autocast_dtype,
    derive_seed,
    describe_autocast,
    init_distributed,
    set_precision,
)


def test_derive_seed_keeps_the_three_earlier_formulas():
    # Pinned from the formulas as they were in train/main.py (step_seed), sfd/diffusion.py
    # (sample_seed) and sfd/encoding.py (row_seed): golden, resume and cache bytes depend on them.
    assert derive_seed("train", 0, 0) == 4988182524041495532
    assert derive_seed("sample", 0, 5) == 504213660092809591
    assert derive_seed("encode", 0, 1, 3, 1) == 742813067131868726
    state = np.random.SeedSequence([7, 2, 11, 0]).generate_state(2, np.uint32)
    assert derive_seed("encode", 7, 2, 11, 0) == ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)
    assert derive_seed("train", 1, 2) != derive_seed("sample", 1, 2)  # domains never collide by design
    assert all(0 <= derive_seed("train", s, i) < 2**63 for s in range(3) for i in range(3))


def test_policy_on_cpu_single_process_bf16_when_asked(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = init_distributed("cpu")
    assert (d.rank, d.world_size, d.is_main, d.initialized, d.device.type) == (0, 1, True, False, "cpu")
    x = torch.ones(2)
    assert d.sum(x) is x and torch.equal(x, torch.ones(2))
    # bf16 is bf16 on CPU too (CPU autocast); fp32 is no autocast anywhere.
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16 and autocast_dtype("fp32", "cpu") is None
    assert describe_autocast(torch.bfloat16, "cpu") == "bf16 (cpu autocast)"
    assert describe_autocast(None, "cpu") == "off (fp32)"
    assert set_precision("cpu", True) is False  # TF32 is a CUDA matter
