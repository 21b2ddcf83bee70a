"""The fused forward of a LightningDiT block and final layer (``kernels = triton``).

The same modules, parameters and maths as ``LightningDiTBlock.forward`` / ``FinalLayer.forward``
in sfd/models/lightningdit.py; only the chains around the matmuls go through the fused ops.
A block without RMSNorm (the DiT variant) keeps its eager forward: :func:`fusable` says which.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sfd.kernels.adaln_norm import adaln_norm


def fusable(module: nn.Module) -> bool:
    """True for a block or final layer whose norms are RMSNorms (the SFD configuration)."""
    norms = [getattr(module, n, None) for n in ("norm1", "norm2", "norm_final")]
    norms = [n for n in norms if n is not None]
    return bool(norms) and all(hasattr(n, "weight") and hasattr(n, "eps") and n.weight is not None for n in norms)


def _matmul_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the next Linear computes in: autocast's, so the fused op writes it directly."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def block_forward(block: nn.Module, x: Tensor, c: Tensor, rope: nn.Module | None) -> Tensor:
    """``LightningDiTBlock.forward`` with norm1 and (attention residual + norm2) fused."""
    if block.wo_shift:
        scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(4, dim=1)
        shift_msa = shift_mlp = None
    else:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
    out_dtype = _matmul_dtype(x)
    h, _ = adaln_norm(x, None, None, block.norm1.weight, shift_msa, scale_msa, block.norm1.eps, out_dtype)
    a = block.attn(h, rope)
    h, x = adaln_norm(x, a, gate_msa, block.norm2.weight, shift_mlp, scale_mlp, block.norm2.eps, out_dtype)
    # The MLP's gated residual stays an eager op: fusing it into the next block's norm1 would
    # cross the block boundary (docs/performance.md puts it at ~4 % of the fused bytes).
    return x + gate_mlp.unsqueeze(1) * block.mlp(h)


def final_forward(layer: nn.Module, x: Tensor, c: Tensor) -> Tensor:
    """``FinalLayer.forward`` with norm_final + modulate fused."""
    shift, scale = layer.adaLN_modulation(c).chunk(2, dim=1)
    norm = layer.norm_final
    h, _ = adaln_norm(x, None, None, norm.weight, shift, scale, norm.eps, _matmul_dtype(x))
    return layer.linear(h)
