"""Weight files: safe loading, clear errors, atomic writes, and the project's checkpoint contract.

The contract (format version 2): every weight file the project writes is a safetensors file
whose metadata holds, under separate keys,

- ``format_version``  ``"2"``;
- ``kind``            ``"lightningdit"`` or ``"semvae"``: which model the weights are for;
- ``model_config``    the model's constructor arguments (JSON of :class:`sfd.config.ModelConfig`
                      or :class:`sfd.config.SemVAEConfig`) — Δt lives here, as the authors'
                      ``semfirst_delta_t``, and nowhere else;
- ``run_config``      the run that produced it (JSON of the training config without its ``model``
                      part, or ``null`` for an export);
- ``latent_stats``    the cache's per-channel statistics (``texture_mean``/``_std``,
                      ``semantic_mean``/``_std``, ``source``) when the run trained on a cache, so a
                      sampler needs no cache to denormalise;
- ``step``            the optimiser step (training checkpoints).

:func:`read_checkpoint` is the one reader: it returns the weights and both configs for these
files, for the version-1 files of this project (one ``config`` key holding either a model or a
whole run config) and for the authors' ``.pt`` files (whose model config it infers from their
stored YAML, or takes from the caller for their bare EMA state dicts).

Rules (docs/conventions.md: Weight files, Checkpoints):
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
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
    # The released SFD checkpoints, the Semantic VAE and the latent statistics keep the authors'
    # folder layout (model_weights/<run>/checkpoints/<step>.pt, ...): see sfd/weights.py.
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


def weights_identity(tensors: Mapping[str, torch.Tensor], model_config: Any) -> str:
    """Hex SHA-256 of a model's weights and config, independent of the file that holds them.

    Canonical: tensors in sorted name order, each as name, dtype, shape and its bytes, then the
    model config as JSON with sorted keys. Two files with the same weights therefore have the
    same identity whatever their metadata (run paths, safetensors' per-process key order) or
    format (the authors' ``.pt`` and our safetensors), unlike :func:`file_sha256`.
    """
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    cfg = model_config if isinstance(model_config, Mapping) else asdict(model_config)
    h.update(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def file_weights_identity(path: str | os.PathLike[str], model_config: Any) -> str | None:
    """:func:`weights_identity` of a safetensors file's tensors; None for other formats, whose
    bytes (third-party pickles, never rewritten here) are identified by :func:`file_sha256`."""
    if Path(path).suffix != ".safetensors":
        return None
    return weights_identity(load_tensors(path), model_config)


# Keys of an encoder record (sfd.encoding's specs) that say where the weights came from, not what
# they are: ignored when both records carry the weights identity.
_WHERE_KEYS = ("path", "file", "name", "sha256")


def same_weights(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether two encoder records (``{"kind": "weights", "config", "sha256", ...}``) name the
    same model. Records that both carry ``weights_sha256`` (:func:`weights_identity`) compare it
    and everything but the file's name, path and hash; an older record (file hash only) is
    compared as before, by every key it has except the path."""
    rec, cur = json.loads(json.dumps(dict(recorded))), json.loads(json.dumps(dict(current)))
    if "weights_sha256" in rec and "weights_sha256" in cur:
        skip = set(_WHERE_KEYS)
    else:  # an old record: the file hash decides; the newer key is not in it
        skip = {"path", "weights_sha256"}
    keys = (set(rec) | set(cur)) - skip
    return all(rec.get(k) == cur.get(k) for k in keys)


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
        first = WeightsError(f"could not read '{p}' safely (torch.load with weights_only=True; damaged, or not a "
                             f"PyTorch checkpoint): {_load_failure(e)}; check that this is the right file")
        first.__cause__ = e
    if not inert_objects:
        raise first
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
        with torch.serialization.safe_globals([(_Inert, name) for name in names]):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise first from e


def _load_failure(e: Exception) -> str:
    """The telling part of a torch.load failure (its weights-only message is a page of advice)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        return "refused by the safe unpickler: " + text.split(marker, 1)[1].strip().splitlines()[0]
    lines = text.strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    return read_safetensors(path, weights=False)[0]


def read_safetensors(path: str | os.PathLike[str], weights: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file from one open and one header parse; with
    ``weights=False`` the metadata only (the header, a few KB, whatever the file's size)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()} if weights else {}
    except Exception as e:  # SafetensorError (truncated, bad header), missing file: name the file
        raise WeightsError(f"could not read '{path}' (damaged or not a safetensors file): {e}") from e
    return meta, tensors


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
# The checkpoint contract

FORMAT_VERSION = 2
KINDS = ("lightningdit", "semvae")


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`read_checkpoint` found in a weight file."""

    path: Path  # the file read
    kind: str  # lightningdit | semvae
    format: str  # "sfd-2", "sfd-1" (this project's older files), "authors" (their .pt), "bare"
    state_dict: dict[str, torch.Tensor]  # empty when read with weights=False
    model_config: Any  # ModelConfig / SemVAEConfig; None when the file has none and none was given
    run_config: dict[str, Any] | None  # the run's settings (without the model part), if known
    latent_stats: dict[str, Any] | None  # texture/semantic mean/std lists + source, if stored
    step: int | None
    # The EMA weights too, when one file holds both and the raw ones were asked for (prefer_ema
    # False): the authors' {model, ema, opt, config}, so a fine-tune reads the file once.
    ema_state_dict: dict[str, torch.Tensor] | None = None

    @property
    def delta_t(self) -> float:
        """Δt the model was trained with (the one stored value: the model config's)."""
        return float(self.model_config.semfirst_delta_t)


def _config_class(kind: str) -> type:
    from sfd.config import ModelConfig, SemVAEConfig

    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {KINDS}")
    return ModelConfig if kind == "lightningdit" else SemVAEConfig


def latent_stats_metadata(
    stats: Mapping[str, Any], source: str, texture_encoder: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a sampler needs from the cache, as stored in ``latent_stats``: the per-channel
    statistics (float32 values round-trip through JSON) and the cache's texture-encoder record
    (so the matching decoder is rebuilt without the cache)."""
    out: dict[str, Any] = {"source": source}
    if texture_encoder is not None:
        out["texture_encoder"] = dict(texture_encoder)
    for key in ("texture_mean", "texture_std", "semantic_mean", "semantic_std"):
        if key in stats and stats[key] is not None:
            out[key] = [float(v) for v in torch.as_tensor(stats[key]).float().reshape(-1).tolist()]
    return out


def checkpoint_metadata(
    kind: str,
    model_config: Any,
    run_config: Mapping[str, Any] | None = None,
    *,
    latent_stats: Mapping[str, Any] | None = None,
    step: int | None = None,
) -> dict[str, str]:
    """Metadata of a format-2 file (see the module docstring)."""
    from sfd.config import to_json

    if not isinstance(model_config, _config_class(kind)):
        raise TypeError(f"{kind} checkpoints carry a {_config_class(kind).__name__}, got {type(model_config).__name__}")
    if run_config is not None and "model" in run_config:
        raise ValueError("run_config must not repeat the model config (it is stored under model_config)")
    meta = {
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "model_config": to_json(model_config, indent=None),
        "run_config": json.dumps(None if run_config is None else dict(run_config)),
    }
    if latent_stats is not None:
        meta["latent_stats"] = json.dumps(dict(latent_stats))
    if step is not None:
        meta["step"] = str(int(step))
    return meta


def save_checkpoint(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    kind: str,
    model_config: Any,
    run_config: Mapping[str, Any] | None = None,
    *,
    latent_stats: Mapping[str, Any] | None = None,
    step: int | None = None,
) -> None:
    """Atomically write weights with the format-2 metadata: the project's one weight writer."""
    meta = checkpoint_metadata(kind, model_config, run_config, latent_stats=latent_stats, step=step)
    save_safetensors(state_dict, path, meta)


def _model_config_from_dict(kind: str, data: Mapping[str, Any], where: str) -> Any:
    from sfd.config import SemVAEConfig, from_dict, model_config_from_json

    if kind == "lightningdit":
        return model_config_from_json(data, where=where)
    return from_dict(SemVAEConfig, dict(data), where=where)


def _migrate_v1(kind: str, meta: Mapping[str, str], where: str) -> tuple[Any, dict[str, Any] | None]:
    """(model config, run config) of a version-1 file: one ``config`` key with either the model's
    arguments (exports) or a whole run config with a ``model`` part (training checkpoints)."""
    if "config" not in meta:
        return None, None
    data = json.loads(meta["config"])
    if kind == "semvae":  # v1 SemVAE files: config = SemVAEConfig, train = its run config;
        # training checkpoints: config = {semvae, train}
        if isinstance(data, dict) and "semvae" in data:
            return _model_config_from_dict(kind, data["semvae"], where), data.get("train")
        run = json.loads(meta["train"]) if "train" in meta else None
        return _model_config_from_dict(kind, data, where), run
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        run = {k: v for k, v in data.items() if k != "model"}
        model_cfg = _model_config_from_dict(kind, data["model"], where)
        # v1 run configs held Δt twice (delta_t and model.semfirst_delta_t, kept equal by a check).
        dt = run.pop("delta_t", None)
        if dt is not None and float(dt) != model_cfg.semfirst_delta_t:
            raise WeightsError(f"{where}: delta_t {dt} and model.semfirst_delta_t {model_cfg.semfirst_delta_t} disagree")
        return model_cfg, run
    return _model_config_from_dict(kind, data, where), None


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    kind: str = "lightningdit",
    prefer_ema: bool = True,
    model_config: Any = None,
    weights: bool = True,
) -> Checkpoint:
    """The one reader of model weights and their configs.

    ``path``: a run directory (its latest complete checkpoint), a checkpoint directory
    (``ema.safetensors``, or ``model.safetensors`` with ``prefer_ema=False``), or a file —
    ours (format 2 or 1) or the authors' ``.pt`` (a bare state dict, ``{model, ema, opt,
    config}`` with their YAML, or ``{model_state_dict}``; EMA first unless ``prefer_ema`` is
    False). ``model_config`` overrides a stored config and is needed for files without one.
    ``weights=False`` reads the configs only (safetensors: the header; others: the whole file).
    """
    file = resolve_checkpoint(path, prefer_ema)
    where = f"'{file}'"
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {KINDS}")
    stored_model = run = stats = step = ema_state = None
    if file.suffix == ".safetensors":
        meta, state = read_safetensors(file, weights)  # one open: header and weights
        if "format_version" in meta:
            version = int(meta["format_version"])
            if version > FORMAT_VERSION:
                raise WeightsError(f"{where} has checkpoint format {version}; this code reads up to {FORMAT_VERSION}: update it")
            if meta.get("kind") != kind:
                raise WeightsError(f"{where} holds {meta.get('kind')} weights, not {kind}")
            fmt = f"sfd-{version}"
            stored_model = _model_config_from_dict(kind, json.loads(meta["model_config"]), f"{where} model_config")
            run = json.loads(meta.get("run_config", "null"))
            stats = json.loads(meta["latent_stats"]) if "latent_stats" in meta else None
        else:
            fmt = "sfd-1" if "config" in meta else "bare"
            stored_model, run = _migrate_v1(kind, meta, where)
        step = int(meta["step"]) if "step" in meta else None
    else:
        # The authors' trainer pickles its config object beside the weights: load it inert.
        raw = load_tensors(file, inert_objects=True)
        prefer = ("ema", "model", "state_dict", "model_state_dict") if prefer_ema else ("model", "ema", "state_dict", "model_state_dict")
        state = unwrap_state_dict(raw, prefer=prefer) if weights else {}
        if weights and not prefer_ema and isinstance(raw, Mapping) and isinstance(raw.get("ema"), Mapping):
            ema_state = unwrap_state_dict(raw["ema"])
        fmt = "bare"
        if isinstance(raw, Mapping) and isinstance(raw.get("config"), Mapping):
            from sfd.config import model_config_from_authors

            fmt, run = "authors", dict(raw["config"])
            if kind == "lightningdit":
                # Their trainer stores its whole YAML; anything else is taken as constructor args.
                stored_model = (
                    model_config_from_authors(run) if "model" in run
                    else _model_config_from_dict(kind, run, f"{where} config")
                )
        if isinstance(raw, Mapping) and isinstance(raw.get("steps", raw.get("step")), int):
            step = int(raw.get("steps", raw.get("step")))
    cfg = model_config if model_config is not None else stored_model
    if weights and cfg is None and kind == "lightningdit":
        from sfd.config import MODEL_PRESETS

        raise WeightsError(
            f"{where} carries no model config; pass one, e.g. --model XL/1 or "
            f"read_checkpoint(path, model_config=model_preset('XL/1')) for the released SFD XL/1 "
            f"(presets: {sorted(MODEL_PRESETS)})"
        )
    return Checkpoint(file, kind, fmt, state, cfg, run, stats, step, ema_state)


def resolve_checkpoint(path: str | os.PathLike[str], prefer_ema: bool = True) -> Path:
    """The weight file behind ``path``.

    - a run directory (has ``checkpoints/``) → its latest complete checkpoint by step number;
    - a checkpoint directory (``<run>/checkpoints/<step>``) → its ``ema.safetensors``
      (``model.safetensors`` with ``prefer_ema=False``; a run without EMA has only the latter);
    - a file → itself (for the authors' ``.pt``, :func:`read_checkpoint` prefers the ``ema`` key).
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise WeightsError(f"no checkpoint at '{p}' (neither a file nor a directory)")
    if (p / "checkpoints").is_dir():
        ckpts = list_checkpoints(p)
        if not ckpts:
            raise WeightsError(f"run '{p}' has no complete checkpoint (a <step>/state.pt under checkpoints/)")
        p = ckpts[-1][1]
    name = "ema.safetensors" if prefer_ema else "model.safetensors"
    if not (p / name).is_file():
        other = "model.safetensors" if prefer_ema else "ema.safetensors"
        hint = f"; it has {other} — pass that file to use it" if (p / other).is_file() else ""
        raise WeightsError(f"checkpoint directory '{p}' has no {name}{hint}")
    return p / name


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
    kind: str,
    model_config: Any,
    run_config: Mapping[str, Any],
    latent_stats: Mapping[str, Any] | None = None,
    keep_last: int = 0,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write weights (+EMA) under the checkpoint contract, then the trainer state, atomically.

    ``state`` (optimizer, step, images seen, data position, RNG) must hold only tensors and plain
    Python values so it reloads with ``weights_only=True``. ``extra_files`` maps a file name to a
    writer called with its path (it must write atomically), before ``state.pt``, so a checkpoint
    counted as complete has them (the post-hoc EMA profiles). ``keep_last`` > 0 prunes older ones.
    """
    d = checkpoint_dir(run_dir, step)
    d.mkdir(parents=True, exist_ok=True)
    meta = dict(kind=kind, model_config=model_config, run_config=run_config, latent_stats=latent_stats, step=step)
    save_checkpoint(d / "model.safetensors", model.state_dict(), **meta)
    if ema is not None:
        save_checkpoint(d / "ema.safetensors", ema.state_dict(), **meta)
    for name, write in (extra_files or {}).items():
        write(d / name)
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
        raise WeightsError(f"could not read trainer state '{p}' (weights_only=True): {_load_failure(e)}; move the "
                           "damaged checkpoint folder aside to resume from the one before") from e
