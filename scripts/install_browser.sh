#!/usr/bin/env bash
# Install Chromium (Debian's package) and Playwright's Python client for tests/test_browser.py.
# Idempotent: does nothing that is already done (chromium's recommended fonts render the
# screenshot). Needs root (or sudo) for apt-get.
# Playwright only drives the system browser (/usr/bin/chromium): never run
# `playwright install`, which downloads a browser of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c "import playwright" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q "playwright>=1.40"
fi
chromium --version
