"""End to end: process_case against the real sshd, the simulators and a real Prefect server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml

from config import get_config
from demo.simulators.tps_env import HANGING_HELPER
from demo.synthetic_case import BROKEN_KINDS, write_case
from flows.naming import (
    SIMULATION_TASK,
    gpu_tag,
    progress_artifact_key,
    report_artifact_key,
    short_run_id,
)
from tests.support.patients import patient_ids
from tests.support.pipeline import REPO, Installation, serving, wait_for, write_installation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory, sshd) -> Iterator[Installation]:
    """One installation and its Prefect server for the whole module."""
    with serving(write_installation(tmp_path_factory.mktemp("mqi"), sshd)) as installation:
        yield installation


@pytest.fixture
def fresh(inst: Installation) -> Installation:
    inst.set_control()
    inst.record.unlink(missing_ok=True)
    shutil.rmtree(inst.state, ignore_errors=True)  # no busy GPU left from an earlier test
    return inst


def run_case(case_dir: Path, workflow: str = "default_qa"):
    from flows.process_case import process_case

    return process_case(case_dir=str(case_dir), workflow=workflow, return_state=True)


def task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def artifacts(flow_run_id, key_prefix: str):
    """The flow run's artifacts whose key starts with ``key_prefix``, as the API has them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return [a for a in found if (a.key or "").startswith(key_prefix)]


def case_report(flow_run_id, case_id: str):
    """The one case report artifact on the flow run itself (not on a task run)."""
    (report,) = [a for a in artifacts(flow_run_id, report_artifact_key(case_id))
                 if a.key == report_artifact_key(case_id)]
    assert report.type == "markdown" and report.task_run_id is None
    return report


STAGE_NAME = re.compile(r"inspect|upload|run_interpreter|download|verify|compare_dose|report|"
                        r"convert_to_dicom-beam\d+|" + SIMULATION_TASK.pattern)


def assert_stage_names(tasks) -> None:
    """Every task run is named after its stage (and beam, and GPU), no random suffix;
    a simulation that holds a GPU has it as a tag."""
    assert all(STAGE_NAME.fullmatch(t.name) for t in tasks), sorted(t.name for t in tasks)
    for t in tasks:
        if (m := SIMULATION_TASK.fullmatch(t.name)) and m.group(2) is not None:
            assert gpu_tag(int(m.group(2))) in t.tags, (t.name, t.tags)


def active_slots(inst: Installation) -> dict[str, int]:
    from prefect.client.orchestration import get_client

    cfg = get_config()
    with get_client(sync_client=True) as client:
        limits = client.read_global_concurrency_limits(limit=100)
    return {lim.name: lim.active_slots for lim in limits
            if lim.name.startswith(cfg.gpu.concurrency_limit)}


def test_three_beam_case_completes_on_two_gpus_with_overlap(fresh: Installation):
    case = write_case(fresh.scan_root, "e2e-three", beams=3, layers=3, seed=1)
    before = {p: p.stat().st_mtime_ns for p in case.rglob("*")}
    started = time.monotonic()
    state = run_case(case)
    wall = time.monotonic() - started
    assert state.is_completed(), state.message
    result = state.result()

    # every beam has a real RT Dose, labelled SIMULATED, downloaded and verified
    doses = sorted((fresh.results / "e2e-three" / "dicom").glob("beam_*/*.dcm"))
    assert [p.parent.name for p in doses] == ["beam_2", "beam_3", "beam_4"]
    for path in doses:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "RTDOSE" and "SIMULATED" in ds.SeriesDescription
    report = (fresh.results / "e2e-three" / "report.md").read_text()
    assert "SIMULATED" in report and "| 3 | F2 | G1 | 1 |" in report
    assert set(result.gpus.values()) <= {0, 1}

    # the run worked in its own remote folder, named by its flow run id (kept here:
    # the test installation has clean_remote_work_dir off)
    work = fresh.remote_root / "e2e-three" / f"run-{short_run_id(state.state_details.flow_run_id)}"
    assert [p.name for p in (fresh.remote_root / "e2e-three").iterdir()] == [work.name]
    assert sorted(p.name for p in (work / "dicom").iterdir()) == ["beam_2", "beam_3", "beam_4"]
    assert (work / "case").is_dir() and (work / "pids").is_dir()

    # the simulators' own record: beams overlapped in time, never two on one GPU
    intervals = fresh.sim_intervals()
    flat = sorted((s, e) for runs in intervals.values() for s, e, _ in runs)
    assert len(flat) == 3
    assert any(flat[i][1] > flat[i + 1][0] for i in range(len(flat) - 1)), "no overlap"
    assert not [e for e in fresh.events("tps_env") if e["event"] == "collision"]
    assert set(intervals) == {0, 1}
    assert {p: p.stat().st_mtime_ns for p in case.rglob("*")} == before  # case untouched
    assert active_slots(fresh) and all(v == 0 for v in active_slots(fresh).values())

    # the flow run itself carries the case report, COMPLETED, as report.md says it;
    # each stage's task run is named for it; each beam's progress is one keyed artifact
    run_id = state.state_details.flow_run_id
    shown = case_report(run_id, "e2e-three").data
    assert "COMPLETED" in shown and "| 3 | F2 | G1 | 1 |" in shown and "SIMULATED" in shown
    assert "| run_moqui_sim [beam 3] | done | GPU " in shown and "FAILED" not in shown
    wait_for(lambda: len(task_runs(run_id)) >= 11, 30, "the run's 11 task runs")
    tasks = task_runs(run_id)
    assert_stage_names(tasks)
    sims = sorted(t.name for t in tasks if t.name.startswith("run_moqui_sim"))
    assert [(b, g) for b, g in (SIMULATION_TASK.fullmatch(n).groups() for n in sims)] == \
        [(str(b), str(result.gpus[b])) for b in (2, 3, 4)]
    progress = artifacts(run_id, report_artifact_key("e2e-three") + "-beam-")
    assert sorted(a.key for a in progress) == [progress_artifact_key("e2e-three", b)
                                               for b in (2, 3, 4)]
    assert all(a.data == 100 and a.description.startswith("GPU ") for a in progress)

    # for the closing note: wall time vs the longest chain of simulated work
    chain = max(e - s for runs in intervals.values() for s, e, _ in runs)
    print(f"\n3-beam case wall time {wall:.1f} s; longest simulation {chain:.1f} s")


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_cases_fail_in_inspection_and_upload_nothing(fresh: Installation, kind: str):
    case = write_case(fresh.scan_root, f"broken-{kind.replace('_', '-')}", broken=kind)
    state = run_case(case)
    assert state.is_failed()
    assert "refused" in state.message
    assert not (fresh.remote_root / case.name).exists()  # nothing was uploaded
    assert fresh.events() == []  # no tool ran


def test_failing_beam_fails_the_case_frees_the_gpu_and_ends_every_task(fresh: Installation):
    fresh.set_control(fail={"3": "fatal"})
    case = write_case(fresh.scan_root, "e2e-resume", beams=3, layers=2, seed=2)
    state = run_case(case)
    assert state.is_failed()
    assert "beam 3" in state.message and "FATAL ERROR" in state.message
    assert all(v == 0 for v in active_slots(fresh).values())  # the GPU came back
    # the failed beam's convert_to_dicom never started: no task waits for ever (task-run
    # records reach the server through the client's events: give them a moment)
    run_id = state.state_details.flow_run_id
    wait_for(lambda: len(task_runs(run_id)) >= 8, 30, "the run's 8 task runs to be recorded")
    tasks = task_runs(run_id)
    assert all(t.state.is_final() for t in tasks), \
        [(t.name, t.state.name) for t in tasks if not t.state.is_final()]
    assert "convert_to_dicom-beam3" not in {t.name for t in tasks}
    assert_stage_names(tasks)

    # the flow run's case report says FAILED, where, why, the log's tail and the rerun
    shown = case_report(run_id, "e2e-resume").data
    log = fresh.results / "e2e-resume" / "logs" / "run_moqui_sim-beam3.log"
    assert "FAILED" in shown and "## run_moqui_sim [beam 3] FAILED" in shown
    assert "FATAL ERROR" in shown and f"Full log: `{log}`" in shown
    tail = log.read_text().splitlines()[-20:]
    assert f"Last {len(tail)} lines of the log:\n\n````text\n" + "\n".join(tail) in shown
    assert f"mqi rerun --config {fresh.config} e2e-resume" in shown
    assert "| upload | done |" in shown and "| convert_to_dicom [beam 3] | not run |" in shown

    # mqi logs prints a stage's log, first saying which installation it reads; the
    # interpreter's log names every file it read, whose names carry the patient ids
    logs = fresh.mqi("logs", "e2e-resume", "--step", "run_moqui_sim", "--beam", "3")
    assert logs.returncode == 0, logs.stderr
    assert logs.stderr.splitlines()[0] == \
        f"mqi: config {fresh.config} (from MQI_CONFIG_PATH); Prefect API {fresh.api_url}"
    assert logs.stdout.splitlines()[0] == f"==> {log} <=="
    assert logs.stdout.splitlines()[1:] == log.read_text().splitlines()
    read = fresh.mqi("logs", "e2e-resume", "--step", "run_interpreter")
    assert read.returncode == 0 and ".ptn" in read.stdout, read.stderr
    assert not [i for i in patient_ids(case) if i in read.stdout]
    inspected = fresh.mqi("logs", "e2e-resume", "--step", "inspect")  # no file: the API's
    assert inspected.returncode == 0, inspected.stderr
    assert "task run inspect of flow run case-e2e-resume" in inspected.stdout
    assert "3 treatment beam(s)" in inspected.stdout

    status = fresh.mqi("status", "--failed")
    assert status.returncode == 0, status.stderr
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("e2e-resume"))
    assert "FAILED" in line and "beam 3" in line

    # `mqi rerun` retries this run on serve: tests/test_up.py (and, on workers,
    # tests/test_distributed.py) follow that path end to end.


def test_a_cancelled_or_crashed_run_says_so_in_its_case_report(fresh: Installation):
    """The hooks Prefect calls in serve's process when a run is cancelled or its process
    died (no run context there): the report says which, from the API alone."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Crashed

    from flows.case_report import report_end
    from flows.naming import run_name
    from flows.process_case import process_case

    case = write_case(fresh.scan_root, "e2e-ended", beams=1, layers=1, seed=11)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(process_case, name=run_name("e2e-ended"),
                                     parameters={"case_dir": str(case)})
    report_end(process_case, run, Crashed(message="Flow run process exited with -9"))
    first = case_report(run.id, "e2e-ended")
    assert "# Case e2e-ended: CRASHED" in first.data and "exited with -9" in first.data
    assert f"mqi rerun --config {fresh.config} e2e-ended" in first.data
    assert "| run_moqui_sim [each beam] | waiting |" in first.data  # nothing ran yet
    report_end(process_case, run, Cancelled(message="Cancelled from the UI"))
    again = case_report(run.id, "e2e-ended")  # the same artifact, rewritten
    assert again.id == first.id and "# Case e2e-ended: CANCELLED" in again.data
    assert not [i for i in patient_ids(case) if i in again.data]


@pytest.mark.scenario(budget=180)
def test_six_cases_on_two_gpus_never_share_an_index(fresh: Installation):
    fresh.set_control(duration=1.0, batches=4)
    cases = [write_case(fresh.scan_root, f"e2e-six-{i}", beams=3, layers=2, seed=10 + i)
             for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-m", "deployments.cli", "run", str(c)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=fresh.env(), cwd=REPO) for c in cases]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, "\n".join(o[-2000:] for o in outputs)
    intervals = fresh.sim_intervals()
    assert sum(len(v) for v in intervals.values()) == 18
    for gpu, runs in intervals.items():
        runs.sort()
        for (_s1, e1, a), (s2, _e2, b) in zip(runs, runs[1:], strict=False):
            assert e1 <= s2, f"GPU {gpu}: {a} and {b} overlapped"
    assert not [e for e in fresh.events("tps_env") if e["event"] == "collision"]
    assert all(v == 0 for v in active_slots(fresh).values())


@pytest.mark.scenario(budget=240)
def test_a_killed_flow_process_frees_its_gpu_slot_after_the_lease(fresh: Installation):
    fresh.set_control(fail={"2": "hang"}, duration=2.0)
    case = write_case(fresh.scan_root, "e2e-killed", beams=1, layers=2, seed=5)
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "run", str(case)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=fresh.env(), cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(active_slots(fresh).values()):
            time.sleep(0.5)
        held = {k: v for k, v in active_slots(fresh).items() if v}
        assert held, "the simulation never took a GPU slot"
        deadline = time.monotonic() + 30
        row: dict = {}
        while time.monotonic() < deadline and not row.get("gpus"):
            status = fresh.mqi("status", "--json")
            row = {r["case_id"]: r for r in json.loads(status.stdout)}.get("e2e-killed", {})
            time.sleep(0.5)
        assert row["status"] == "RUNNING_run_moqui_sim" and row["gpus"], row
        os.killpg(proc.pid, signal.SIGKILL)  # the flow process dies without a word
        proc.wait()
        lease = get_config().gpu.lease_seconds
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < lease + 45 and any(active_slots(fresh).values()):
            time.sleep(1)
        assert not any(active_slots(fresh).values()), f"slots still held: {active_slots(fresh)}"
        print(f"\nslot freed {time.monotonic() - killed_at:.0f} s after kill -9 "
              f"(lease {lease} s)")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        # The hanging simulation (its command line names the control file) and the
        # helper it started, which ignores SIGTERM and would sleep on for an hour.
        subprocess.run(["pkill", "-KILL", "-f", str(fresh.control)], check=False)
        for hang in fresh.events("tps_env"):
            if hang["event"] != "hang":
                continue
            with contextlib.suppress(OSError):  # gone already
                cmdline = Path(f"/proc/{hang['helper']}/cmdline").read_bytes()
                if HANGING_HELPER.encode() in cmdline:  # not a process that took its pid
                    os.kill(hang["helper"], signal.SIGKILL)


@pytest.mark.parametrize("mode,reason", [
    ("no_success", "no 'Total execution time' line"),
    ("error_line", "log contains 'ERROR:'"),
    ("segfault", "Segmentation fault"),
])
def test_a_simulation_succeeds_only_with_exit_0_the_success_line_and_no_failure_line(
        fresh: Installation, mode: str, reason: str):
    fresh.set_control(fail={"2": mode}, duration=0.4)
    case = write_case(fresh.scan_root, f"e2e-verdict-{mode.replace('_', '-')}", beams=1,
                      layers=2, seed=7)
    state = run_case(case)
    assert state.is_failed()
    assert "run_moqui_sim [beam 2] failed" in state.message and reason in state.message
    assert all(v == 0 for v in active_slots(fresh).values())


def test_a_gpu_locked_on_the_host_is_never_shared(fresh: Installation, sshd):
    """Prefect's bookkeeping knows nothing of this process; the host lock still keeps it
    alone on GPU 0, and every beam runs on GPU 1."""
    lock_dir = Path(get_config().gpu.lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(["flock", str(lock_dir / "gpu-0.lock"), "sleep", "120"])
    try:
        time.sleep(0.3)
        fresh.set_control(duration=0.5)
        case = write_case(fresh.scan_root, "e2e-locked", beams=2, layers=2, seed=8)
        state = run_case(case)
        assert state.is_completed(), state.message
        assert set(state.result().gpus.values()) == {1}
        assert set(fresh.sim_intervals()) == {1}
        # a beam that lost the race for GPU 0 leaves no FAILED progress behind
        progress = [a for a in artifacts(state.state_details.flow_run_id, "")
                    if a.type == "progress"]
        assert sorted(a.key for a in progress) == ["case-e2e-locked-beam-2",
                                                   "case-e2e-locked-beam-3"]
        assert all(a.description.startswith("GPU 1 ") and "FAILED" not in a.description
                   for a in progress), [a.description for a in progress]
    finally:
        holder.kill()
        holder.wait()


def test_a_failure_that_cannot_heal_is_not_retried(fresh: Installation, tmp_path: Path):
    """A missing key file: the upload ends at once with the reason, although the policy
    would retry it three times with back-off."""
    data = yaml.safe_load(fresh.config.read_text())
    data["hosts"]["gpu"]["private_key_path"] = str(tmp_path / "no-such-key")
    data["retries"]["steps"] = {"upload": {"retries": 3, "retry_delay_seconds": 10}}
    broken = tmp_path / "broken-key.yaml"
    broken.write_text(yaml.safe_dump(data, sort_keys=False))
    case = write_case(fresh.scan_root, "e2e-no-key", beams=1, layers=2, seed=9)
    previous = os.environ["MQI_CONFIG_PATH"]
    os.environ["MQI_CONFIG_PATH"] = str(broken)
    get_config.cache_clear()
    try:
        state = run_case(case)
    finally:
        os.environ["MQI_CONFIG_PATH"] = previous
        get_config.cache_clear()
    assert state.is_failed()
    assert "private key file not found" in state.message
    run_id = state.state_details.flow_run_id
    wait_for(lambda: any(t.name.startswith("upload") for t in task_runs(run_id)), 30,
             "the upload's task run to be recorded")
    upload = next(t for t in task_runs(run_id) if t.name.startswith("upload"))
    assert upload.state.is_failed() and upload.run_count == 1  # tried once, not 4 times


def test_mqi_run_of_a_refused_case_says_why_in_one_line_without_a_traceback(
        fresh: Installation):
    case = write_case(fresh.scan_root, "e2e-refused", broken="two_plans")
    quiet = fresh.mqi("run", str(case))
    out = quiet.stdout + quiet.stderr
    assert quiet.returncode == 1 and "Traceback" not in out, out
    last = quiet.stderr.strip().splitlines()[-1]
    assert last.startswith("mqi: case e2e-refused: FAILED") and "refused" in last
    debug = fresh.mqi("run", "--debug", str(case))
    assert debug.returncode == 1 and "Traceback" in debug.stdout + debug.stderr
