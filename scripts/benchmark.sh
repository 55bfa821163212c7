#!/usr/bin/env bash
# Run every benchmark: techniques and training overhead, the attribution methods
# against one forward+backward pass, the sandbox, the dashboards in Debian's chromium,
# then runs as Ray jobs against local runs. Each figure is a ratio measured within one
# run. Extra arguments go to benchmarks.techniques (--quick for a shorter epoch,
# --rounds N for N epochs of each kind instead of one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pip install --quiet --disable-pip-version-check -r benchmarks/requirements.txt -r requirements-ray.txt
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/python -m benchmarks.techniques "$@"
.venv/bin/python -m benchmarks.attribution
.venv/bin/python -m benchmarks.sandbox
.venv/bin/python -m benchmarks.health "$@"
.venv/bin/python -m benchmarks.dashboards
.venv/bin/python -m benchmarks.compare
.venv/bin/python -m benchmarks.explore_browser
.venv/bin/python -m benchmarks.logins
.venv/bin/python -m benchmarks.hostile_run_folder
.venv/bin/python -m benchmarks.ray_runner
.venv/bin/python -m benchmarks.explore
