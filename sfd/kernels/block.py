"""The fused forward of a LightningDiT block and final layer (``kernels = triton``).

The same modules, parameters and maths as ``LightningDiTBlock.forward`` / ``FinalLayer.forward``
in sfd/models/lightningdit.py; only the chains around the matmuls go through the fused ops.
A block without RMSNorm (the DiT variant) keeps its eager forward: :func:`fusable` says which.

Across blocks (:func:`block_deferred`, what ``LightningDiT.forward`` runs): a block does not add
its MLP branch to the residual stream; it hands ``(x, y, gate)`` on, and the next block's norm1
(or the final layer's norm) adds ``x + gate·y`` inside its ``adaln_norm`` pass. That saves the
eager add's read and write of the stream once per block (docs/performance.md, "adaln_norm across
blocks"). The sum is the same expression in the same dtypes, so the result is the eager block's.
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


def block_deferred(
    block: nn.Module, x: Tensor, y: Tensor | None, gate: Tensor | None, c: Tensor, rope: nn.Module | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One block whose input is ``x + gate·y`` (the previous block's MLP branch not yet added;
    ``y = gate = None`` for the first block).

    Returns ``(inp, x_out, y_out, gate_out)``: ``inp`` the block's input tokens as norm1's pass
    wrote them (REPA reads the previous block's output here, at no extra pass), and the block's
    output ``x_out + gate_out·y_out`` left for the next norm to add.
    """
    if block.wo_shift:
        scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(4, dim=1)
        shift_msa = shift_mlp = None
    else:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
    out_dtype = _matmul_dtype(x)
    h, inp = adaln_norm(x, y, gate, block.norm1.weight, shift_msa, scale_msa, block.norm1.eps, out_dtype)
    a = block.attn(h, rope)
    h, x = adaln_norm(inp, a, gate_msa, block.norm2.weight, shift_mlp, scale_mlp, block.norm2.eps, out_dtype)
    return inp, x, block.mlp(h), gate_mlp


def block_forward(block: nn.Module, x: Tensor, c: Tensor, rope: nn.Module | None) -> Tensor:
    """``LightningDiTBlock.forward`` with norm1 and (attention residual + norm2) fused: a block
    called on its own adds its MLP branch itself (the model's forward defers it instead)."""
    _, x, y, gate = block_deferred(block, x, None, None, c, rope)
    return x + gate.unsqueeze(1) * y


def final_deferred(layer: nn.Module, x: Tensor, y: Tensor | None, gate: Tensor | None, c: Tensor) -> tuple[Tensor, Tensor]:
    """``FinalLayer.forward`` on ``x + gate·y`` with that add, norm_final and modulate fused.
    Returns ``(output, inp)``, ``inp`` being the last block's output tokens."""
    shift, scale = layer.adaLN_modulation(c).chunk(2, dim=1)
    norm = layer.norm_final
    h, inp = adaln_norm(x, y, gate, norm.weight, shift, scale, norm.eps, _matmul_dtype(x))
    return layer.linear(h), inp


def final_forward(layer: nn.Module, x: Tensor, c: Tensor) -> Tensor:
    """``FinalLayer.forward`` with norm_final + modulate fused."""
    return final_deferred(layer, x, None, None, c)[0]
