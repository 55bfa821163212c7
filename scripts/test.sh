#!/usr/bin/env bash
# Set up and run every test: installs the runtime, test and Ray dependencies, Debian's
# chromium for the browser tests (when missing and we may install it), then pytest.
# With arguments, they go to one pytest. Without, two pytest jobs run in parallel: the
# tests that need a local Ray head (marked 'ray'; starting Ray and its jobs takes
# minutes), logged to test-artifacts/ray-tests.log and printed at the end, and all the others.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-test.txt -r requirements-ray.txt
# Xplique pins TensorFlow <= 2.20 and tf-keras requires the full tensorflow package:
# both go in without their dependencies (what Xplique imports is in requirements-test.txt).
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps xplique==2.0.2 tf-keras==2.21.0
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
if [ "$#" -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
mkdir -p test-artifacts
.venv/bin/python -m pytest -m ray > test-artifacts/ray-tests.log 2>&1 &
ray_job=$!
status=0
.venv/bin/python -m pytest -m "not ray" || status=$?
wait "$ray_job" || status=$?
echo "----- the tests marked 'ray' (test-artifacts/ray-tests.log) -----"
cat test-artifacts/ray-tests.log
exit "$status"
