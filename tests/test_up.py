"""`mqi up` on a temp data dir: starts the embedded Prefect server, refuses a second
instance, and leaves no process behind on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from config import DEMO_PATH
from tests.support.sshd import free_port

pytestmark = pytest.mark.integration


def pgrep(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return out.split()


def test_up_starts_the_server_and_stops_cleanly(tmp_path):
    port = free_port()
    data = yaml.safe_load(DEMO_PATH.read_text())
    data["paths"]["data_dir"] = str(tmp_path / "data")
    data["prefect"]["server_port"] = port
    config = tmp_path / "mqi.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "deployments.cli", "up", "--config", str(config)]
    up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)
    try:
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Dashboard:" in line:
                break
        assert any(f"Dashboard: http://127.0.0.1:{port}" in line for line in lines), lines
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).json() is True
        assert (tmp_path / "data" / "prefect" / "mqi.db").exists()  # SQLite under the data dir
        assert pgrep(f"prefect server start .*--port {port}")

        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode == 1 and "already answers" in second.stderr

        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        deadline = time.monotonic() + 10
        while pgrep(f"prefect server start .*--port {port}") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pgrep(f"prefect server start .*--port {port}") == []
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in pgrep(f"prefect server start .*--port {port}"):
            os.kill(int(pid), signal.SIGKILL)
