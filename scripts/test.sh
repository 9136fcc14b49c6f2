#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
export PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/ruff check .
# type check config/ blocks/ flows/ deployments/ demo/ ([tool.mypy] in pyproject.toml)
.venv/bin/mypy
# Two workers, a whole test file each (its module fixtures stay in one process): most
# integration tests wait on servers and sshd, so two run side by side on two cores.
exec .venv/bin/python -m pytest -n "${MQI_TEST_WORKERS:-2}" --dist loadfile "$@"
