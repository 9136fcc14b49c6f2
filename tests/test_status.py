"""`mqi status`: intake rows from a real ledger merged with run rows, the table and JSON,
and (integration) the bulk queries against a real Prefect server."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import DEFAULT_PATH
from config.loader import parse_config
from deployments.intake_ledger import IntakeEntry, IntakeLedger, IntakeState, ledger_path
from deployments.status import (
    SIMULATION_PREFIX,
    CaseStatus,
    case_statuses,
    format_table,
    intake_rows,
    merged,
)
from flows.naming import (
    FLOW_NAME,
    gpu_from_task_run_name,
    run_name,
    simulation_task_run_name,
)
from tests.support.api import patient_client
from tests.support.api import post as api_write
from tests.support.pipeline import REPO

T0 = 1_700_000_000.0


def run_row(case_id: str, status: str, reason: str | None = None,
            gpus: list[str] | None = None) -> CaseStatus:
    return CaseStatus(case_id=case_id, status=status, steps=[], gpus=gpus or [],
                      started="2023-11-14T22:13:20+00:00", duration_s=12.0, reason=reason,
                      flow_run_id=f"run-of-{case_id}", case_dir=f"/scan/{case_id}")


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "sensor" / "intake.sqlite3"
    book = IntakeLedger(path)
    for entry in (
        IntakeEntry("busy", IntakeState.QUEUED, "new content waits for run run-of-busy",
                    since=T0 + 60, flow_run_id="run-of-busy"),
        IntakeEntry("new", IntakeState.ARRIVING, "files are still being written",
                    since=T0 + 50),
        IntakeEntry("waiting", IntakeState.WAITING, "no RTPLAN yet", since=T0 + 40),
        IntakeEntry("bad\x1b[31mname", IntakeState.REFUSED, "two plans:\nA.dcm\nB.dcm",
                    since=T0 + 30),
        IntakeEntry("old", IntakeState.WAITING, "an RTPLAN changed; settling", since=T0 + 5),
        IntakeEntry("done", IntakeState.STARTED, since=T0 + 2, flow_run_id="run-of-done"),
    ):
        book.put(entry)
    book.close()
    return path


def runs() -> list[tuple[float, CaseStatus]]:
    return [(T0 + 20, run_row("old", "COMPLETED", gpus=["beam 1: GPU 0", "beam 2: GPU 1"])),
            (T0 + 10, run_row("busy", "RUNNING_run_moqui_sim")),
            (T0 + 3, run_row("failed", "FAILED", reason="tps_env\texited 139")),
            (T0 + 1, run_row("done", "COMPLETED"))]


def test_intake_rows_stand_beside_the_runs_intake_row_first(ledger: Path) -> None:
    rows = merged(runs(), intake_rows(ledger))
    # a case's pair is placed by the newer of its times; STARTED folders have no row
    assert [(r.case_id, r.source, r.status) for r in rows] == [
        ("busy", "intake", "QUEUED"), ("busy", "run", "RUNNING_run_moqui_sim"),
        ("new", "intake", "ARRIVING"),
        ("waiting", "intake", "WAITING"),
        ("bad\x1b[31mname", "intake", "REFUSED"),
        ("old", "intake", "WAITING"), ("old", "run", "COMPLETED"),
        ("failed", "run", "FAILED"),
        ("done", "run", "COMPLETED")]
    queued, waiting = rows[0], rows[3]
    assert queued.flow_run_id == "run-of-busy"  # the active run it waits for
    assert waiting.reason == "no RTPLAN yet" and waiting.started == "2023-11-14T22:14:00+00:00"
    assert waiting.duration_s is None and waiting.gpus == [] and waiting.case_dir is None

    data = json.loads(json.dumps([r.as_dict() for r in rows]))
    assert [d["source"] for d in data[:2]] == ["intake", "run"]
    assert data[0]["flow_run_id"] == "run-of-busy" and data[3]["flow_run_id"] is None
    assert data[1]["flow_run_id"] == "run-of-busy"


def test_the_table_has_one_line_a_row_and_reprs_control_characters(ledger: Path) -> None:
    rows = merged(runs(), intake_rows(ledger))
    lines = format_table(rows).splitlines()
    assert len(lines) == 1 + len(rows)
    refused = next(ln for ln in lines if "REFUSED" in ln)
    assert refused.startswith(repr("bad\x1b[31mname"))
    assert repr("two plans:\nA.dcm\nB.dcm") in refused
    assert "\x1b" not in "".join(lines) and "\t" not in "".join(lines)
    failed = next(ln for ln in lines if ln.startswith("failed "))
    assert repr("tps_env\texited 139") in failed
    waiting = next(ln for ln in lines if ln.startswith("waiting "))
    assert "WAITING" in waiting and "2023-11-14T22:14:00+00:00" in waiting
    assert waiting.rstrip().endswith("no RTPLAN yet")
    assert "b1→0, b2→1" in next(ln for ln in lines if ln.startswith("old ") and "COMPLETED" in ln)


def test_failed_shows_refused_folders_too(ledger: Path) -> None:
    intake = intake_rows(ledger, only_failed=True)
    assert [(r.case_id, r.status, r.reason) for _, r in intake] == [
        ("bad\x1b[31mname", "REFUSED", "two plans:\nA.dcm\nB.dcm")]
    assert format_table([], only_failed=True) == "no failed cases"


def test_no_ledger_no_intake_rows(tmp_path: Path) -> None:
    assert intake_rows(tmp_path / "no-sensor-here" / "intake.sqlite3") == []


def test_gpus_not_read_are_marked_not_empty() -> None:
    rows = [run_row("a", "COMPLETED"), run_row("b", "QUEUED")]
    rows[0].gpus = None
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and lines[-1].startswith("(GPU …")
    assert " … " in lines[1] and " - " in lines[2]
    assert rows[0].as_dict()["gpus"] is None


def test_the_simulation_prefix_narrows_to_what_gpu_from_task_run_name_reads() -> None:
    name = simulation_task_run_name(3, 1)
    assert name.startswith(SIMULATION_PREFIX) and gpu_from_task_run_name(name) == (3, 1)


# --- against a real Prefect server ------------------------------------------------------


class Runs:
    """Creates process_case flow and task runs through the REST API (server-orchestrated)."""

    def __init__(self, api: str) -> None:
        self.http = patient_client(base_url=api, timeout=30)
        self.flow_id = self.post("/flows/", {"name": FLOW_NAME})["id"]

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return api_write(path, body, client=self.http)

    def state(self, run_id: str, state: str, message: str | None = None) -> None:
        self.post(f"/flow_runs/{run_id}/set_state",
                  {"state": {"type": state, "message": message}, "force": True})

    def case(self, case_id: str, final: str, tasks: list[tuple[str, str]],
             message: str | None = None) -> str:
        run = self.post("/flow_runs/", {
            "flow_id": self.flow_id, "name": run_name(case_id),
            "parameters": {"case_dir": f"/scan/{case_id}"},
            "state": {"type": "SCHEDULED" if final == "SCHEDULED" else "RUNNING"}})
        for name, state in tasks:
            self.post("/task_runs/", {"flow_run_id": run["id"], "task_key": name,
                                      "dynamic_key": name, "name": name,
                                      "state": {"type": state}})
        if final not in ("SCHEDULED", "RUNNING"):
            self.state(run["id"], final, message)
        return str(run["id"])


@pytest.mark.integration
def test_statuses_from_a_real_server(prefect_api: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    ids = {k: f"st{tag}-{k}" for k in ("done", "old", "failed", "fixed", "running", "queued")}
    sim = simulation_task_run_name
    api = Runs(prefect_api)
    api.case(ids["done"], "COMPLETED", [("inspect", "COMPLETED"), (sim(1, 0), "COMPLETED"),
                                        (sim(2, 1), "COMPLETED"), (sim(2, 0), "COMPLETED")])
    api.case(ids["old"], "COMPLETED", [(sim(1, 1), "COMPLETED")])
    failed = api.case(ids["failed"], "FAILED", [(sim(1, 1), "FAILED")],
                      "Flow run encountered an exception: MoquiError: beam 1: exit 139")
    api.case(ids["fixed"], "FAILED", [(sim(1, 0), "FAILED")], "first try")
    api.case(ids["fixed"], "COMPLETED", [(sim(1, 1), "COMPLETED")])  # newer: the one shown
    running = api.case(ids["running"], "RUNNING", [("upload", "COMPLETED"),
                                                   (sim(1, 1), "RUNNING")])
    api.case(ids["queued"], "SCHEDULED", [])
    book = IntakeLedger(tmp_path / "intake.sqlite3")
    book.put(IntakeEntry(ids["running"], IntakeState.QUEUED, "waits", flow_run_id=running))
    book.put(IntakeEntry(f"st{tag}-refused", IntakeState.REFUSED, "two RTPLANs"))
    book.close()

    def mine(rows: list[CaseStatus]) -> dict[tuple[str, str], CaseStatus]:
        return {(r.case_id.split("-", 1)[1], r.source): r for r in rows
                if r.case_id.startswith(f"st{tag}-")}

    rows = mine(case_statuses(ledger=tmp_path / "intake.sqlite3"))
    assert {k: r.status for k, r in rows.items()} == {
        ("running", "intake"): "QUEUED", ("refused", "intake"): "REFUSED",
        ("queued", "run"): "QUEUED", ("running", "run"): "RUNNING_run_moqui_sim",
        ("fixed", "run"): "COMPLETED", ("failed", "run"): "FAILED",
        ("old", "run"): "COMPLETED", ("done", "run"): "COMPLETED"}
    assert rows["done", "run"].gpus == ["beam 1: GPU 0", "beam 2: GPU 0"]  # newest per beam
    assert rows["running", "run"].steps == [sim(1, 1)]
    assert rows["running", "run"].gpus == ["beam 1: GPU 1"]
    assert rows["running", "intake"].flow_run_id == running
    assert rows["failed", "run"].reason == "beam 1: exit 139"
    assert rows["failed", "run"].case_dir == f"/scan/{ids['failed']}"

    # GPUs of COMPLETED cases beyond the newest n are not read; every other case's are
    rows = mine(case_statuses(completed_gpus=1))
    assert rows["fixed", "run"].gpus == ["beam 1: GPU 1"]  # the newest COMPLETED
    assert rows["old", "run"].gpus is None and rows["done", "run"].gpus is None
    assert rows["failed", "run"].gpus == ["beam 1: GPU 1"]

    # --failed: the newest run of a case decides; refused folders need the operator too
    rows = mine(case_statuses(only_failed=True, ledger=tmp_path / "intake.sqlite3"))
    assert sorted(rows) == [("failed", "run"), ("refused", "intake")]
    assert rows["failed", "run"].flow_run_id == failed


@pytest.mark.integration
def test_mqi_status_reads_the_ledger_of_its_config(prefect_api: str, tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["paths"]["data_dir"] = str(tmp_path / "data")
    data["prefect"]["api_url"] = prefect_api
    config = tmp_path / "mqi.yaml"
    config.write_text(yaml.safe_dump(data))
    book = IntakeLedger(ledger_path(parse_config(data, config)))
    book.put(IntakeEntry("cli\nrefused", IntakeState.REFUSED, "not a case id"))
    book.put(IntakeEntry("cli-waiting", IntakeState.WAITING, "no RTPLAN yet"))
    book.close()

    def mqi(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "deployments.cli", "status", "--config",
                               str(config), *args], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert done.returncode == 0, done.stderr
        return done.stdout

    rows = {r["case_id"]: r for r in json.loads(mqi("--failed", "--json"))}
    assert rows["cli\nrefused"]["source"] == "intake"
    assert rows["cli\nrefused"]["reason"] == "not a case id"
    assert "cli-waiting" not in rows
    table = mqi().splitlines()
    assert any(ln.startswith(repr("cli\nrefused")) and "REFUSED" in ln for ln in table)
    assert any(ln.startswith("cli-waiting ") and "WAITING" in ln for ln in table)
