#!/usr/bin/env bash
# Creates .venv in the repository root and installs the pinned runtime dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every run is sandboxed with bubblewrap: install Debian's when it is missing and we may.
# Without it the server still starts, says why and refuses to run scripts.
if ! command -v bwrap >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    if ! { command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; } \
           && $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap >/dev/null; }; then
        echo "scripts/setup.sh: could not install bubblewrap (bwrap); runs will be refused until" \
             "it is installed (or VISUALIZER_SANDBOX=off runs scripts unsandboxed, unsafe)" >&2
    fi
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
# The project itself, editable (pyproject.toml): training scripts run anywhere in this
# environment import the callback library (`from custom_keras.callbacks import
# CustomCallbacks`), and so do the runs' sandbox and the servers. Installed once per
# checkout; setup.sh runs at every start.
if ! .venv/bin/python -I - "$PWD" 2>/dev/null <<'PYTHON'
import json, sys
from importlib import metadata
url = json.loads(metadata.distribution("training-visualizer").read_text("direct_url.json"))["url"]
sys.exit(url != "file://" + sys.argv[1])
PYTHON
then
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
fi
# The path file that earlier versions of this script wrote is replaced by the install above.
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site_packages/training_visualizer.pth"
# The Explore page's demo network (trained offline in a few seconds, once): where the server
# looks for it (VISUALIZER_DEMO_DIR, else <instance>/demo).
DEMO_DIR=$(.venv/bin/python -c 'from visualizer import config; print(config.demo_dir(config.settings_from_env()))')
if [ ! -f "$DEMO_DIR/model.keras" ]; then
    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m custom_keras.demo "$DEMO_DIR"
fi
