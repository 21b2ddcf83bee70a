"""The released files, laid out as their publishers publish them, and the paper's evaluation rows.

A weights directory (default ``weights/``) is a local copy of the SFD authors' Hugging Face
repository ``SFD-Project/SFD`` (``model_weights/<run>/checkpoints/<step:07d>.pt``,
``semantic_vae/…``, ``imagenet1k-latents/…``) with the four third-party files beside it (texture
VAE, DINOv2, FID Inception, ADM reference batch). Nothing here downloads anything: ``report``
lists what is present and prints the exact public command for each missing file, and
``PAPER_ROWS`` pairs each published number with the checkpoints and guidance that produced it
(docs/method.md §7.2, §9).

``python -m sfd.weights [DIR]`` (``just weights [DIR]``) prints the report; exit status 0 when
every file is present, 1 otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from sfd.checkpoint import KNOWN_WEIGHTS

DEFAULT_DIR = Path("weights")
HF_REPO = "SFD-Project/SFD"


@dataclass(frozen=True)
class WeightFile:
    key: str
    pattern: str  # path under the weights directory; may hold one ``**`` for the authors' subfolders
    what: str
    publisher: str
    download: str  # the public command that fetches it into the layout; ``{dir}`` = the weights directory
    sha256: str = ""  # what the publisher states (full digest or the prefix it publishes), "" = none
    sha256_note: str = "no digest is published with the file; not confirmed here"

    def find(self, root: Path) -> Path | None:
        """The file under ``root`` (the first match, in sorted order, for a ``**`` pattern)."""
        if "**" in self.pattern:
            hits = sorted(root.glob(self.pattern))
            return hits[0] if hits else None
        p = root / self.pattern
        return p if p.is_file() else None

    def expected(self, root: Path) -> str:
        """Where it goes (``…`` stands for the publisher's own subfolders)."""
        return str(root / self.pattern.replace("**", "…"))


def _hf(folder: str) -> str:
    return f'huggingface-cli download {HF_REPO} --include "{folder}/*" --local-dir {{dir}}'


def _checkpoint(run: str, step: int, what: str) -> WeightFile:
    return WeightFile(
        key=f"{run}/{step:07d}",
        pattern=f"model_weights/{run}/checkpoints/{step:07d}.pt",
        what=what,
        publisher=f"the SFD authors on Hugging Face ({HF_REPO}, model_weights/{run}/)",
        download=_hf(f"model_weights/{run}"),
    )


def _third_party(key: str, what: str, url: str, **digest: str) -> WeightFile:
    """A file the resolvers of sfd.checkpoint know (KNOWN_WEIGHTS: its name and publisher), at the
    top of the weights directory, fetched from ``url``."""
    known = KNOWN_WEIGHTS[key]
    return WeightFile(key, known.filename, what, known.publisher, f"wget -O {{dir}}/{known.filename} {url}", **digest)


FILES: dict[str, WeightFile] = {f.key: f for f in [
    _third_party(
        "texture_vae", "texture KL-VAE (f16d32, LDM architecture): encoder for the cache, decoder for samples",
        "https://huggingface.co/hustvl/va-vae-imagenet256-experimental-variants/resolve/main/ldm-imagenet256-f16d32-50ep.ckpt",
    ),
    _third_party(
        "dinov2", "DINOv2 ViT-B/14 with 4 registers (semantic features and REPA targets for the cache)",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
    ),
    _third_party(
        "inception", "FID InceptionV3 (TensorFlow 2015-12-05 graph, PyTorch port)",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        sha256="6726825d",
        sha256_note="the publisher states only this SHA-256 prefix (in the file name, checked by torch.hub)",
    ),
    _third_party(
        "adm_reference", "ADM ImageNet-256 reference batch (FID/sFID statistics and images for precision/recall)",
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz",
    ),
    WeightFile(
        "semvae", "semantic_vae/**/semantic_ae_final.pt",
        "Semantic VAE (transformer_ch16) over DINOv2-B-reg tokens (optional: `just encode` can train one)",
        f"the SFD authors on Hugging Face ({HF_REPO}, semantic_vae/)", _hf("semantic_vae"),
    ),
    WeightFile(
        "latents_stats", "imagenet1k-latents/**/latents_stats.pt",
        "texture latent statistics (mean/std per channel) to sample from the released checkpoints",
        f"the SFD authors on Hugging Face ({HF_REPO}, imagenet1k-latents/)", _hf("imagenet1k-latents"),
    ),
    _checkpoint("sfd_xl", 400_000, "SFD LightningDiT-XL/1, 400K steps (80 epochs), EMA"),
    _checkpoint("sfd_xl", 4_000_000, "SFD LightningDiT-XL/1, 4M steps (800 epochs), EMA"),
    _checkpoint("sfd_1p0", 400_000, "SFD LightningDiT-1p0B/1, 400K steps (80 epochs), EMA"),
    _checkpoint("sfd_1p0", 4_000_000, "SFD LightningDiT-1p0B/1, 4M steps (800 epochs), EMA"),
    _checkpoint("sfd_autoguidance_b", 60_000, "AutoGuidance guide LightningDiT-B/1, 60K steps"),
    _checkpoint("sfd_autoguidance_b", 70_000, "AutoGuidance guide LightningDiT-B/1, 70K steps"),
    _checkpoint("sfd_autoguidance_b", 120_000, "AutoGuidance guide LightningDiT-B/1, 120K steps"),
]}


@dataclass(frozen=True)
class PaperRow:
    """One published FID-50K and what produced it (the authors' README tables, docs/method.md §7.2, §9)."""

    name: str
    model: str  # architecture preset
    ckpt: str  # FILES key
    fid: float  # paper (NPU) figure
    fid_gpu: float  # the authors' re-run on 8 GPUs
    guide: str | None = None  # FILES key of the AutoGuidance guide
    ag_scale: float = 1.0


PAPER_ROWS: dict[str, PaperRow] = {r.name: r for r in [
    PaperRow("xl-400k", "XL/1", "sfd_xl/0400000", 1.30, 1.29, "sfd_autoguidance_b/0070000", 1.6),
    PaperRow("xl-4m", "XL/1", "sfd_xl/4000000", 1.06, 1.03, "sfd_autoguidance_b/0070000", 1.5),
    PaperRow("xxl-400k", "1p0B/1", "sfd_1p0/0400000", 1.19, 1.20, "sfd_autoguidance_b/0060000", 1.5),
    PaperRow("xxl-4m", "1p0B/1", "sfd_1p0/4000000", 1.04, 1.04, "sfd_autoguidance_b/0120000", 1.5),
    PaperRow("xl-400k-unguided", "XL/1", "sfd_xl/0400000", 3.43, 3.50),
    PaperRow("xl-4m-unguided", "XL/1", "sfd_xl/4000000", 2.54, 2.66),
    PaperRow("xxl-400k-unguided", "1p0B/1", "sfd_1p0/0400000", 2.84, 2.92),
    PaperRow("xxl-4m-unguided", "1p0B/1", "sfd_1p0/4000000", 2.38, 2.36),
]}


def row_files(row: PaperRow) -> list[str]:
    """FILES keys one paper row needs (the semantic VAE and DINOv2 are not needed to sample)."""
    keys = [row.ckpt, "latents_stats", "texture_vae", "inception", "adm_reference"]
    return keys + ([row.guide] if row.guide else [])


def missing(root: str | Path, keys: list[str]) -> list[WeightFile]:
    root = Path(root)
    return [FILES[k] for k in keys if FILES[k].find(root) is None]


def missing_message(root: str | Path, files: list[WeightFile]) -> str:
    """One message listing every missing file with where it goes and the command that fetches it."""
    lines = [f"{len(files)} file(s) missing under '{root}' (nothing is downloaded automatically):"]
    for f in files:
        lines.append(f"  - {f.expected(Path(root))}: {f.what}; published by {f.publisher}")
        lines.append(f"      {f.download.format(dir=root)}")
    return "\n".join(lines)


def report(root: str | Path = DEFAULT_DIR, hashes: bool = False) -> tuple[str, bool]:
    """Text listing every known file (present with size, or missing with its command); all present?"""
    from sfd.checkpoint import file_sha256

    root = Path(root)
    lines, absent = [f"weights directory: {root}"], []
    for f in FILES.values():
        p = f.find(root)
        if p is None:
            absent.append(f)
            lines.append(f"  missing  {f.pattern:<48} {f.what}")
            continue
        line = f"  present  {str(p.relative_to(root)):<48} {p.stat().st_size / 2**20:,.1f} MiB"
        if hashes:
            digest = file_sha256(p)
            ok = "" if not f.sha256 else ("  (matches the published prefix)" if digest.startswith(f.sha256)
                                          else f"  (DOES NOT MATCH the published {f.sha256})")
            line += f"  sha256 {digest}{ok}"
        lines.append(line)
    if absent:
        lines += ["", missing_message(root, absent)]
    lines += ["", "paper rows (just paper-fid ROW):"]
    for r in PAPER_ROWS.values():
        gone = missing(root, row_files(r))
        state = "ready" if not gone else f"needs {', '.join(f.key for f in gone)}"
        lines.append(f"  {r.name:<18} FID {r.fid:.2f} (GPU re-run {r.fid_gpu:.2f})  {state}")
    return "\n".join(lines), not absent


def main(argv: list[str] | None = None) -> int:
    from sfd.cli import Parser

    p = Parser(prog="python -m sfd.weights", description=(
        "List the released files the project can use: present (with size) or missing (with the exact "
        "public command that fetches each). Nothing is downloaded."),
        epilog="Example: python -m sfd.weights weights --sha256")
    p.add_argument("dir", nargs="?", default=str(DEFAULT_DIR), help="weights directory (default: weights)")
    p.add_argument("--sha256", action="store_true", help="also hash every present file (slow for large files)")
    p.add_argument("--path", metavar="KEY", choices=sorted(FILES), default=None,
                   help="print only the path of this file (exit 1 if absent), e.g. --path semvae; "
                        f"keys: {', '.join(FILES)}")
    args = p.parse_args(argv)
    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        raise NotADirectoryError(20, "not a directory (give the folder that holds the weights)", args.dir)
    if args.path:
        found = FILES[args.path].find(Path(args.dir))
        if found is None:
            print(missing_message(args.dir, [FILES[args.path]]), file=sys.stderr)
            return 1
        print(found)
        return 0
    text, complete = report(args.dir, hashes=args.sha256)
    print(text)
    return 0 if complete else 1


if __name__ == "__main__":
    from sfd.cli import run_cli

    run_cli(main)  # 0 all present, 1 some missing (listed with their commands), 2 a user error
