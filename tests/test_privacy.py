"""No patient identifier leaves the case folder and the results.

Cases whose ids are part of their file names (the treatment system's `.ptn`
and `.mgn` names) go through every path a message can take: a case completed
by `mqi up` (whose interpreter names every file it reads), one refused by its
run, one the sensor sees waiting, one failing in a stage whose output names a
file, run by `mqi run`. Then every channel is searched for every id: the API's
flow runs, task runs, logs, events and artifacts, the log files of the data
dir and of `mqi up`, `mqi status` (table and JSON) and `mqi run`'s output.
"""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest

from demo.synthetic_case import write_case
from deployments.intake_ledger import IntakeLedger, ledger_path
from tests.support.patients import patient_ids
from tests.support.pipeline import Installation, quick_installation, stop, wait_for
from tests.test_up import state_of


def everything(api: str, path: str, key: str | None = None) -> list[object]:
    """Every record of an API collection, page by page."""
    out: list[object] = []
    while True:
        response = httpx.post(f"{api}/{path}", json={"limit": 200, "offset": len(out)},
                              timeout=30)
        response.raise_for_status()
        page = response.json()[key] if key else response.json()
        out += page
        if len(page) < 200:
            return out


def events(api: str) -> list[object]:
    response = httpx.post(f"{api}/events/filter", json={"limit": 50}, timeout=30)
    response.raise_for_status()
    body = response.json()
    found = list(body["events"])
    while body.get("next_page"):
        response = httpx.get(body["next_page"], timeout=30)
        response.raise_for_status()
        body = response.json()
        found += body["events"]
    return found


@pytest.fixture
def inst(tmp_path, sshd) -> Installation:
    return quick_installation(tmp_path / "mqi", sshd)


@pytest.mark.integration
@pytest.mark.scenario(budget=240)
def test_no_patient_id_in_any_output_channel(inst: Installation, tmp_path):
    api = inst.api_url
    staging = tmp_path / "staging"
    cases = {name: write_case(staging, name, beams=2, layers=2, spots_per_layer=10,
                              seed=seed, broken=broken)
             for seed, (name, broken) in enumerate([
                 ("priv-ok", None), ("priv-refused", "empty_ptn"),
                 ("priv-waiting", "empty_ptn"), ("priv-fails", None)])}
    ids = set().union(*(patient_ids(c) for c in cases.values()))
    up = inst.start_up()
    try:
        # a stage whose output names a spot log fails, under `mqi run`
        inst.set_control(duration=0.3, batches=2, fail={"interpreter": True})
        failed = inst.mqi("run", str(cases["priv-fails"]))
        assert failed.returncode != 0 and "bad spot log" in failed.stdout + failed.stderr
        inst.set_control(duration=0.3, batches=2)

        for name in ("priv-ok", "priv-refused", "priv-waiting"):
            os.replace(cases[name], inst.scan_root / name)
        for name in ("priv-ok", "priv-refused"):
            (inst.scan_root / name / "_CASE_READY").write_text("")
        wait_for(lambda: state_of(api, "priv-ok") == "COMPLETED", 120, "priv-ok completed")
        wait_for(lambda: state_of(api, "priv-refused") == "FAILED", 60, "priv-refused failed")
        cfg_path = ledger_path(_config(inst))
        wait_for(lambda: (e := IntakeLedger.read(cfg_path).get("priv-waiting"))
                 and e.state == "WAITING", 30, "priv-waiting said waiting")
        status_json = inst.mqi("status", "--json")
        status_table = inst.mqi("status")
        assert status_json.returncode == 0 and status_table.returncode == 0
        assert "priv-waiting" in status_table.stdout  # the intake row is there

        channels: dict[str, str] = {
            "mqi run": failed.stdout + failed.stderr,
            "mqi status --json": status_json.stdout + status_json.stderr,
            "mqi status": status_table.stdout + status_table.stderr,
            "flow runs": json.dumps(everything(api, "flow_runs/filter")),
            "task runs": json.dumps(everything(api, "task_runs/filter")),
            "logs": json.dumps(everything(api, "logs/filter")),
            "artifacts": json.dumps(everything(api, "artifacts/filter")),
            "events": json.dumps(events(api)),
        }
    finally:
        stop(up, grace=90)
    for log_file in [*(inst.root / "data").rglob("*.log"), inst.root / "up.log"]:
        channels[str(log_file)] = log_file.read_text(errors="replace")
    channels["intake ledger"] = cfg_path.read_bytes().decode(errors="replace")
    # the channels did carry what happened (a search of empty text finds nothing)
    assert "bad spot log" in channels["logs"] and "reading " in channels["logs"]
    assert "empty" in channels["flow runs"] and "mqi.case.waiting" in channels["events"]
    leaks = {where: found for where, text in channels.items() if (found := leaks_in(text, ids))}
    assert not leaks, leaks


def leaks_in(text: str, ids: set[str]) -> list[str]:
    """Each id found in the text as a token of its own, with the text around it.

    An id counts only where no letter or digit touches it: a five-digit TCSC id
    is found inside a flow run's UUID or a timestamp's microseconds now and then
    (`...-4b74606e...`, `.746061`), and that is chance, not a leak; in a file
    name (`02_74606_02_01_001.ptn`), a path or a sentence it is found."""
    return [f"{i}: ...{text[max(m.start() - 60, 0):m.end() + 60]}..."
            for i in sorted(ids)
            for m in re.finditer(rf"(?<![0-9a-z]){re.escape(i.lower())}(?![0-9a-z])",
                                 text.lower())]


def _config(inst: Installation):
    from config import load_config

    return load_config(str(inst.config))


def test_an_id_counts_where_it_stands_alone():
    found = leaks_in('{"name": "02_74606_02_01_001.ptn", "id": "4b74606e-1c2d", '
                     '"t": "02:41:33.746061", "msg": "patient SIM140891 refused"}',
                     {"74606", "SIM140891", "07412"})
    assert [f.split(":")[0] for f in found] == ["74606", "SIM140891"]
    assert "02_74606_02" in found[0]
