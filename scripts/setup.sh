#!/usr/bin/env bash
# Create .venv at the repository root and install hybrid-sd with its pinned dependencies.
# Safe to run again: pip only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
