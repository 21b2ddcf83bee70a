"""The released-weights layout report and the paper-row reproduction recipe (no real weights here:
placeholder files stand at the published paths)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sfd.weights import FILES, PAPER_ROWS, main, missing, row_files

REPO = Path(__file__).resolve().parents[1]
PAPER_FID = [sys.executable, str(REPO / "eval" / "paper_fid.py")]


def published_layout(root: Path) -> Path:
    """Every known file at the path its publisher's download puts it (authors' subfolders included)."""
    for f in FILES.values():
        rel = f.pattern
        if f.key == "semvae":
            rel = "semantic_vae/dinov2_vitb14_reg/transformer_ch16/checkpoints/semantic_ae_final.pt"
        elif f.key == "latents_stats":
            rel = "imagenet1k-latents/sdvae_f16d32_semvaebasech16_repadinov2_vitb14_reg/imagenet_train_256/latents_stats.pt"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(f.key.encode())
    return root


def test_report_lists_missing_files_with_their_download_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{len(FILES)} file(s) missing" in out
    for f in FILES.values():
        assert f.download.format(dir=tmp_path) in out
    assert 'huggingface-cli download SFD-Project/SFD --include "model_weights/sfd_xl/*"' in out


def test_report_finds_the_published_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = published_layout(tmp_path)
    assert not missing(root, list(FILES))
    assert main([str(root), "--sha256"]) == 0
    out = capsys.readouterr().out
    assert "missing" not in out and out.count("present") == len(FILES)
    # A placeholder is not the real Inception: its digest must not pass the published prefix.
    assert "DOES NOT MATCH the published 6726825d" in out
    assert all("ready" in line for line in out.splitlines() if line.strip().startswith(tuple(PAPER_ROWS)))
    # --path finds a file inside the publisher's own subfolders (what `just encode imagenet` uses).
    assert main([str(root), "--path", "semvae"]) == 0
    assert capsys.readouterr().out.strip().endswith("transformer_ch16/checkpoints/semantic_ae_final.pt")
    assert main([str(tmp_path / "empty"), "--path", "semvae"]) == 1


def test_paper_rows_pair_checkpoints_with_the_authors_guides() -> None:
    # The authors' README table: (main checkpoint, guide iteration, scale) per published FID.
    assert {(r.ckpt, r.guide, r.ag_scale, r.fid) for r in PAPER_ROWS.values() if r.guide} == {
        ("sfd_xl/0400000", "sfd_autoguidance_b/0070000", 1.6, 1.30),
        ("sfd_xl/4000000", "sfd_autoguidance_b/0070000", 1.5, 1.06),
        ("sfd_1p0/0400000", "sfd_autoguidance_b/0060000", 1.5, 1.19),
        ("sfd_1p0/4000000", "sfd_autoguidance_b/0120000", 1.5, 1.04),
    }
    for r in PAPER_ROWS.values():
        assert all(k in FILES for k in row_files(r))


def test_paper_fid_dry_run_runs_the_authors_protocol(tmp_path: Path) -> None:
    root = published_layout(tmp_path / "w")
    res = subprocess.run([*PAPER_FID, "xl-4m", "--weights", str(root), "--nproc", "8", "--dry-run"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    gen, calc = [line for line in res.stdout.splitlines() if line.strip().startswith("$")]
    for piece in ("--nproc_per_node=8", "eval/fid.py gen", "model_weights/sfd_xl/checkpoints/4000000.pt",
                  "--model XL/1", "model_weights/sfd_autoguidance_b/checkpoints/0070000.pt", "--guide-model B/1",
                  "-o ag_scale=1.5", "-o method=dopri5", "-o atol=1e-6", "-o rtol=1e-3", "-o grid=authors",
                  "--num-samples 50000", "-o shuffle_seed=42", "imagenet_train_256/latents_stats.pt"):
        assert piece in gen, piece
    assert "--bf16" not in gen  # the authors sample in fp32 (TF32 matmuls)
    for piece in ("eval/fid.py calc", "VIRTUAL_imagenet256_labeled.npz", "pt_inception-2015-12-05-6726825d.pth"):
        assert piece in calc, piece
    res = subprocess.run([*PAPER_FID, "xl-4m-unguided", "--weights", str(root), "--dry-run"], capture_output=True, text=True)
    assert res.returncode == 0 and "--guide" not in res.stdout


def test_paper_fid_lists_every_missing_file_in_one_error(tmp_path: Path) -> None:
    res = subprocess.run([*PAPER_FID, "xxl-4m", "--weights", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: row xxl-4m cannot run. 6 file(s) missing")
    for key in row_files(PAPER_ROWS["xxl-4m"]):
        assert FILES[key].download.format(dir=tmp_path) in res.stderr
