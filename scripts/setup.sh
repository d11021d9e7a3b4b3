#!/usr/bin/env bash
# Set up everything the commands and the tests need on a bare machine: .venv at the repository root
# with hybrid-sd and its pinned dependencies, the generated gRPC stubs, and the test tools: the dev
# extra (pytest, ruff), docker-compose, with which tests/test_compose.py validates the cluster
# files (no Docker engine is needed), and iproute2 for the slow-link test. `--runtime-only` (the
# image, docker/Dockerfile) skips the test tools. Safe to run again: each step only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime_only=false
case "${1:-}" in
  "") ;;
  --runtime-only) runtime_only=true ;;
  *) echo "usage: bash scripts/setup.sh [--runtime-only]" >&2; exit 2 ;;
esac

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if $runtime_only; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
else
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
fi
# The gRPC stubs are build output (git-ignored), generated from the one API contract.
.venv/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/hybrid_sd/v1/hybrid_sd.proto

# Debian packages the tests use, installed as root with apt; elsewhere one line says what to install.
apt_install() {  # PACKAGE WHAT-FAILS-WITHOUT-IT
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq -o DPkg::Lock::Timeout=300
    apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$1" >/dev/null
  else
    echo "setup.sh: $1 is missing and needs root to install (Debian: sudo apt-get install $1); $2" >&2
  fi
}
if ! $runtime_only; then
  # iproute2 (`ip`, `tc`): tests/test_slow_link.py puts the edge worker behind a shaped veth link.
  { command -v ip && command -v tc; } >/dev/null || apt_install iproute2 "the slow-link test fails without it"
  # Debian's docker-compose (1.29) resolves and validates the compose files against the Compose
  # specification. It is not a pip dependency: its PyPI release pins an old PyYAML and docker SDK.
  command -v docker-compose >/dev/null || apt_install docker-compose "the compose tests fail without it"
  # Chromium and its WebDriver: tests/test_http.py drives the web page in a headless browser.
  command -v chromium >/dev/null || apt_install chromium "the browser test skips without it"
  command -v chromedriver >/dev/null || apt_install chromium-driver "the browser test skips without it"
fi
