"""The mqi command line, run as a user runs it: a subprocess with exit codes."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config import DEFAULT_PATH, DEMO_PATH
from deployments.cli import build_parser
from tests.support.sshd import free_port

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
    assert result.stderr == \
        f"mqi: config {path} (from MQI_CONFIG_PATH); Prefect API http://127.0.0.1:4200/api\n"


def test_each_command_says_once_which_config_and_api_it_used(tmp_path):
    env = {"MQI_CONFIG_PATH": ""}
    api = "Prefect API http://127.0.0.1:4200/api"
    said = mqi("config", "check", env=env).stderr
    assert said == f"mqi: config {DEFAULT_PATH} (default); {api}\n"
    said = mqi("--verbose", "config", "check", str(DEMO_PATH), env=env).stderr
    assert said.splitlines()[0] == f"mqi: config {DEMO_PATH} (argument); {api}"
    # the API another installation's file names is said, before anything else
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**BASE, "prefect": {**BASE["prefect"],
                                                         "api_url": "http://gpu-box:4200/api"}}))
    said = mqi("config", "check", str(other), env=env).stderr
    assert said == f"mqi: config {other} (argument); Prefect API http://gpu-box:4200/api\n"
    # mqi demo has a default of its own; a broken file stops it before anything starts
    path = tmp_path / "broken.yaml"
    path.write_text("scanner: [\n")
    result = mqi("demo", "--once", "--config", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"mqi: config {path} (--config); Prefect API unknown "
                                    f"(the configuration is not valid)\nmqi: ")
    assert result.stderr.count("mqi: config ") == 1 and "Traceback" not in result.stderr


def test_config_check_fails_clearly_without_traceback(tmp_path):
    data = copy.deepcopy(BASE)
    data["workflows"]["default_qa"][1] = "run_moqui"
    data["hosts"]["gpu"]["port"] = 99999
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    result = mqi("config", "check", str(path))
    assert result.returncode == 2
    assert f"mqi: invalid configuration in {path}" in result.stderr
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


def test_an_expected_failure_is_a_message_and_its_exit_status(tmp_path):
    data = copy.deepcopy(BASE)
    data["paths"]["data_dir"] = str(tmp_path / "data")
    data["prefect"]["server_port"] = free_port()  # nothing answers: an in-process server
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    result = mqi("run", str(tmp_path / "no-such-case"), "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == f"mqi: not a case folder: {tmp_path}/no-such-case"
    assert "Traceback" not in result.stderr


def test_rerun_needs_a_case_or_all_failed():
    result = mqi("rerun")
    assert result.returncode == 2 and "CASE_ID" in result.stderr.upper()
    result = mqi("rerun", "some-case", "--all-failed")
    assert result.returncode == 2 and "not allowed with" in result.stderr


def _every_parser(parser):
    yield parser
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):  # subcommands; a list is an option's choices
            for sub in choices.values():
                if isinstance(sub, type(parser)):
                    yield from _every_parser(sub)


@pytest.mark.parametrize("parser", list(_every_parser(build_parser())),
                         ids=lambda p: p.prog)
def test_every_argument_and_command_has_help(parser):
    for action in parser._actions:
        assert action.help, f"{parser.prog}: {action.dest} has no help"
        for choice in getattr(action, "_choices_actions", []):
            assert choice.help, f"{parser.prog} {choice.dest} has no help"


def test_the_demo_says_how_to_look_at_it_and_those_commands_parse():
    from deployments.demo import how_to_look

    said = how_to_look(Path("/opt/mqi demo/demo.yaml"), "DEMO-1").splitlines()
    assert said[1:] == ["  mqi status --config '/opt/mqi demo/demo.yaml'",
                        "  mqi logs --config '/opt/mqi demo/demo.yaml' DEMO-1"]
    parser = build_parser()
    status = parser.parse_args(["status", "--config", "/opt/mqi demo/demo.yaml"])
    logs = parser.parse_args(["logs", "--config", "d.yaml", "DEMO-1", "--step", "inspect",
                              "--beam", "2"])
    assert status.config == "/opt/mqi demo/demo.yaml"
    assert (logs.case_id, logs.step, logs.beam) == ("DEMO-1", "inspect", 2)
