# SFD runbook: every user-facing command is a recipe. `just --list` shows them all.
# Variables can be overridden on the command line: `just python=python3.12 test`.

python := "python3"

# List the recipes.
default:
    @just --list

# Install the pinned dependencies and this repository (editable) into the current Python.
setup:
    {{python}} -m pip install -r requirements.txt
    {{python}} -m pip install -e . --no-deps

# Run the test suite (CPU only, offline; the command CI runs).
test *args:
    HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled {{python}} -m pytest -q {{args}}

# Lint with ruff (style and likely bugs).
lint:
    {{python}} -m ruff check sfd tests bench

# Smallest end-to-end run on random tiny models: model -> three-phase sampler -> decoder -> PNG.
smoke out="runs/smoke":
    HF_HUB_OFFLINE=1 {{python}} bench/smoke.py --out {{out}}
