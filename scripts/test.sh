#!/usr/bin/env bash
# Set up and run every test: installs the runtime, test and Ray dependencies, Debian's
# chromium for the browser tests (when missing and we may install it), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-test.txt -r requirements-ray.txt
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
exec .venv/bin/python -m pytest "$@"
