"""The mqi command line, run as a user runs it: a subprocess with exit codes."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import yaml

from config import DEFAULT_PATH, DEMO_PATH

BASE = yaml.safe_load(DEFAULT_PATH.read_text())


def mqi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=60)


def test_config_check_passes_on_bundled_configs():
    for path in (DEFAULT_PATH, DEMO_PATH):
        result = mqi("config", "check", str(path))
        assert result.returncode == 0, result.stderr
        assert f"{path}: valid" in result.stdout
        assert yaml.safe_load(result.stdout)["workflows"]["default_qa"][0] == "run_interpreter"


def test_config_check_uses_the_env_var(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(BASE))
    result = mqi("config", "check", env={"MQI_CONFIG_PATH": str(path)})
    assert result.returncode == 0 and f"{path}: valid" in result.stdout


def test_config_check_fails_clearly_without_traceback(tmp_path):
    data = copy.deepcopy(BASE)
    data["workflows"]["default_qa"][1] = "run_moqui"
    data["hosts"]["gpu"]["port"] = 99999
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    result = mqi("config", "check", str(path))
    assert result.returncode == 2
    assert f"invalid configuration in {path}" in result.stderr
    assert "hosts.gpu.port" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_config_check_never_prints_secrets(tmp_path):
    data = copy.deepcopy(BASE)
    data["prefect"]["database_url"] = "postgresql+asyncpg://mqi:db-hunter2@db.local:5432/mqi"
    data["hosts"]["gpu"]["password_env"] = "MQI_TEST_GPU_PASSWORD"
    data["hosts"]["gpu"]["passphrase_env"] = "MQI_TEST_UNSET_PASSPHRASE"
    path = tmp_path / "secret.yaml"
    path.write_text(yaml.safe_dump(data))
    result = mqi("config", "check", str(path), env={"MQI_TEST_GPU_PASSWORD": "gpu-hunter2"})
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["prefect"]["database_url"] == "postgresql+asyncpg://mqi:***@db.local:5432/mqi"
    assert shown["hosts"]["gpu"]["password_env"] == "MQI_TEST_GPU_PASSWORD (set)"
    assert shown["hosts"]["gpu"]["passphrase_env"] == "MQI_TEST_UNSET_PASSPHRASE (not set)"


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "mqi"
    result = subprocess.run([str(exe), "config", "check", str(DEMO_PATH)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_cli_does_not_import_prefect_before_it_sets_the_api_address():
    # Prefect reads its settings at import: an early import would ignore the
    # configured API and quietly start a server of its own.
    code = "import sys, deployments.cli; sys.exit('prefect' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
