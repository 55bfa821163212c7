#!/usr/bin/env bash
# Set up and start the visualizer: Flask (port 5000) and the Bokeh server (port 5006).
# Settings come from environment variables; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${VISUALIZER_RUNNER:-local}" = "ray" ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements-ray.txt
fi
exec .venv/bin/python -m visualizer "$@"
