"""Dose QA end to end: cases with reference RT Doses through the sensor (`mqi up`) and
`mqi run`, against the real sshd, the simulators and a real Prefect server. One `mqi up`
serves the module; each case is small and covers several outcomes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from demo.synthetic_case import write_case
from flows.naming import run_name
from tests.support.pipeline import Installation, stop, wait_for, write_installation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory, sshd) -> Iterator[Installation]:
    """`mqi up` (server, serve, sensor) on a test installation, for the whole module."""
    installation = write_installation(tmp_path_factory.mktemp("qa"), sshd)
    data = yaml.safe_load(installation.config.read_text())
    data["scanner"].update(stability_seconds=1.0, rescan_interval_seconds=5.0)
    data["curator"] = {"enabled": False}
    data["archiver"] = {"enabled": False}
    installation.config.write_text(yaml.safe_dump(data, sort_keys=False))
    installation.set_control(duration=0.2, batches=2)
    up = installation.start_up()
    try:
        yield installation
    finally:
        stop(up, grace=60)


def flow_run(api: str, case_id: str) -> dict | None:
    runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
        "flow_runs": {"name": {"any_": [run_name(case_id)]}}, "limit": 5}).json()
    return runs[0] if len(runs) == 1 else None


def finished(api: str, case_id: str) -> dict | None:
    run = flow_run(api, case_id)
    return run if run and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") else None


def qa_events(api: str, case_id: str) -> list[dict]:
    page = httpx.post(f"{api}/events/filter", timeout=10, json={"filter": {
        "event": {"name": ["mqi.case.qa"]}, "resource": {"id": [f"mqi.case.{case_id}"]}},
        "limit": 50}).json()
    return page["events"]


def drop(inst: Installation, case_id: str, **kw) -> Path:
    staged = write_case(inst.root / "staging", case_id, layers=1, spots_per_layer=20, seed=7,
                        **kw)
    os.replace(staged, inst.scan_root / case_id)
    (inst.scan_root / case_id / "_CASE_READY").write_text("")
    return inst.scan_root / case_id


def patient_id(case: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(case.glob("RP*.dcm"))).PatientID)


@pytest.mark.scenario(budget=240)
def test_the_sensor_starts_cases_whose_verdict_heads_report_tags_status_and_events(
        inst: Installation):
    mixed = drop(inst, "qa-mixed", beams=3, reference={
        2: "match", 3: "shifted", 4: "other_grid", "plan": "other_plan"})
    drop(inst, "qa-review", beams=1, reference="scaled")
    drop(inst, "qa-none", beams=1)
    runs = {c: wait_for(lambda c=c: finished(inst.api_url, c), 180, f"{c} to finish")
            for c in ("qa-mixed", "qa-review", "qa-none")}
    assert {c: r["state"]["type"] for c, r in runs.items()} == dict.fromkeys(runs, "COMPLETED")
    assert "qa:fail" in runs["qa-mixed"]["tags"]
    assert "qa:review" in runs["qa-review"]["tags"]
    assert "qa:not-assessed" in runs["qa-none"]["tags"]

    results = inst.results / "qa-mixed"
    report = (results / "report.md").read_text()
    lines = report.splitlines()
    assert lines[0] == "# MQI verification report: case qa-mixed — SIMULATED"
    headline = next(ln for ln in lines if ln.startswith("## "))
    assert headline.startswith("## Dose QA: FAIL (SIMULATED) — beam 2 PASS (3%/2mm 100.0 %); "
                               "beam 3 FAIL (3%/2mm "), headline
    assert "; beam 4 PASS (3%/2mm " in headline
    assert lines.index(headline) < lines.index("## Beams")  # the verdict comes first
    assert "for another plan (ReferencedSOPInstanceUID" in report  # the plan sum, refused
    for beam in (2, 3, 4):
        assert f"[beam_{beam}.png](qa/beam_{beam}.png)" in report
        with Image.open(results / "qa" / f"beam_{beam}.png") as png:
            png.verify()
    assert "pymedphys.gamma, global normalisation" in report and "random subset" in report
    assert "Dose QA: REVIEW (SIMULATED) — beam 2 REVIEW" in \
        (inst.results / "qa-review" / "report.md").read_text()
    assert "## Dose QA: NOT ASSESSED (SIMULATED) — no reference dose" in \
        (inst.results / "qa-none" / "report.md").read_text()

    # the report artifact says the same first
    artifacts = httpx.post(f"{inst.api_url}/artifacts/filter", timeout=10, json={
        "artifacts": {"key": {"any_": ["case-qa-mixed"]}}}).json()
    assert artifacts and "## Dose QA: FAIL" in artifacts[0]["data"]

    # FAIL and REVIEW are events (without patient ids); not assessed is not
    fail = wait_for(lambda: qa_events(inst.api_url, "qa-mixed"), 30, "the qa event")
    assert fail[0]["payload"]["verdict"] == "FAIL"
    assert fail[0]["payload"]["comparisons"]["beam 3"]["verdict"] == "FAIL"
    assert patient_id(mixed) not in json.dumps(fail)
    assert wait_for(lambda: qa_events(inst.api_url, "qa-review"), 30, "the review event")
    assert qa_events(inst.api_url, "qa-none") == []

    status = inst.mqi("status", "--json")
    assert status.returncode == 0, status.stderr
    qa = {r["case_id"]: r["qa"] for r in json.loads(status.stdout) if r["source"] == "run"}
    assert qa == {"qa-mixed": "FAIL", "qa-review": "REVIEW", "qa-none": "NOT ASSESSED"}
    table = inst.mqi("status").stdout.splitlines()
    assert table[0].split()[:3] == ["CASE", "STATUS", "QA"]
    assert next(ln for ln in table if ln.startswith("qa-review ")).split()[1:3] == \
        ["COMPLETED", "REVIEW"]


@pytest.mark.scenario(budget=120)
def test_mqi_run_passes_a_matching_case_and_fails_a_missing_reference_when_required(
        inst: Installation):
    passing = write_case(inst.root / "elsewhere", "qa-pass", beams=2, layers=1,
                         spots_per_layer=20, seed=8, reference={2: "match", 3: "other_grid",
                                                                "plan": "match"})
    ran = inst.mqi("run", str(passing))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = (inst.results / "qa-pass" / "report.md").read_text()
    assert "## Dose QA: PASS (SIMULATED) — beam 2 PASS (3%/2mm 100.0 %); beam 3 PASS " \
           "(3%/2mm 100.0 %); plan PASS" in report
    assert "qa:pass" in flow_run(inst.api_url, "qa-pass")["tags"]
    assert qa_events(inst.api_url, "qa-pass") == []

    required = inst.root / "required.yaml"
    data = yaml.safe_load(inst.config.read_text())
    data["dose_qa"]["required"] = True
    required.write_text(yaml.safe_dump(data, sort_keys=False))
    missing = write_case(inst.root / "elsewhere", "qa-missing", beams=1, layers=1,
                         spots_per_layer=20, seed=9)
    ran = inst.mqi("run", "--config", str(required), str(missing))
    assert ran.returncode != 0
    said = ran.stdout + ran.stderr
    assert "compare_dose failed: no reference dose (dose_qa.required is true)" in said, said
    assert "Traceback" not in said
    run = flow_run(inst.api_url, "qa-missing")
    assert run["state"]["type"] == "FAILED" and "qa:not-assessed" in run["tags"]
    # the report was still written: the physicist sees why
    assert "## Dose QA: NOT ASSESSED (SIMULATED) — no reference dose" in \
        (inst.results / "qa-missing" / "report.md").read_text()
