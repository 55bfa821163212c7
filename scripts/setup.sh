#!/usr/bin/env bash
# Creates .venv in the repository root and installs the pinned runtime dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
# Training scripts run anywhere in this environment import the callback library
# (`from custom_keras.callbacks import CustomCallbacks`): put the repository on the path.
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd > "$site_packages/training_visualizer.pth"
