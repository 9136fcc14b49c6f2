"""Shared fixtures: a real sshd for the session, and both host kinds behind one fixture."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pipeline import PATIENCE
from tests.support.sshd import SshServer

# Prefect must never phone home from a test run, nor write into the user's ~/.prefect.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="mqi-test-prefect-"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A ``scenario(budget=s)`` test fails past its budget times PATIENCE
    (pytest-timeout), so a hang in one fails that test with its traceback instead of
    running CI out of time.

    (Starting the scenario files first, longest first, was tried: two of them side by
    side on two cores starved the SQLite servers into 503s, and the suite took 1375 s
    against 1070 s with xdist's own order, which pairs them with short tests.)
    """
    for item in items:
        marker = item.get_closest_marker("scenario")
        if marker is None:
            continue
        budget = float(marker.kwargs.get("budget", marker.args[0] if marker.args else 0))
        if budget <= 0:
            raise pytest.UsageError(f"{item.nodeid}: scenario(budget=seconds) needs a budget "
                                    "above 0")
        item.add_marker(pytest.mark.timeout(budget * PATIENCE))


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A real OpenSSH sshd on a free 127.0.0.1 port. Fails (never skips) when unavailable."""
    server = SshServer(tmp_path_factory.mktemp("sshd")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server (the embedded one `mqi up` starts) with the process-case
    deployment registered and served by nobody: runs stay Scheduled and can be counted.
    Prefect's settings point at it for the whole session."""
    import signal

    import yaml
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from config import DEFAULT_PATH
    from config.loader import parse_config
    from deployments import server
    from tests.support.sshd import free_port

    root = tmp_path_factory.mktemp("prefect-server")
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["paths"]["data_dir"] = str(root / "data")
    data["prefect"]["server_port"] = free_port()
    cfg = parse_config(data, root / "mqi.yaml")
    proc = server.start_server(cfg, root / "server.log")
    url = cfg.prefect.effective_api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            from flows.process_case import process_case

            process_case.to_deployment(name="process-case").apply()
            yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.fixture
def remote(sshd: SshServer):
    host = sshd.remote_host()
    try:
        yield host
    finally:
        host.close()


@pytest.fixture(params=["ssh", "local"])
def host(request: pytest.FixtureRequest, sshd: SshServer):
    """Each test using this runs once against RemoteHost (real sshd) and once against LocalHost."""
    if request.param == "ssh":
        h = sshd.remote_host(kill_grace_period=2.0)
    else:
        from blocks.local_host import LocalHost

        h = LocalHost(kill_grace_period=2.0)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small case-shaped tree with awkward names (spaces, shell metacharacters, unicode)."""
    root = tmp_path / "src"
    files = {
        "RP.1.2.3.dcm": os.urandom(5000),
        "2025010112000000/PlanInfo.txt": b"DICOM_BEAM_NUMBER,1\n",
        "2025010112000000/02_1_p_1_001.ptn": os.urandom(60 * 1024),
        "2025010112000000/sub dir/a b.mgn": os.urandom(1024),
        "weird/$(touch pwned); rm -rf x 'q' \"d\" `id` ünï.txt": b"literal\n",
        "weird/-n": b"dash\n",
        "empty.txt": b"",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root
