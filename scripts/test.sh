#!/usr/bin/env bash
# Set up and run every test: installs the runtime and test dependencies, Debian's
# chromium for the browser tests (when missing and we may install it), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-test.txt
# Xplique pins TensorFlow <= 2.20 and tf-keras requires the full tensorflow package:
# both go in without their dependencies (what Xplique imports is in requirements-test.txt).
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps xplique==2.0.2 tf-keras==2.21.0
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
exec .venv/bin/python -m pytest "$@"
