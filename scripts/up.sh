#!/usr/bin/env bash
# Install, then start MQI Communicator on this machine with the demo profile
# (embedded Prefect server on SQLite, bundled simulators). Ctrl+C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/mqi up --config "${MQI_CONFIG_PATH:-config/demo.yaml}"
