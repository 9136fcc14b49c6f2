"""Configuration loading: the bundled files pass; every kind of mistake is named by key path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import DEFAULT_PATH, DEMO_PATH, ConfigError, get_config, load_config

BASE: dict[str, Any] = yaml.safe_load(DEFAULT_PATH.read_text())


def write(tmp_path: Path, data: Any, name: str = "mqi.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def broken(tmp_path: Path, change) -> ConfigError:
    """Load the default config after ``change(data)``; return the error it must raise."""
    data = copy.deepcopy(BASE)
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)  # every error names the file
    return info.value


def issues(error: ConfigError) -> dict[str, str]:
    return dict(error.issues)


@pytest.mark.parametrize("path", [DEFAULT_PATH, DEMO_PATH], ids=["default", "demo"])
def test_bundled_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.workflows["default_qa"] == ["run_interpreter", "run_moqui_sim", "convert_to_dicom",
                                           "compare_dose"]
    assert cfg.gpu.host in cfg.hosts


def test_demo_profile_is_labelled_simulated_and_local():
    cfg = load_config(DEMO_PATH)
    assert cfg.simulated is True and cfg.hosts["gpu"].kind == "local"
    assert load_config(DEFAULT_PATH).simulated is False


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    err = broken(tmp_path, lambda d: d["scanner"].update(stabilty_seconds=3))
    assert issues(err) == {"scanner.stabilty_seconds": "unknown key (did you mean "
                                                       "'stability_seconds'?)"}


def test_unknown_key_inside_a_named_host(tmp_path):
    err = broken(tmp_path, lambda d: d["hosts"]["gpu"].update(hostnme="x"))
    assert "hosts.gpu.hostnme" in issues(err)
    assert "did you mean 'hostname'" in issues(err)["hosts.gpu.hostnme"]


def test_a_secret_in_yaml_is_refused_with_the_way_out(tmp_path):
    err = broken(tmp_path, lambda d: d["hosts"]["gpu"].update(password="hunter2"))
    message = issues(err)["hosts.gpu.password"]
    assert "password_env" in message and "never live in the YAML" in message
    assert "hunter2" not in str(err)


def test_missing_section(tmp_path):
    err = broken(tmp_path, lambda d: d.pop("scanner"))
    assert issues(err) == {"scanner": "required section is missing"}


def test_missing_required_key(tmp_path):
    err = broken(tmp_path, lambda d: d["scanner"].pop("target_directory"))
    assert issues(err) == {"scanner.target_directory": "required key is missing"}


def test_wrong_type(tmp_path):
    err = broken(tmp_path, lambda d: d["prefect"].update(server_port="four thousand"))
    assert "prefect.server_port" in issues(err)
    assert "'four thousand'" in issues(err)["prefect.server_port"]


@pytest.mark.parametrize("port", [0, 70000])
def test_port_out_of_range(tmp_path, port):
    err = broken(tmp_path, lambda d: d["hosts"]["gpu"].update(port=port))
    assert f"(got {port})" in issues(err)["hosts.gpu.port"]


def test_workflow_naming_a_step_without_a_command(tmp_path):
    err = broken(tmp_path, lambda d: d["workflows"]["default_qa"].__setitem__(1, "run_moqui"))
    assert "workflows.default_qa[1]: no remote command 'run_moqui'" in str(err)


def test_empty_workflow_and_repeated_step(tmp_path):
    def change(d):
        d["workflows"]["empty"] = []
        d["workflows"]["twice"] = ["run_interpreter", "run_interpreter"]
    err = issues(broken(tmp_path, change))
    assert err["workflows.empty"] == "a workflow needs at least one step"
    assert "appears more than once" in err["workflows.twice"]


def test_command_template_with_unknown_placeholder(tmp_path):
    err = broken(tmp_path, lambda d: d["remote_commands"].update(
        run_interpreter="{python} {interpreter} --gpu {gpu_id}"))
    message = issues(err)["remote_commands.run_interpreter"]
    assert message.startswith("unknown placeholder {gpu_id}")  # gpu_id is for the simulation


def test_command_template_with_non_plain_field(tmp_path):
    err = broken(tmp_path, lambda d: d["remote_commands"].update(
        run_moqui_sim="{moqui} {input_file.__class__}"))
    assert "is not a plain {name}" in issues(err)["remote_commands.run_moqui_sim"]


def test_moqui_template_with_unknown_placeholder(tmp_path):
    err = broken(tmp_path, lambda d: d["moqui"].update(input_template="GPUID {gpu}\n"))
    assert issues(err)["moqui.input_template"].startswith("unknown placeholder {gpu}")


def test_moqui_parameters_become_placeholders(tmp_path):
    data = copy.deepcopy(BASE)
    data["moqui"]["parameters"]["histories"] = 1000000
    data["moqui"]["input_template"] += "TotalHistories {histories}\n"
    assert load_config(write(tmp_path, data)).moqui.parameters["histories"] == 1000000


def test_invalid_enum_and_retry_step(tmp_path):
    def change(d):
        d["moqui"]["output_format"] = "tiff"
        d["retries"]["steps"]["run_moqi_sim"] = {"retries": 1}
    err = issues(broken(tmp_path, change))
    assert "'tiff'" in err["moqui.output_format"]
    # reported after the first pass is fixed: pydantic errors come first
    data = copy.deepcopy(BASE)
    data["retries"]["steps"]["run_moqi_sim"] = {"retries": 1}
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data, "second.yaml"))
    assert "retries.steps.run_moqi_sim" in dict(info.value.issues)


def test_gpu_host_must_exist_and_ssh_hosts_need_address(tmp_path):
    def change(d):
        d["gpu"]["host"] = "gpu2"
        d["hosts"]["gpu"].pop("hostname")
    err = issues(broken(tmp_path, change))
    assert err["gpu.host"].startswith("no host named 'gpu2'")
    assert err["hosts.gpu.hostname"] == "required for an ssh host"


def test_lease_below_prefect_minimum(tmp_path):
    err = broken(tmp_path, lambda d: d["gpu"].update(lease_seconds=30))
    assert "gpu.lease_seconds" in issues(err)


@pytest.mark.parametrize("pattern", ["[a-z.]+", "^.*$", "^[a-z/]+$", "^([a-z$"])
def test_unsafe_or_broken_case_id_patterns(tmp_path, pattern):
    err = broken(tmp_path, lambda d: d["cases"].update(id_pattern=pattern))
    assert "cases.id_pattern" in issues(err)


def test_database_url_driver(tmp_path):
    err = broken(tmp_path, lambda d: d["prefect"].update(database_url="mysql://x"))
    assert "postgresql+asyncpg" in issues(err)["prefect.database_url"]


def test_yaml_errors_give_line_numbers(tmp_path):
    path = write(tmp_path, "prefect:\n  api_url: [unclosed\npaths: {}\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: line \d+"):
        load_config(path)


def test_duplicate_keys_are_refused(tmp_path):
    text = DEFAULT_PATH.read_text() + "\nsimulated: true\n"
    with pytest.raises(ConfigError, match="duplicate key 'simulated'"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text,message", [("", "the file is empty"),
                                          ("- a\n- b\n", "must be a mapping")])
def test_empty_or_non_mapping_file(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_env_var_wins_and_a_missing_file_says_where_it_came_from(tmp_path, monkeypatch):
    data = copy.deepcopy(BASE)
    data["scanner"]["stability_seconds"] = 7
    path = write(tmp_path, data)
    monkeypatch.setenv("MQI_CONFIG_PATH", str(path))
    assert load_config().scanner.stability_seconds == 7
    monkeypatch.setenv("MQI_CONFIG_PATH", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"file not found \(from \$MQI_CONFIG_PATH\)"):
        load_config()
    monkeypatch.delenv("MQI_CONFIG_PATH")
    assert load_config().scanner.stability_seconds == BASE["scanner"]["stability_seconds"]


def test_get_config_loads_once(tmp_path, monkeypatch):
    path = write(tmp_path, BASE)
    monkeypatch.setenv("MQI_CONFIG_PATH", str(path))
    get_config.cache_clear()
    first = get_config()
    path.write_text("not: [valid")  # a later edit is not seen until the cache is cleared
    assert get_config() is first
    get_config.cache_clear()
    with pytest.raises(ConfigError):
        get_config()
    get_config.cache_clear()


def test_relative_and_home_paths_are_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = copy.deepcopy(BASE)
    data["scanner"]["target_directory"] = "incoming"
    data["paths"].pop("data_dir")  # the default is expanded too
    cfg = load_config(write(tmp_path, data))
    assert cfg.scanner.target_directory == tmp_path / "incoming"
    assert cfg.paths.data_dir == tmp_path / "home" / ".mqi"


def test_step_policy_inherits_defaults():
    cfg = load_config(DEFAULT_PATH)
    sim = cfg.policy("run_moqui_sim")
    assert (sim.retries, sim.timeout_seconds, sim.retry_delay_seconds) == (1, 7200, 30)
    assert cfg.policy("run_interpreter") == cfg.retries.default
