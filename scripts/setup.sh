#!/usr/bin/env bash
# Create .venv at the repository root and install hybrid-sd with its pinned dependencies.
# Safe to run again: pip only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# The gRPC stubs are build output (git-ignored), generated from the one API contract.
.venv/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/hybrid_sd/v1/hybrid_sd.proto
