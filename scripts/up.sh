#!/usr/bin/env bash
# Install, then start MQI Communicator on this machine with the demo profile
# (embedded Prefect server on SQLite, the bundled simulators, 2 simulated GPUs),
# process one synthetic 3-beam case end to end, print where its RT Dose files
# are and the dashboard address, and keep running. Ctrl+C stops everything.
# Extra arguments go to `mqi demo` (e.g. --once).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/mqi demo "$@"
