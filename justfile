# SFD runbook: every user-facing command is a recipe. `just --list` shows them all.
# Variables can be overridden on the command line: `just python=python3.12 test`.

python := "python3"
# Test processes: pytest-xdist workers, one per logical CPU by default (each test file runs whole on one).
workers := "logical"

# List the recipes.
default:
    @just --list

# Install the pinned dependencies and this repository (editable) into the current Python.
setup:
    {{python}} -m pip install -r requirements.txt
    {{python}} -m pip install -e . --no-deps

# Run the test suite (CPU only, offline; the command CI runs). `just workers=1 test` runs it in one process.
test *args:
    HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled {{python}} -m pytest -q -n {{workers}} --dist loadfile --no-loadscope-reorder {{args}}

# Lint with ruff (style and likely bugs).
lint:
    {{python}} -m ruff check sfd tests bench train sample eval pipeline

# The whole system on the CPU in ≤ 10 min, no downloads: data → judge + semantic ViT → Ray encode → torchrun train → grid → judged samples.
demo out="runs/demo" *args:
    {{python}} pipeline/demo.py --out {{out}} {{args}}

# Smallest end-to-end run on random tiny models: model -> three-phase sampler -> decoder -> PNG.
smoke out="runs/smoke":
    HF_HUB_OFFLINE=1 {{python}} bench/smoke.py --out {{out}}

# Every stage is skipped when done, so the same command resumes. `imagenet` uses the released
# encoders under weights/ (and the released SemVAE if weights/semantic_vae/…/semantic_ae_final.pt exists); any
# other name is an image folder (<root>/<class>/<image>) cached at data/cache/<folder name>.
# Extra flags go to pipeline/encode.py, e.g. `just encode imagenet -o repa_targets=none`.
# Build the latent cache (Ray job): encode → train SemVAE (unless given) → semantic latents → stats.
encode dataset="imagenet" *args:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ "{{dataset}}" = "imagenet" ]; then
        semvae=()
        if found=$({{python}} -m sfd.weights weights --path semvae 2>/dev/null); then semvae=(--semvae "$found"); fi
        {{python}} pipeline/encode.py --images data/imagenet/train --out data/cache/imagenet256 \
            --texture-vae weights/ldm-imagenet256-f16d32-50ep.ckpt \
            --dino weights/dinov2_vitb14_reg4_pretrain.pth "${semvae[@]}" {{args}}
    else
        {{python}} pipeline/encode.py --images "{{dataset}}" --out "data/cache/$(basename "{{dataset}}")" {{args}}
    fi

# Check a latent cache: every chunk file present and its checksum right (`--quick`: presence and
# sizes only). Exit 1 names each damaged file; re-running `just encode` re-encodes exactly those shards.
verify-cache cache="data/cache/imagenet256" *args:
    {{python}} pipeline/verify_cache.py {{cache}} {{args}}

# `just encode` runs this stage itself; use this for multi-GPU training (nproc > 1) or custom flags.
# Train (or resume) the Semantic VAE alone on a cache's DINO features.
semvae cache="data/cache/imagenet256" nproc="1" *args:
    {{python}} -m torch.distributed.run --standalone --nproc_per_node={{nproc}} pipeline/train_semvae.py --cache {{cache}} --run-dir {{cache}}.semvae {{args}}

# Encode throughput: the Ray job vs a plain sequential loop, tiny encoders, on N images (synthetic top-up).
bench-encode *args:
    HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled {{python}} bench/encode.py {{args}}

# Re-run every CPU bench (quick settings) and rewrite their table in docs/performance.md (~15 min on 2 cores).
bench *args:
    HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled {{python}} bench/all.py {{args}}

# Train (or resume: same command again) on `nproc` GPUs of this node, e.g. `just train sfd-xl 8`.
# Multi-node: see README (torchrun --nnodes/--node-rank/--rdzv-endpoint with the same flags).
train preset="sfd-xl" nproc="1" cache="data/cache/imagenet256" *args:
    {{python}} -m torch.distributed.run --standalone --nproc_per_node={{nproc}} train/main.py --preset {{preset}} --cache {{cache}} --out-dir runs/{{preset}} {{args}}

# A labelled sample grid from a run (latest EMA checkpoint) or a checkpoint file.
grid ckpt="runs/sfd-xl" stats="data/cache/imagenet256" *args:
    {{python}} sample/grid.py --ckpt {{ckpt}} --stats {{stats}} {{args}}

# 50K class-balanced samples (resumable), then FID/sFID/IS/precision/recall against the ADM reference batch.
fid ckpt="runs/sfd-xl" stats="data/cache/imagenet256" nproc="1" out="runs/fid50k" *args:
    {{python}} -m torch.distributed.run --standalone --nproc_per_node={{nproc}} eval/fid.py gen --ckpt {{ckpt}} --stats {{stats}} --out {{out}}/samples --npz {{out}}/samples.npz {{args}}
    {{python}} eval/fid.py calc {{out}}/samples.npz --ref weights/VIRTUAL_imagenet256_labeled.npz --out {{out}}/metrics.json

# Loss curves (and metrics vs step, if eval.jsonl exists) of one or more runs, as PNGs.
plot +runs:
    {{python}} eval/plot.py {{runs}}

# Latent-cache reader throughput (items/s) on a synthetic cache.
bench-reader *args:
    {{python}} bench/cache_reader.py {{args}}

# Trainer step time vs a plain eager loop, and FLOP/s vs measured matmul peak.
bench-train *args:
    {{python}} bench/train_step.py {{args}}

# Sampling throughput side by side (samples/s): the authors' torchdiffeq loop vs ours, eager and compiled.
bench-sample *args:
    {{python}} bench/sample.py {{args}}

# Sampler accuracy vs NFE for both grids against a tight reference; table, JSON and plot.
bench-sampler-accuracy *args:
    {{python}} bench/sampler_accuracy.py {{args}}

# The study on the demo data: SFD (Δt 0.3) vs Δt 0 vs no semantic channels, 3 seeds, guided and unguided (docs/study.md);
# `just study runs/study --preset sweep` adds the Δt sweep, `--preset schedules` the power and learned schedules.
study out="runs/study" *args:
    {{python}} pipeline/study.py --out {{out}} {{args}}

# What is under `dir` of the released files (published layout), and the public command for each missing one.
weights dir="weights" *args:
    {{python}} -m sfd.weights {{dir}} {{args}}

# Reproduce one published FID-50K (e.g. `just paper-fid xl-4m 8`): the authors' checkpoint, guide, AutoGuidance scale,
# dopri5 protocol, 50K balanced samples and ADM reference; rows: `python eval/paper_fid.py --help`.
paper-fid row nproc="1" weights="weights" *args:
    {{python}} eval/paper_fid.py {{row}} --nproc {{nproc}} --weights {{weights}} {{args}}

# The first GPU hour: training (eager | compile | triton, MFU, memory), sampling, encode, Inception, optimizer, each beside its prediction (stops at --budget-s, default 600 s).
bench-gpu out="runs/bench/gpu.json" *args:
    {{python}} bench/gpu.py --out {{out}} {{args}}

# Training memory per GPU for XL/1 and 1p0B/1 without a GPU (fake tensors), with and without activation checkpointing.
bench-memory *args:
    {{python}} bench/memory.py {{args}}
