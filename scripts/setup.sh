#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch and caster installed in editable mode.
# GPU users: see README ("GPU") and set CASTER_TORCH to the torch requirement you want.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "${CASTER_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]'
