"""The GPU curator against the real H100 captures (served by a fake nvidia-smi over the
real sshd), a real Prefect server and real processes holding real GPU locks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from config import get_config, load_config
from flows.gpu_survey import parse_survey
from flows.gpu_table import GpuRow, format_table
from flows.naming import FLOW_NAME, run_name, short_run_id
from tests.support.api import post as api_write
from tests.support.pipeline import APPS_QUERY, GPU_QUERY, REPO, write_installation
from tests.support.sshd import SshServer, free_port

FIXTURES = REPO / "tests" / "fixtures" / "nvidia-h100"
FAKE_SMI = REPO / "tests" / "support" / "fake_nvidia_smi.sh"
UUID0 = "GPU-b4bf7697-7807-a5fa-e96c-8fca12d67f04"  # the captured H100
UUID1 = "GPU-b4bf7697-7807-a5fa-e96c-8fca12d67f05"  # a second one, like it


def capture(name: str, index: int = 0) -> tuple[str, str]:
    """(header, the GPU's line) of a captured query; ``index`` > 0 makes it another GPU."""
    header, line = (FIXTURES / name).read_text().splitlines()[:2]
    if index:
        line = line.replace(f"0, {UUID0}", f"{index}, {UUID1}", 1)
    return header, line


# ------------------------------------------------------------------------ an installation
@dataclass
class Curated:
    """A test installation whose GPU host answers with what ``smi`` holds."""

    config: Path
    smi: Path
    remote_root: Path
    lock_dir: Path
    api: str

    def gpus(self, *lines: tuple[str, str], apps: str | None = None) -> None:
        """The GPUs nvidia-smi reports (captured lines) and its compute-apps answer."""
        self.smi.mkdir(exist_ok=True)
        text = "\n".join([lines[0][0], *(line for _, line in lines)]) + "\n" if lines else ""
        (self.smi / "query.csv").write_text(text)
        (self.smi / "apps.csv").write_text(
            apps if apps is not None else (FIXTURES / "apps_load.csv").read_text())

    def curate(self, **params: Any) -> tuple[Any, str]:
        """One curator flow run here, in this process; (its report, its flow run id)."""
        from flows.curator import curate_gpus

        state = curate_gpus(return_state=True, **params)
        return state.result(), str(state.state_details.flow_run_id)

    def limit(self) -> int | None:
        name = load_config(self.config).gpu.concurrency_limit
        found = httpx.get(f"{self.api}/v2/concurrency_limits/{name}", timeout=30)
        return None if found.status_code == 404 else found.json()["limit"]


@pytest.fixture
def curated(tmp_path: Path, sshd: SshServer, prefect_api: str,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Curated]:
    inst = write_installation(tmp_path / "mqi", sshd)
    smi = tmp_path / "smi"
    data = yaml.safe_load(inst.config.read_text())
    data["gpu"].update(query_command=f"sh {FAKE_SMI} {smi} {GPU_QUERY}",
                       apps_command=f"sh {FAKE_SMI} {smi} {APPS_QUERY}",
                       concurrency_limit=f"mqi-gpu-cur-{uuid.uuid4().hex[:8]}")
    data["prefect"]["api_url"] = prefect_api
    data["curator"] = {"enabled": True, "interval_seconds": 60, "max_temperature_c": 50,
                       "zombie_after_seconds": 1, "remove_work_dirs_after_hours": 0,
                       "dry_run": False}
    inst.config.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("MQI_CONFIG_PATH", str(inst.config))
    get_config.cache_clear()
    inst.remote_root.mkdir()
    try:
        yield Curated(inst.config, smi, inst.remote_root, tmp_path / "mqi" / "gpu-locks",
                      prefect_api)
    finally:
        get_config.cache_clear()
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # this test's run logs, while the server is there


def api_post(api: str, path: str, body: dict[str, Any]) -> Any:
    return api_write(f"{api}{path}", body)


def artifact_rows(api: str, flow_run_id: str) -> list[dict[str, Any]]:
    """The gpu-pool table artifact of one curator run, read back from the API."""
    import json

    found = api_post(api, "/artifacts/filter", {"artifacts": {
        "key": {"any_": ["gpu-pool"]}, "flow_run_id": {"any_": [flow_run_id]}}})
    assert len(found) == 1, found
    return json.loads(found[0]["data"])


def events(api: str, name: str, resource: str, wanted: int = 1,
           timeout: float = 20) -> list[dict[str, Any]]:
    """The events ``name`` about ``resource``, waiting until at least ``wanted`` are in."""
    deadline = time.monotonic() + timeout
    while True:
        page = api_post(api, "/events/filter", {"filter": {
            "event": {"name": [name]}, "resource": {"id": [resource]}}, "limit": 50})
        if len(page["events"]) >= wanted or time.monotonic() > deadline:
            return page["events"]
        time.sleep(0.3)


# ------------------------------------------------------------------- runs and processes
class Runs:
    """process_case flow runs and task runs made through the REST API."""

    def __init__(self, api: str) -> None:
        self.api = api
        self.flow_id = api_post(api, "/flows/", {"name": FLOW_NAME})["id"]

    def run(self, case_id: str, state: str, tasks: tuple[str, ...] = ()) -> str:
        run = api_post(self.api, "/flow_runs/", {
            "flow_id": self.flow_id, "name": run_name(case_id),
            "parameters": {"case_dir": f"/scan/{case_id}"}, "state": {"type": "RUNNING"}})
        for name in tasks:
            api_post(self.api, "/task_runs/", {
                "flow_run_id": run["id"], "task_key": name, "dynamic_key": name, "name": name,
                "state": {"type": "RUNNING"}})
        if state != "RUNNING":
            self.state(run["id"], state)
        return str(run["id"])

    def state(self, run_id: str, state: str) -> None:
        api_post(self.api, f"/flow_runs/{run_id}/set_state",
                 {"state": {"type": state}, "force": True})

    def read(self, run_id: str) -> dict[str, Any]:
        return httpx.get(f"{self.api}/flow_runs/{run_id}", timeout=30).json()

    def tasks(self, run_id: str) -> list[dict[str, Any]]:
        return api_post(self.api, "/task_runs/filter",
                        {"flow_runs": {"id": {"any_": [run_id]}}})


def folder(root: Path, case_id: str, run_id: str) -> Path:
    work = root / case_id / f"run-{short_run_id(run_id)}"
    (work / "pids").mkdir(parents=True)
    return work


def hold_gpu(lock_dir: Path, index: int, pid_file: Path) -> subprocess.Popen[bytes]:
    """A process group holding GPU ``index``'s lock as a simulation does (flock, the group
    leader, then its child), its group id in ``pid_file``; like a real simulation's, its
    command line names the run's folder (here: the pid file's path in it)."""
    lock_dir.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        ["sh", "-c", 'echo $$ > "$1"; exec flock -n -E 75 "$2" sh -c "sleep 120" "$1"', "sh",
         str(pid_file), str(lock_dir / f"gpu-{index}.lock")], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()) \
            or not lock_held(lock_dir / f"gpu-{index}.lock"):
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return proc


def end_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a test's process group: a lock outlives its taker while a child holds it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def lock_held(lock: Path) -> bool:
    return lock.exists() and subprocess.run(["flock", "-n", str(lock), "true"]).returncode != 0


def gone_group(pid_file: Path) -> None:
    """Write into ``pid_file`` the group of a process that has ended."""
    done = subprocess.Popen(["true"], start_new_session=True)
    done.wait()
    pid_file.write_text(f"{done.pid}\n")
    old = time.time() - 600
    os.utime(pid_file, (old, old))


# --------------------------------------------------------------------------------- tests
@pytest.mark.integration
def test_the_table_artifact_names_each_gpu_and_a_foreign_process_makes_it_unusable(
        curated: Curated) -> None:
    curated.gpus(capture("query_load.csv"), capture("query_after.csv", 1))
    report, run_id = curated.curate()

    rows = {r["index"]: r for r in artifact_rows(curated.api, run_id)}
    loaded, idle = rows[0], rows[1]
    assert (loaded["host"], loaded["uuid"], loaded["name"]) == \
        ("127.0.0.1", UUID0, "NVIDIA H100 80GB HBM3")
    assert (loaded["memory_used_mib"], loaded["memory_free_mib"], loaded["memory_total_mib"],
            loaded["utilization_pct"], loaded["temperature_c"]) == (21491, 59589, 81559, 100, 52)
    # pid 444 of the capture is no process of any run of ours: foreign, and skipped
    assert loaded["processes"] == "444 (21482 MiB)"
    assert loaded["held_by"] == "foreign process" and loaded["usable"] is False
    assert loaded["why"] == "foreign process (444)"
    assert "busy with a process no run owns" in loaded["warnings"]
    assert "52 °C, above curator.max_temperature_c 50" in loaded["warnings"]
    assert (idle["uuid"], idle["memory_free_mib"], idle["temperature_c"]) == (UUID1, 81079, 42)
    assert idle["usable"] is True and idle["held_by"] == "" and idle["warnings"] == ""
    assert (report.gpus, report.usable, report.limit) == (2, 1, 1)
    assert curated.limit() == 1  # the GPU a foreign process holds is not ours to count

    # the next look warns only about what is newly crossed: nothing (the events below
    # are what report.warnings says, one each)
    report, _ = curated.curate()
    assert report.warnings == []

    # a status event per GPU and look, and a warning per threshold crossed, on the GPU's
    # resource (the server stores events in batches: read once, at the end)
    status = events(curated.api, "mqi.gpu.status", f"mqi.gpu.{UUID1}", wanted=2)
    assert [e["payload"]["usable"] for e in status] == [True, True]
    assert status[0]["payload"]["index"] == 1 and status[0]["payload"]["uuid"] == UUID1
    warned = events(curated.api, "mqi.gpu.warning", f"mqi.gpu.{UUID0}", wanted=2)
    assert sorted(e["payload"]["kind"] for e in warned) == ["foreign-process", "hot"]


@pytest.mark.integration
def test_a_gpu_vanishing_and_returning_resizes_the_limit_and_warns(curated: Curated) -> None:
    both = (capture("query_idle.csv"), capture("query_after.csv", 1))
    curated.gpus(*both, apps="")
    assert curated.curate()[0].limit == 2 and curated.limit() == 2

    curated.gpus(both[0], apps="")
    report, run_id = curated.curate()
    assert curated.limit() == 1 and report.limit == 1
    assert report.warnings == [f"GPU 1 ({UUID1}) is no longer reported by 127.0.0.1"]
    gone = [r for r in artifact_rows(curated.api, run_id) if r["uuid"] == UUID1]
    assert gone[0]["why"] == "vanished: the host no longer reports it"

    curated.gpus(*both, apps="")
    report, _ = curated.curate()
    assert curated.limit() == 2
    assert report.warnings == [f"GPU 1 ({UUID1}) is reported by 127.0.0.1 again"]
    kinds = [e["payload"]["kind"]
             for e in events(curated.api, "mqi.gpu.warning", f"mqi.gpu.{UUID1}", wanted=2)]
    assert sorted(kinds) == ["returned", "vanished"]
    limit = load_config(curated.config).gpu.concurrency_limit
    changes = events(curated.api, "mqi.gpu.limit", f"mqi.gpu-limit.{limit}", wanted=3)
    assert sorted(str((e["payload"]["before"], e["payload"]["after"])) for e in changes) == \
        ["(1, 2)", "(2, 1)", "(None, 2)"]


@pytest.mark.integration
def test_a_host_that_does_not_answer_warns_once_and_leaves_the_limit(
        curated: Curated) -> None:
    curated.gpus(capture("query_idle.csv"), apps="")
    curated.curate()
    (curated.smi / "driver-gone").touch()
    report, run_id = curated.curate()
    assert not report.answered and curated.limit() == 1
    assert report.warnings == ["the GPU query on 127.0.0.1 failed: exit code 9: NVIDIA-SMI has "
                               "failed because it couldn't communicate with the NVIDIA driver."]
    (row,) = artifact_rows(curated.api, run_id)  # the GPU it reported last
    assert row["uuid"] == UUID0 and row["why"] == "the host does not answer (gpu-query-failed)"
    assert curated.curate()[0].warnings == []  # said once

    # the host itself gone: nothing listens on its port any more
    data = yaml.safe_load(curated.config.read_text())
    data["hosts"]["gpu"].update(port=free_port(), connect_retries=0)
    curated.config.write_text(yaml.safe_dump(data, sort_keys=False))
    get_config.cache_clear()
    report, _ = curated.curate()
    assert not report.answered and report.warnings[0].startswith(
        "GPU host 127.0.0.1 does not answer")
    warned = events(curated.api, "mqi.gpu.warning", "mqi.gpu-host.127.0.0.1", wanted=2)
    assert sorted(e["payload"]["kind"] for e in warned) == ["gpu-query-failed",
                                                           "host-unreachable"]


@pytest.mark.integration
def test_a_stale_lock_a_zombie_run_and_a_leftover_folder_are_repaired(
        curated: Curated) -> None:
    curated.gpus(capture("query_idle.csv"), apps="")
    runs, tag, root = Runs(curated.api), uuid.uuid4().hex[:6], curated.remote_root
    cases = {k: f"cur{tag}-{k}" for k in ("stale", "zombie", "alive", "failed", "done")}
    # a simulation that outlived its run (COMPLETED): it still holds GPU 0's lock
    stale = runs.run(cases["stale"], "RUNNING")
    holder = hold_gpu(curated.lock_dir, 0,
                      folder(root, cases["stale"], stale) / "pids" / "run_moqui_sim-beam1.pid")
    runs.state(stale, "COMPLETED")
    # RUNNING in Prefect, its simulation's process group long gone
    zombie = runs.run(cases["zombie"], "RUNNING", ("run_moqui_sim-beam2-gpu0",))
    gone_group(folder(root, cases["zombie"], zombie) / "pids" / "run_moqui_sim-beam2.pid")
    # RUNNING, and its remote stage runs: left alone
    alive = runs.run(cases["alive"], "RUNNING", ("run_interpreter",))
    worker = subprocess.Popen(["sh", "-c", f"sleep 120 # {root}"], start_new_session=True)
    (folder(root, cases["alive"], alive) / "pids" / "run_interpreter.pid").write_text(
        f"{worker.pid}\n")
    # an ended run's folders: a FAILED one stays for its retry, a COMPLETED one goes
    failed = runs.run(cases["failed"], "FAILED")
    done = runs.run(cases["done"], "COMPLETED")
    kept, leftover = folder(root, cases["failed"], failed), folder(root, cases["done"], done)
    time.sleep(1.2)  # curator.zombie_after_seconds: 1
    try:
        report, run_id = curated.curate(dry_run=True)
        said = "\n".join(report.repairs)
        assert f"would kill process group {holder.pid} of case {cases['stale']}" in said
        assert f"{run_name(cases['zombie'])} ({zombie}) would be marked Crashed" in said
        assert f"would remove {leftover}" in said
        assert len(report.repairs) == 3  # the live run and the FAILED folder: nothing
        (row,) = artifact_rows(curated.api, run_id)
        assert row["held_by"] == f"case {cases['stale']} beam 1 (run-{short_run_id(stale)})"
        assert row["usable"] is False and row["why"] == "in use by a simulation"
        assert holder.poll() is None and runs.read(zombie)["state_type"] == "RUNNING"

        report, run_id = curated.curate()
        assert holder.wait(15) is not None  # killed: the kernel freed the lock
        assert not lock_held(curated.lock_dir / "gpu-0.lock")
        (row,) = artifact_rows(curated.api, run_id)  # looked again after the kill
        assert row["held_by"] == "" and row["usable"] is True
        crashed = runs.read(zombie)
        assert crashed["state_type"] == "CRASHED"
        assert "process group" in crashed["state"]["message"]
        assert f"`mqi rerun {cases['zombie']}`" in crashed["state"]["message"]
        assert [t["state_type"] for t in runs.tasks(zombie)] == ["CRASHED"]
        assert runs.read(alive)["state_type"] == "RUNNING" and worker.poll() is None
        assert kept.is_dir() and not leftover.exists()
        assert not (root / cases["done"]).exists()  # its case folder held nothing else
        repaired = events(curated.api, "mqi.curator.repair", f"mqi.case.{cases['zombie']}",
                          wanted=2)
        assert sorted(e["payload"]["done"] for e in repaired) == [False, True]  # dry, then done
    finally:
        for proc in (holder, worker):
            end_group(proc)
        runs.state(alive, "COMPLETED")


@pytest.mark.integration
def test_mqi_gpus_prints_the_table_with_the_holder_and_its_task_run(curated: Curated) -> None:
    runs, case = Runs(curated.api), f"cur{uuid.uuid4().hex[:6]}-gpus"
    run = runs.run(case, "RUNNING", ("run_moqui_sim-beam2-gpu0",))
    holder = hold_gpu(curated.lock_dir, 0,
                      folder(curated.remote_root, case, run) / "pids" / "run_moqui_sim-beam2.pid")
    try:
        # the captured load, its process being the holder's (as it would be on the host)
        apps = (FIXTURES / "apps_load.csv").read_text().replace("444,", f"{holder.pid},")
        curated.gpus(capture("query_load.csv"), capture("query_after.csv", 1), apps=apps)
        done = subprocess.run([sys.executable, "-m", "deployments.cli", "gpus", "--config",
                               str(curated.config)], capture_output=True, text=True,
                              timeout=120, cwd=REPO, env={**os.environ, "NO_COLOR": "1"})
        assert done.returncode == 0, done.stderr
        print(done.stdout)
        lines = done.stdout.splitlines()
        header, gpu0, gpu1 = lines[:3]
        assert header.split()[:3] == ["HOST", "GPU", "NAME"] and "\x1b" not in done.stdout
        assert gpu0.startswith("127.0.0.1") and gpu1.startswith("127.0.0.1")
        held = f"case {case} beam 2 (run-{short_run_id(run)})"
        assert held in gpu0 and f"{run_name(case)} › run_moqui_sim-beam2-gpu0" in gpu0
        assert "no: in use by a simulation" in gpu0 and f"{holder.pid} (21482 MiB)" in gpu0
        assert "21491 MiB" in gpu0 and "59589 MiB" in gpu0 and "52 °C" in gpu0
        assert "hot" in gpu0 and "foreign" not in gpu0
        assert gpu1.rstrip().endswith("yes") and "81079 MiB" in gpu1
        # aligned: every column starts where its title does
        for title in ("NAME", "HELD BY", "USABLE"):
            at = header.index(title)
            assert gpu0[at - 1] == " " and gpu0[at] != " ", title
            assert gpu1[at - 1] == " " and gpu1[at] != " ", title
        assert lines[3] == f"admission limit {load_config(curated.config).gpu.concurrency_limit}:" \
                           " not created yet"
    finally:
        end_group(holder)
        runs.state(run, "COMPLETED")


def test_the_survey_reads_lock_holders_from_proc_locks_and_skips_what_is_not_ours() -> None:
    root = "/work/cases"
    text = "\n".join([
        "index, uuid, name, memory.total [MiB], memory.used [MiB], memory.free [MiB], "
        "utilization.gpu [%], temperature.gpu",
        f"0, {UUID0}, H100, 81559 MiB, 0 MiB, 81079 MiB, 0 %, 34",
        f"1, {UUID1}, H100, 81559 MiB, 21491 MiB, 59589 MiB, 100 %, 52",
        "---mqi-survey-apps---", f"777, {UUID1}, 21482", "---mqi-survey-end---",
        "now 1700000000",
        "lockfile gpu-0.lock 65024:11", "lockfile gpu-1.lock 65024:12",
        "flock 700 fe:00:12", "flock 9 fe:00:99",  # another file's lock: not a GPU's
        "proc 700 700", "proc 777 700", "proc 800 800",
        "args 700 700 flock -n -E 75 /locks/gpu-1.lock sh -c tps_env /work/cases/c1/run-"
        "0123abcd/moqui/beam_3.in",
        "folder 1699990000 /work/cases/c1/run-0123abcd",
        "folder 1699990000 /work/cases/c1/not-a-run",
        "pidfile 1699990001 700 /work/cases/c1/run-0123abcd/pids/run_moqui_sim-beam3.pid",
        "pidfile 1699990001  /work/cases/c1/run-0123abcd/pids/run_interpreter.pid",
        "pidfile 1 5 /elsewhere/c1/run-0123abcd/pids/x.pid",
        "a line nobody wrote", "flock notanumber fe:00:12"])
    found = parse_survey(text, root)
    assert [g.index for g in found.gpus] == [0, 1] and found.apps[0].pid == 777
    assert found.lock_files == {0, 1} and set(found.holders) == {1}
    assert found.holders[1].pgid == 700 and found.now == 1700000000
    assert [(f.case_id, f.short) for f in found.folders] == [("c1", "0123abcd")]
    sim, interp = found.pid_files
    assert (sim.step, sim.beam, sim.pgid) == ("run_moqui_sim", 3, 700)
    assert (interp.step, interp.beam, interp.pgid) == ("run_interpreter", None, None)
    assert found.group_alive(700) and not found.group_alive(701)


def test_a_simulation_ending_during_the_look_is_looked_at_again_not_taken_for_foreign(
        tmp_path: Path) -> None:
    from blocks.gpu_pool import GpuPool
    from blocks.local_host import LocalHost
    from flows.gpu_survey import survey
    from flows.gpu_table import gpu_rows

    # A process of ours on GPU 0 that ends between the compute-apps query and the process
    # table (the query itself ends it, once: the flag): nvidia-smi listed it, the table
    # no longer has it, and its lock is free by then.
    sim = subprocess.Popen(["sleep", "600"])
    flag = tmp_path / "end-it-while-listed"
    flag.write_text("")
    apps = (f"if [ -e {flag} ]; then rm {flag}; echo '{sim.pid}, {UUID0}, 21482'; "
            f"kill {sim.pid}; while ! ps -o stat= -p {sim.pid} | grep -q Z; do :; done; fi")
    pool = GpuPool(query_command=f"echo '0, {UUID0}, H100, 81559, 0, 81079, 0, 34'",
                   apps_command=apps, lock_dir=str(tmp_path / "locks"),
                   min_free_memory_mib=1024)
    try:
        found = survey(LocalHost(), pool, "")
    finally:
        sim.kill()
        sim.wait()
    assert not flag.exists()  # the race happened
    (row,) = gpu_rows("gpu-a", found, pool, 80)
    assert found.apps == [] and row.usable and row.warnings == [], row  # the second look
    # a process the table never showed (another pid namespace) is judged as before
    other = parse_survey(f"0, {UUID0}, H100, 81559, 21491, 59589, 100, 52\n"
                         f"---mqi-survey-apps---\n424242, {UUID0}, 21482\n"
                         "---mqi-survey-end---\nbefore 1 2 3\nproc 1 1\n", "")
    assert other.ended_during_look() == []
    (row,) = gpu_rows("gpu-a", other, pool, 80)
    assert not row.usable and "foreign process" in row.why


def test_the_table_is_aligned_plain_text_with_control_characters_shown() -> None:
    rows = [GpuRow("gpu-a", 0, UUID0, "H100", 0, 81079, 81559, 0, 34, usable=True),
            GpuRow("gpu-a", 10, UUID1, "H100\x1b[31m", None, None, None, None, None,
                   why="vanished: the host no longer reports it")]
    lines = format_table(rows, ["note"]).splitlines()
    assert len(lines) == 4 and lines[-1] == "note" and "\x1b" not in "".join(lines)
    assert lines[1].index("81079 MiB") + len("81079 MiB") == lines[0].index("FREE") + len("FREE")
    assert lines[2].split()[1] == "10" and lines[2].endswith("no: vanished: the host no "
                                                             "longer reports it")
    assert format_table([]) == "no GPU reported"


@pytest.mark.integration
def test_a_disabled_curator_is_not_scheduled_and_does_not_look(curated: Curated) -> None:
    from deployments.definitions import DEPLOYMENTS

    data = yaml.safe_load(curated.config.read_text())
    data["curator"].update(enabled=False, interval_seconds=90)
    curated.config.write_text(yaml.safe_dump(data, sort_keys=False))
    get_config.cache_clear()
    cfg = load_config(curated.config)
    (spec,) = [d.for_config(cfg) for d in DEPLOYMENTS if d.entrypoint.endswith(":curate_gpus")]
    assert spec.schedule["rrule"] == "FREQ=SECONDLY;INTERVAL=90" and spec.active is False
    report, run_id = curated.curate()  # a run asked for by hand: says so, reads nothing
    assert report.gpus == 0 and curated.limit() is None
    assert api_post(curated.api, "/artifacts/filter", {"artifacts": {
        "flow_run_id": {"any_": [run_id]}}}) == []


def test_a_quiet_run_without_processes_is_a_zombie_and_one_that_speaks_is_not(
        tmp_path: Path) -> None:
    import logging
    from datetime import UTC, datetime, timedelta

    from config import DEFAULT_PATH
    from config.loader import parse_config
    from flows.curator import _repair
    from flows.curator_runs import RunIndex, RunInfo, StageTask
    from flows.drift import zombie_runs
    from flows.gpu_survey import HostSurvey, PidFile

    cfg = parse_config(yaml.safe_load(DEFAULT_PATH.read_text()), tmp_path / "mqi.yaml")
    now = datetime.now(UTC)
    long_ago = now - timedelta(seconds=cfg.curator.zombie_after_seconds + 60)
    run = RunInfo(id=str(uuid.uuid4()), name="case-c1", case_id="c1", state="RUNNING",
                  folder="0123abcd", changed=long_ago, ended=None)
    # a beam waiting for a GPU: its pid file is the last attempt's, its group gone
    stage = StageTask(id=str(uuid.uuid4()), flow_run_id=run.id, name="run_moqui_sim-beam1",
                      step="run_moqui_sim", beam=1, started=long_ago)
    pid_file = PidFile(path="/tmp/mqi/cases/c1/run-0123abcd/pids/run_moqui_sim-beam1.pid",
                       case_id="c1", short="0123abcd", step="run_moqui_sim", beam=1,
                       pgid=4242, mtime=0.0)
    found = HostSurvey(gpus=[], apps=[], groups={1: 1}, pid_files=[pid_file], now=1e9)
    runs = RunIndex(by_folder={"0123abcd": [run]}, running=[run], stages={run.id: [stage]})
    ((zombie, stages, why),) = zombie_runs(cfg, found, runs, {}, now)
    assert zombie is run and stages == [stage] and "4242" in why and pid_file.path in why
    # it logs every 30 s while it waits ("waiting for a GPU"): alive
    assert zombie_runs(cfg, found, runs, {run.id: now - timedelta(seconds=30)}, now) == []
    # its process group lives: alive, however quiet
    assert zombie_runs(cfg, HostSurvey(gpus=[], apps=[], groups={4242: 4242},
                                       pid_files=[pid_file], now=1e9), runs, {}, now) == []
    # a host whose process table could not be read: nothing is judged at all
    no_ps = HostSurvey(gpus=[], apps=[], pid_files=[pid_file], now=1e9)
    assert _repair(cfg, None, "h", no_ps, runs, None, False,  # type: ignore[arg-type]
                   logging.getLogger("test")) == []
