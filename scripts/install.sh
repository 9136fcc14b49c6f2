#!/usr/bin/env bash
# Install MQI Communicator into ./.venv (created with python3 >= 3.11 if missing).
#   scripts/install.sh          the application
#   scripts/install.sh test     plus what the test suite needs (pytest, ruff, mypy,
#                               OpenSSH's sshd, PostgreSQL and Chromium for the
#                               integration tests)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'PY' || { echo "error: Python 3.11 or newer is required (PYTHON=$PYTHON)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ "${1:-}" = "test" ]; then
    # The integration tests run a real sshd, a real PostgreSQL for the distributed
    # set-up (the one on 127.0.0.1:5432 when it runs, else one they start themselves),
    # and Debian's Chromium with its matching driver for the dashboard test.
    packages=""
    [ -x /usr/sbin/sshd ] || packages="openssh-server"
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages="$packages postgresql"
    [ -x /usr/bin/chromium ] || packages="$packages chromium"
    [ -x /usr/bin/chromedriver ] || packages="$packages chromium-driver"
    if [ -n "$packages" ]; then
        echo "installing:$packages (for the integration tests) ..."
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        # shellcheck disable=SC2086 - a list of package names
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $packages >/dev/null
    fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/python -m pip install -q -e ".${extra}" 2>&1 | grep -v '^WARNING: Location' || true
# -I: from the installation only, not from this folder (the demo's and the tests'
# simulators run as `python -m demo.simulators.<tool>` in other folders).
.venv/bin/python -I -c "import prefect, paramiko, pydicom, deployments.cli, demo.simulators" \
    || { echo "error: installation incomplete" >&2; exit 1; }
echo "installed: $(.venv/bin/python -m prefect --version | head -1 | sed 's/^/prefect /')"
