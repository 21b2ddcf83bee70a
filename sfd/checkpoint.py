"""Weight files: safe loading, clear errors, atomic writes.

Rules (DESIGN.md §5):
- the project's own files are safetensors; the authors' pickles load with
  ``torch.load(weights_only=True)`` so no pickle code ever executes;
- nothing is downloaded: a missing file raises :class:`WeightsError` naming the file, where it
  was expected, and who publishes it;
- loading a state dict into a module reports every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS_DIR = Path("weights")  # default location, relative to the working directory


class WeightsError(RuntimeError):
    """A weight file is missing, unreadable, or does not fit the model."""


@dataclass(frozen=True)
class KnownWeights:
    filename: str
    what: str
    publisher: str


# Every external file the project can load, with where its authors publish it.
KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    "texture_vae": KnownWeights(
        "ldm-imagenet256-f16d32-50ep.ckpt",
        "texture KL-VAE (f16d32, LDM architecture)",
        "hustvl on Hugging Face: hustvl/va-vae-imagenet256-experimental-variants",
    ),
    "semvae": KnownWeights(
        "semantic_ae_final.pt",
        "Semantic VAE (transformer_ch16) over DINOv2-B-reg tokens",
        "the SFD authors on Hugging Face: SFD-Project/SFD, folder semantic_vae/",
    ),
    "dinov2": KnownWeights(
        "dinov2_vitb14_reg4_pretrain.pth",
        "DINOv2 ViT-B/14 with 4 registers",
        "Meta AI (facebookresearch/dinov2 release files: dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth)",
    ),
    "inception": KnownWeights(
        "pt_inception-2015-12-05-6726825d.pth",
        "FID InceptionV3 (TensorFlow 2015-12-05 graph, PyTorch port)",
        "the pytorch-fid project's GitHub release (mseitzer/pytorch-fid, FID weights v0.1)",
    ),
    "adm_reference": KnownWeights(
        "VIRTUAL_imagenet256_labeled.npz",
        "ADM ImageNet-256 reference batch",
        "OpenAI guided-diffusion evaluation suite (evaluations/README: ImageNet 256x256 reference batch)",
    ),
    "sfd_xl": KnownWeights(
        "sfd_xl_4m.pt",
        "SFD LightningDiT-XL/1 checkpoint",
        "the SFD authors on Hugging Face: SFD-Project/SFD, folder model_weights/",
    ),
    "sfd_1p0b": KnownWeights(
        "sfd_1p0b_4m.pt",
        "SFD LightningDiT-1p0B/1 checkpoint",
        "the SFD authors on Hugging Face: SFD-Project/SFD, folder model_weights/",
    ),
    "sfd_guide_b": KnownWeights(
        "sfd_autoguidance_b.pt",
        "SFD LightningDiT-B/1 AutoGuidance guide checkpoint",
        "the SFD authors on Hugging Face: SFD-Project/SFD, folder model_weights/sfd_autoguidance_b/",
    ),
}


def resolve_weights(kind: str, path: str | os.PathLike[str] | None = None) -> Path:
    """Path of the ``kind`` weight file (``path`` or ``weights/<authors' name>``), or a clear error."""
    if kind not in KNOWN_WEIGHTS:
        raise KeyError(f"unknown weight kind {kind!r}; known: {sorted(KNOWN_WEIGHTS)}")
    info = KNOWN_WEIGHTS[kind]
    p = Path(path) if path is not None else WEIGHTS_DIR / info.filename
    if not p.is_file():
        raise WeightsError(
            f"missing {info.what}: no file at '{p}'. Expected the authors' file '{info.filename}' "
            f"(default location: {WEIGHTS_DIR / info.filename}, or pass its path). "
            f"It is published by {info.publisher}. Nothing is downloaded automatically."
        )
    return p


def file_sha256(path: str | os.PathLike[str], length: int | None = None) -> str:
    """Hex SHA-256 of a file (its first ``length`` digits if given), read in 16 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()[:length]


class _Inert:
    """Stand-in for a non-tensor object pickled inside a training checkpoint (see load_tensors)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def load_tensors(path: str | os.PathLike[str], *, inert_objects: bool = False) -> dict[str, Any]:
    """Read a weight file without executing pickle code.

    ``.safetensors`` through safetensors; anything else (``.pt``, ``.pth``, ``.ckpt``) through
    ``torch.load(weights_only=True)``. Returns whatever container the file holds.

    Training checkpoints can carry pickled classes beside the weights (older Lightning keys
    callback states by class; trainers store config objects). With ``inert_objects`` a file that
    ``weights_only`` refuses is retried with every refused global mapped to an inert stand-in:
    still no code from the file runs, the tensors load, and the (unused) objects become inert.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"no weight file at '{p}'")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # SafetensorError (truncated, bad header), OSError: name the file
            raise WeightsError(f"could not read '{p}' (damaged or not a safetensors file): {e}") from e
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refused or file broken: say which file and why
        first = WeightsError(f"could not read '{p}' safely (torch.load with weights_only=True): {e}")
        first.__cause__ = e
    if not inert_objects:
        raise first
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
        with torch.serialization.safe_globals([(_Inert, name) for name in names]):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise first from e


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # SafetensorError, missing file: name the file
        raise WeightsError(f"could not read the metadata of '{path}' (damaged or not a safetensors file): {e}") from e


def unwrap_state_dict(obj: Any, prefer: tuple[str, ...] = ("ema", "model", "state_dict", "model_state_dict")) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint container.

    The authors' files come as a bare state dict (released EMA weights), ``{model, ema, opt,
    config}`` (their trainer), ``{state_dict: ...}`` (Lightning) or ``{model_state_dict: ...}``
    (SemVAE). ``prefer`` decides which key wins when several exist (EMA first by default).
    Also strips the ``module.`` / ``_orig_mod.`` wrappers left by DDP and torch.compile.
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"expected a mapping of tensors, got {type(obj).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in prefer:
            if key in obj and isinstance(obj[key], Mapping):
                return unwrap_state_dict(obj[key], prefer)
        raise WeightsError(
            f"no state dict found in checkpoint; top-level keys are {sorted(map(str, obj))[:20]}, "
            f"looked for {list(prefer)}"
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        stripped = True
        while stripped:  # any nesting order of DDP / compile wrappers
            stripped = False
            for prefix in ("module.", "_orig_mod."):
                if k.startswith(prefix):
                    k, stripped = k[len(prefix):], True
        out[k] = v
    return out


def check_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    optional: tuple[str, ...] = (),
    source: str = "state dict",
) -> None:
    """Raise one :class:`WeightsError` listing every missing, unexpected and mis-shaped key.

    Keys of the module matching an ``optional`` suffix (recomputable buffers such as
    ``feat_rope.freqs_cos``) may be absent from the file.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not (optional and k.endswith(optional))]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state_dict
        if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit {type(module).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise WeightsError("\n".join(lines))


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    optional: tuple[str, ...] = (),
    source: str = "state dict",
) -> None:
    """``module.load_state_dict(strict=True)`` with a readable error first."""
    check_state_dict(module, state_dict, optional=optional, source=source)
    sd = dict(state_dict)
    own = module.state_dict()
    for k in own:  # optional buffers absent from the file keep their computed values
        if k not in sd:
            sd[k] = own[k]
    module.load_state_dict(sd, strict=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dst)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> None:
    """Atomically write a safetensors file; non-string metadata values are JSON-encoded."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)


# ---------------------------------------------------------------------------------------------
# Training checkpoints: <run>/checkpoints/<step:07d>/{model,ema}.safetensors + state.pt

CKPT_DIR_DIGITS = 7


def checkpoint_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{step:0{CKPT_DIR_DIGITS}d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, sorted by step number (never by size or mtime).

    A checkpoint counts only once its ``state.pt`` exists: that file is written last, so a
    save killed half-way is never picked up.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if d.is_dir() and d.name.isdigit() and (d / "state.pt").is_file():
            out.append((int(d.name), d))
    return sorted(out)


def save_training_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    ema: nn.Module | None,
    state: Mapping[str, Any],
    config_json: str,
    keep_last: int = 0,
) -> Path:
    """Write weights (+EMA) as safetensors carrying the config, then the trainer state, atomically.

    ``state`` (optimizer, step, images seen, data position, RNG) must hold only tensors and plain
    Python values so it reloads with ``weights_only=True``. ``keep_last`` > 0 prunes older ones.
    """
    d = checkpoint_dir(run_dir, step)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"config": config_json, "step": str(step)}
    save_safetensors(model.state_dict(), d / "model.safetensors", meta)
    if ema is not None:
        save_safetensors(ema.state_dict(), d / "ema.safetensors", meta)
    with atomic_path(d / "state.pt") as tmp:  # written last: marks the checkpoint complete
        torch.save(dict(state), tmp)
    if keep_last > 0:
        import shutil

        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return d


def load_training_state(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Trainer state of a checkpoint directory, read with ``weights_only=True``."""
    p = Path(ckpt_dir) / "state.pt"
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"could not read trainer state '{p}' (weights_only=True): {e}") from e
