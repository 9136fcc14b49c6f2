"""The distributed way to run, end to end: a Prefect server on PostgreSQL, `mqi deploy`
and `prefect deploy --all`, two `prefect worker start` processes in folders of their
own with nothing but PREFECT_API_URL, and `mqi up` running serve and the sensor beside
them. Cases dropped into the scan root complete on the workers; a failed case is
retried as the same flow run on the other worker with no finished simulation run
again; a block edited through the API is what the next run uses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from demo.synthetic_case import write_case
from deployments import server
from deployments.definitions import WORK_POOL
from flows.naming import CONFIG_BLOCK, DEPLOYMENT
from tests.support.pipeline import REPO, Installation, stop, wait_for, write_installation
from tests.support.postgres import postgres_database
from tests.test_up import flow_runs, state_of

pytestmark = pytest.mark.integration


EDIT_RESULTS_ROOT = f"""
import sys
from blocks.published_config import PublishedConfig
block = PublishedConfig.load({CONFIG_BLOCK!r})
block.settings["paths"]["results_root"] = sys.argv[1]
block.save({CONFIG_BLOCK!r}, overwrite=True)
"""


def worker_env(api: str, home: Path) -> dict[str, str]:
    """All a worker on another machine would have: the API address (and its own home)."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "PREFECT_API_URL": api,
            "PREFECT_HOME": str(home / ".prefect"), "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LANG": "C.UTF-8"}


def start_worker(api: str, root: Path, name: str) -> subprocess.Popen[bytes]:
    folder = root / name
    folder.mkdir(parents=True)
    log = (folder / "worker.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL,
         "--name", name, "--limit", "1"], cwd=folder, env=worker_env(api, folder),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def worker_of(api: str, run_id: str) -> str | None:
    """The worker that last ran a flow run (Prefect labels a run its worker submitted)."""
    response = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10)
    response.raise_for_status()
    return (response.json().get("labels") or {}).get("prefect.worker.name")


def deployment(api: str) -> dict:
    response = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=10)
    response.raise_for_status()
    return response.json()


def drop(inst: Installation, staging: Path, case_id: str, beams: int, seed: int) -> None:
    staged = write_case(staging, case_id, beams=beams, layers=2, seed=seed)
    os.replace(staged, inst.scan_root / case_id)
    (inst.scan_root / case_id / "_CASE_READY").write_text("")


@pytest.fixture
def distributed(tmp_path: Path, sshd) -> Iterator[Installation]:
    """A server on PostgreSQL and an installation whose config points at it."""
    inst = write_installation(tmp_path / "mqi", sshd)
    data = yaml.safe_load(inst.config.read_text())
    with postgres_database() as url:
        data["prefect"]["database_url"] = url
        from config.loader import parse_config

        proc = server.start_server(parse_config(data, inst.config),
                                   inst.root / "server.log")
        try:
            data["prefect"]["api_url"] = inst.api_url
            data["processes"] = {"start": ["serve", "sensor"]}
            data["scanner"].update(stability_seconds=2.0, rescan_interval_seconds=5.0)
            inst.config.write_text(yaml.safe_dump(data, sort_keys=False))
            inst.set_control(duration=0.3, batches=2)
            yield inst
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


@pytest.mark.scenario(budget=600)
def test_workers_on_postgresql_take_cases_resume_reruns_and_follow_blocks(
        distributed: Installation, tmp_path: Path):
    inst, api = distributed, distributed.api_url
    deployed = inst.mqi("deploy")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert f"deployed {DEPLOYMENT} on work pool {WORK_POOL!r}" in deployed.stdout
    # the cases' queue is bounded (2 simulated GPUs + 2), housekeeping's queue is not
    queues = httpx.post(f"{api}/work_pools/{WORK_POOL}/queues/filter", json={},
                        timeout=10).json()
    limits = {q["name"]: q["concurrency_limit"] for q in queues}
    assert limits == {"default": 4, "housekeeping": None}, limits
    # prefect.yaml says the same thing: `prefect deploy --all` registers it identically
    by_yaml = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": api}, capture_output=True, text=True,
        timeout=180)
    assert by_yaml.returncode == 0, by_yaml.stdout + by_yaml.stderr
    registered = deployment(api)
    assert registered["work_pool_name"] == WORK_POOL
    assert registered["entrypoint"] == "flows.process_case:process_case"
    assert not registered["pull_steps"]  # nothing that ties a worker to the deployer's folder

    workers = {name: start_worker(api, tmp_path / "workers", name)
               for name in ("worker-a", "worker-b")}
    up = inst.start_up()
    try:
        # `mqi up` beside them serves nothing the workers own, and changes nothing of it
        assert wait_for(lambda: "not served here" in (
            inst.root / "data" / "logs" / "serve.log").read_text(), 60, "serve to say so")
        after = deployment(api)
        assert (after["id"], after["work_pool_name"], after["entrypoint"]) == \
            (registered["id"], WORK_POOL, registered["entrypoint"])

        # 1. cases dropped into the scan root complete, on both workers
        cases = [f"dist-{i}" for i in range(4)]
        for i, case_id in enumerate(cases):
            drop(inst, tmp_path / "staging", case_id, beams=2, seed=10 + i)
        assert wait_for(lambda: all(state_of(api, c) == "COMPLETED" for c in cases), 300,
                        "the cases to complete on the workers")
        ids = [flow_runs(api, c)[0]["id"] for c in cases]
        by = {name: [i for i in ids if worker_of(api, i) == name] for name in workers}
        assert by["worker-a"] and by["worker-b"], by
        assert sorted(by["worker-a"] + by["worker-b"]) == sorted(ids)

        # 2. a case fails on one worker; that worker goes away; `mqi rerun` retries the
        #    same flow run, which the other worker completes with no finished beam rerun
        inst.set_control(duration=0.3, batches=2, fail={"3": "fatal"})
        drop(inst, tmp_path / "staging", "dist-fail", beams=3, seed=20)
        assert wait_for(lambda: state_of(api, "dist-fail") == "FAILED", 180,
                        "dist-fail to fail in beam 3")
        failed = flow_runs(api, "dist-fail")[0]["id"]
        first = worker_of(api, failed)
        assert first in workers
        other = next(n for n in workers if n != first)
        stop(workers[first])
        inst.set_control(duration=0.3, batches=2)
        rerun = inst.mqi("rerun", "dist-fail")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        runs = flow_runs(api, "dist-fail")
        assert [r["id"] for r in runs] == [failed] and runs[0]["state"]["type"] == "COMPLETED"
        assert worker_of(api, failed) == other
        starts = [e for e in inst.events("tps_env")
                  if e["event"] == "start" and "/dist-fail/" in e["input"]]
        per_beam = {b: sum(1 for e in starts if e["beam"] == b) for b in ("2", "3", "4")}
        assert per_beam == {"2": 1, "3": 2, "4": 1}
        assert len([e for e in inst.events("interpreter") if e["event"] == "start"
                    and "/dist-fail/" in str(e)]) == 1

        # 3. a block edited through the API is what the next run uses (edited from a
        #    process of its own: a client here would keep this server's event stream
        #    open in the test process after the server is gone)
        elsewhere = tmp_path / "results-from-the-ui"
        edit = subprocess.run([sys.executable, "-c", EDIT_RESULTS_ROOT, str(elsewhere)],
                              env={**os.environ, "PREFECT_API_URL": api}, capture_output=True,
                              text=True, timeout=120)
        assert edit.returncode == 0, edit.stderr
        drop(inst, tmp_path / "staging", "dist-edited", beams=1, seed=30)
        assert wait_for(lambda: state_of(api, "dist-edited") == "COMPLETED", 180,
                        "dist-edited to complete")
        assert sorted(p.name for p in (elsewhere / "dist-edited" / "dicom").glob("*/*.dcm")) \
            == ["RTDOSE_beam2.dcm"]
        assert not (inst.results / "dist-edited").exists()
    finally:
        stop(up)
        for proc in workers.values():
            stop(proc)
