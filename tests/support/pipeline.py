"""A whole test installation: config pointing at the real sshd, the simulators and a
real Prefect server, plus helpers to read what the simulators recorded."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from config import DEFAULT_PATH
from tests.support.database import seed
from tests.support.sshd import SshServer, free_port

REPO = Path(__file__).resolve().parents[2]
GPU_QUERY = ("--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,"
             "utilization.gpu,temperature.gpu --format=csv,noheader,nounits")
APPS_QUERY = "--query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader,nounits"

# Every wait of a test (wait_for, start_up) and every scenario budget is multiplied by
# this. The figures in the tests are a few times what they take on an idle 2-core
# machine; the machine CI runs on is shared, and a run there has taken 2.8 times as long
# as the same run here. A wait is a hang detector, not a speed check, so it waits longer
# rather than fail a case that is merely slow. It costs nothing where the wait ends early.
PATIENCE = float(os.environ.get("MQI_TEST_PATIENCE", "2.5"))


@dataclass
class Installation:
    root: Path
    config: Path
    control: Path
    record: Path
    state: Path
    scan_root: Path
    results: Path
    remote_root: Path
    api_url: str

    def set_control(self, **values: Any) -> None:
        """Steer the simulators (duration, batches, gpus, fail); record/state are kept."""
        data = {"duration": 1.0, "batches": 5, "gpus": 2, "fail": {},
                "record": str(self.record), "state_dir": str(self.state)}
        data.update(values)
        self.control.write_text(json.dumps(data))

    def events(self, tool: str | None = None) -> list[dict[str, Any]]:
        return read_record(self.record, tool)

    def sim_intervals(self) -> dict[int, list[tuple[float, float, str]]]:
        """GPU index -> [(start, end, beam)] of every finished simulated MOQUI run."""
        return sim_intervals(self.events("tps_env"))

    def env(self) -> dict[str, str]:
        """Environment for `mqi` subprocesses of this installation."""
        return {**os.environ, "MQI_CONFIG_PATH": str(self.config),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def start_up(self, timeout: float = 120) -> subprocess.Popen[str]:
        """`mqi up` on this installation, returned once it printed its dashboard address
        (``timeout`` times PATIENCE)."""
        timeout *= PATIENCE
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.cli", "up", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env(),
            cwd=REPO)
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            seen.append(line)
            if not line or "Dashboard:" in line:
                break
        if proc.poll() is not None or not any("Dashboard:" in ln for ln in seen):
            proc.kill()
            raise RuntimeError("mqi up did not come up:\n" + "".join(seen[-30:]))
        # Keep reading what it prints (into up.log): a pipe nobody drains fills up
        # and would stall `mqi up` mid-test.
        threading.Thread(target=_drain, args=(proc, self.root / "up.log", seen),
                         daemon=True).start()
        return proc

    def mqi(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deployments.cli", *args],
                              capture_output=True, text=True, env=self.env(), timeout=timeout,
                              cwd=REPO)


def read_record(record: Path, tool: str | None = None) -> list[dict[str, Any]]:
    """What the simulators recorded in ``record`` (of ``tool`` only, when given)."""
    if not record.exists():
        return []
    rows = [json.loads(line) for line in record.read_text().splitlines() if line]
    return [r for r in rows if tool is None or r["tool"] == tool]


def sim_intervals(events: list[dict[str, Any]]) -> dict[int, list[tuple[float, float, str]]]:
    """GPU index -> [(start, end, beam)] of every finished simulated MOQUI run in
    ``events`` (tps_env's records)."""
    starts: dict[int, dict[str, Any]] = {}
    by_gpu: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for e in events:
        if e["event"] == "start":
            starts[e["pid"]] = e
        elif e["event"] == "end" and e["pid"] in starts:
            s = starts.pop(e["pid"])
            by_gpu[e["gpu"]].append((s["t"], e["t"], f"{s['input']}"))
    return by_gpu


def stop(proc: subprocess.Popen[Any], grace: float = 60) -> None:
    """SIGTERM a process (`mqi up`, a worker), then SIGKILL it if it outlives ``grace``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _drain(proc: subprocess.Popen[str], log: Path, first: list[str]) -> None:
    with log.open("a") as out:
        out.writelines(first)
        for line in proc.stdout or ():
            out.write(line)
            out.flush()


def write_installation(root: Path, sshd: SshServer, port: int | None = None) -> Installation:
    """Write the config of a test installation under ``root`` (nothing started)."""
    root.mkdir(parents=True, exist_ok=True)
    inst = Installation(
        root=root, config=root / "mqi.yaml", control=root / "control.json",
        record=root / "sim-record.jsonl", state=root / "gpu-state", scan_root=root / "scan",
        results=root / "results", remote_root=root / "remote",
        api_url="")
    port = port or free_port()
    inst.api_url = f"http://127.0.0.1:{port}/api"
    inst.scan_root.mkdir(exist_ok=True)
    inst.set_control()
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    py = sys.executable
    smi = f"{py} -m {simulator('nvidia_smi')} --control {inst.control}"
    data["prefect"].update(server_port=port)
    data["paths"] = {"data_dir": str(root / "data"), "results_root": str(inst.results),
                     "remote_work_root": str(inst.remote_root), "clean_remote_work_dir": False}
    data["scanner"]["target_directory"] = str(inst.scan_root)
    data["hosts"] = {"gpu": {
        "kind": "ssh", "hostname": "127.0.0.1", "port": sshd.port, "username": sshd.username,
        "private_key_path": str(sshd.client_key), "known_hosts_path": str(sshd.known_hosts),
        "connect_retries": 1, "kill_grace_seconds": 2.0}}
    data["gpu"].update(query_command=f"{smi} {GPU_QUERY}", apps_command=f"{smi} {APPS_QUERY}",
                       min_free_memory_mib=1024, lease_seconds=60, max_wait_seconds=120,
                       lock_dir=str(root / "gpu-locks"), poll_seconds=0.5,
                       concurrency_limit=f"mqi-gpu-{port}")
    data["tools"] = {
        "python": py,
        "interpreter": ["-m", simulator("interpreter"), "--control", str(inst.control)],
        "moqui": [py, "-m", simulator("tps_env"), "--control", str(inst.control)],
        "raw2dicom": ["-m", simulator("raw2dicom"), "--control", str(inst.control)],
    }
    data["retries"] = {"default": {"retries": 0, "retry_delay_seconds": 0, "backoff_factor": 1,
                                   "timeout_seconds": 300}, "steps": {}}
    data["simulated"] = True
    inst.config.write_text(yaml.safe_dump(data, sort_keys=False))
    seed(root / "data" / "prefect" / "mqi.db")  # the server's database, migrated already
    return inst


def quick_installation(root: Path, sshd: SshServer) -> Installation:
    """``write_installation`` with a 1 s stability window and short simulations: cases
    dropped into its scan root start and end within seconds."""
    installation = write_installation(root, sshd)
    data = yaml.safe_load(installation.config.read_text())
    data["scanner"].update(stability_seconds=1.0)
    installation.config.write_text(yaml.safe_dump(data, sort_keys=False))
    installation.set_control(duration=0.3, batches=2)
    return installation


@contextlib.contextmanager
def serving(installation: Installation) -> Iterator[Installation]:
    """The installation's Prefect server running, this process's Prefect settings and
    MQI_CONFIG_PATH pointing at it (flows called here run against it)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from config import get_config, load_config
    from deployments import server

    cfg = load_config(installation.config)
    proc = server.start_server(cfg, installation.root / "server.log")
    # Prefect's events worker is one per process, bound to the API it first saw: drained
    # here, the next event starts one bound to this server.
    _drain_events()
    previous = os.environ.get("MQI_CONFIG_PATH")
    os.environ["MQI_CONFIG_PATH"] = str(installation.config)
    get_config.cache_clear()
    try:
        with temporary_settings(updates={
                PREFECT_API_URL: installation.api_url,
                PREFECT_LOCAL_STORAGE_PATH: server.prefect_home(cfg) / "storage"}):
            yield installation
    finally:
        if previous is None:
            os.environ.pop("MQI_CONFIG_PATH", None)
        else:
            os.environ["MQI_CONFIG_PATH"] = previous
        get_config.cache_clear()
        from prefect.logging.handlers import APILogHandler

        try:
            APILogHandler().flush()  # ship queued run logs before the server goes away
            _drain_events()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def _drain_events() -> None:
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=10)


def simulator(tool: str) -> str:
    """The module of a simulated tool, for ``python -m``."""
    _check_demo_installed()
    return f"demo.simulators.{tool}"


@functools.cache
def _check_demo_installed() -> None:
    """Over sshd the tools run in a fresh login with the test's Python, outside the
    checkout: that Python must import ``demo`` from its installation."""
    found = subprocess.run([sys.executable, "-c", "import demo.simulators"], cwd="/",
                           capture_output=True, text=True, timeout=60)
    if found.returncode != 0:
        raise RuntimeError(f"{sys.executable} cannot import demo.simulators outside the "
                           f"checkout; reinstall (scripts/install.sh test):\n"
                           f"{found.stderr[-500:]}")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after
    ``timeout`` times PATIENCE seconds."""
    timeout *= PATIENCE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
