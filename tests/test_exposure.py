"""The embedded server listens beyond loopback only with PREFECT_SERVER_API_AUTH_STRING."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from config import DEFAULT_PATH
from deployments.cli import main
from deployments.exposure import (
    CLIENT_AUTH_ENV,
    SERVER_AUTH_ENV,
    client_auth_env,
    is_loopback,
)
from tests.support.pipeline import REPO, stop, wait_for
from tests.support.sshd import free_port


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.20",
                                  "no-such-host.invalid"])
def test_hosts_other_machines_can_reach(host):
    assert not is_loopback(host)


def write_config(root: Path, server_host: str, port: int = 4200) -> Path:
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["prefect"].update(server_host=server_host, server_port=port)
    data["paths"].update(data_dir=str(root / "data"))
    data["scanner"]["target_directory"] = str(root / "scan")
    path = root / "mqi.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_up_refuses_to_bind_beyond_loopback_without_auth_string(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(SERVER_AUTH_ENV, raising=False)
    config = write_config(tmp_path, "0.0.0.0")
    assert main(["up", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"prefect.server_host in {config} is '0.0.0.0'" in err
    assert SERVER_AUTH_ENV in err and "SSH tunnel" in err
    assert not (tmp_path / "data").exists()  # refused before anything was started or locked


def test_an_empty_auth_string_protects_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(SERVER_AUTH_ENV, "")
    assert main(["up", "--config", str(write_config(tmp_path, "10.1.2.3"))]) == 2
    assert SERVER_AUTH_ENV in capsys.readouterr().err


def test_clients_get_the_servers_auth_string():
    assert client_auth_env({SERVER_AUTH_ENV: "mqi:s3cret"}) == {CLIENT_AUTH_ENV: "mqi:s3cret"}
    # a client's own setting wins; nothing when the server has none
    assert client_auth_env({SERVER_AUTH_ENV: "a:b", CLIENT_AUTH_ENV: "c:d"}) == {}
    assert client_auth_env({}) == {}


@pytest.mark.integration
def test_up_beyond_loopback_with_auth_string_asks_for_it(tmp_path):
    """Bound to every interface with an auth string: the API refuses a caller without it,
    and `mqi` commands given only the server's variable get in."""
    port = free_port()
    config = write_config(tmp_path, "0.0.0.0", port)
    data = yaml.safe_load(config.read_text())
    data["processes"]["start"] = ["server"]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**_env(), SERVER_AUTH_ENV: "mqi:test-secret"}
    up = subprocess.Popen([sys.executable, "-m", "deployments.cli", "up", "--config",
                           str(config)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: _answers(api), 90, "the server's health check")
        assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code == 401
        status = subprocess.run([sys.executable, "-m", "deployments.cli", "status", "--config",
                                 str(config)], env=env, cwd=REPO, capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        assert "test-secret" not in status.stdout + status.stderr
    finally:
        stop(up)


def _answers(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (SERVER_AUTH_ENV, CLIENT_AUTH_ENV, "PREFECT_API_URL")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env
