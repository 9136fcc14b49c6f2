"""The dashboard as the physicist sees it, in a real browser.

`mqi up` processes one case that completes and one whose beam 2 fails in MOQUI;
then headless Chromium (Debian's, driven by Selenium) opens the real Prefect
UI and follows the links a physicist would: the case runs, each case's flow
run, its Artifacts tab, the case report (`case-<id>`) on the flow run itself.
The failed case's report must say FAILED, the telling line and the exact
`mqi rerun` command; the completed one's the verification report. On the way
it takes the pictures the README shows, of the runs, both reports and the GPU
curator's `gpu-pool` table: into docs/img/ with MQI_SAVE_SCREENSHOTS=1,
otherwise into the test's temporary folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from demo.synthetic_case import write_case
from flows.curator import ARTIFACT_KEY as GPU_TABLE_KEY
from flows.naming import report_artifact_key, run_name
from tests.support.api import post as api_write
from tests.support.browser import Browser
from tests.support.pipeline import REPO, Installation, quick_installation, stop, wait_for
from tests.test_up import state_of

PASSING, FAILING = "browser-ok", "browser-fails"
TELLING_LINE = "FATAL ERROR: simulated failure: particle transport diverged"
DOCS_IMG = REPO / "docs" / "img"
CURATOR_DEPLOYMENT = "curate_gpus/curate-gpus"


@pytest.fixture
def inst(tmp_path: Path, sshd) -> Installation:
    return quick_installation(tmp_path / "mqi", sshd)


@pytest.fixture
def browser(inst: Installation, tmp_path: Path) -> Iterator[Browser]:
    shots = DOCS_IMG if os.environ.get("MQI_SAVE_SCREENSHOTS") == "1" else tmp_path / "shots"
    b = Browser(inst.api_url.removesuffix("/api"), shots, failures=tmp_path / "failures")
    try:
        yield b
    finally:
        b.close()


def deliver(inst: Installation, case_id: str, seed: int) -> None:
    """A 2-beam case (beams 2 and 3) written elsewhere, moved in whole, marked ready."""
    case = write_case(inst.root / "staging", case_id, beams=2, layers=2, spots_per_layer=10,
                      seed=seed)
    os.replace(case, inst.scan_root / case_id)
    (inst.scan_root / case_id / "_CASE_READY").write_text("")


def look_at_the_gpus_now(api: str) -> None:
    """A run of the curator now, as the UI's Quick run makes one (its schedule's next
    run may be a minute away)."""
    found = httpx.get(f"{api}/deployments/name/{CURATOR_DEPLOYMENT}", timeout=10)
    found.raise_for_status()
    api_write(f"{api}/deployments/{found.json()['id']}/create_flow_run", {})


def flow_run_section(page: str) -> str:
    """What the Artifacts tab lists under "Flow run" (artifacts of the run itself, not of
    one of its tasks): the text between that heading and "Task runs"."""
    _, found, rest = page.partition("\nFlow run\n")
    return rest.partition("\nTask runs\n")[0] if found else ""


def open_case_report(b: Browser, case_id: str) -> str:
    """From the process_case flow's page: the case's flow run, its Artifacts tab, the
    report card among the flow run's own artifacts; the report's page text."""
    b.open("/flows")
    b.click("process_case", "a")
    b.follow(run_name(case_id), "a", "/runs/flow-run/")
    b.wait_text("Artifacts")
    b.click("Artifacts", "li")
    key = report_artifact_key(case_id)
    b.wait_until(lambda page: key in flow_run_section(page),
                 f"the report {key} among the flow run's own artifacts")
    b.click(key, css_class="artifact-card__title")
    return b.wait_text(f"Key\n{key}")


@pytest.mark.integration
@pytest.mark.scenario(budget=420)
def test_each_case_page_shows_its_report(inst: Installation, browser: Browser):
    api = inst.api_url
    up = inst.start_up()
    try:
        deliver(inst, PASSING, seed=1)
        wait_for(lambda: state_of(api, PASSING) == "COMPLETED", 90, f"{PASSING} completed")
        inst.set_control(duration=0.3, batches=2, fail={"2": "fatal"})  # beam 2 from now on
        deliver(inst, FAILING, seed=2)
        wait_for(lambda: state_of(api, FAILING) == "FAILED", 90, f"{FAILING} failed")
        look_at_the_gpus_now(api)
        wait_for(lambda: httpx.get(f"{api}/artifacts/{GPU_TABLE_KEY}/latest",
                                   timeout=10).status_code == 200, 60, "the gpu-pool table")

        # the case runs, named case-<id>, one red and one green
        browser.open("/flows")
        browser.click("process_case", "a")
        page = browser.wait_text(run_name(PASSING), run_name(FAILING), "Completed", "Failed")
        assert "SIMULATED" in page
        browser.screenshot("runs")

        # the completed case: its verification report, on its flow run
        report = open_case_report(browser, PASSING)
        assert f"MQI verification report: case {PASSING}" in report
        assert "SIMULATED" in report and "Result files" in report
        assert "RTDOSE_beam2.dcm" in report and "RTDOSE_beam3.dcm" in report
        browser.screenshot("case-completed")

        # the failed case: a report too, saying why and how to run it again
        report = open_case_report(browser, FAILING)
        assert "FAILED" in report
        assert "run_moqui_sim [beam 2]" in report
        assert TELLING_LINE in report
        rerun = re.search(rf"mqi rerun (?:--config (\S+) )?{re.escape(FAILING)}(?!\S)", report)
        assert rerun, f"no `mqi rerun ... {FAILING}` command in the report:\n{report}"
        if rerun.group(1):
            assert Path(rerun.group(1)).resolve() == inst.config.resolve()
        browser.scroll_to("run_moqui_sim [beam 2] FAILED")  # the reason, the log, the rerun
        browser.screenshot("case-failed")

        # the GPU curator's table, newest version
        browser.open(f"/artifacts/key/{GPU_TABLE_KEY}")
        browser.wait_text(f"Created {GPU_TABLE_KEY}")
        browser.first(".artifact-timeline h6 a").click()  # the newest version comes first
        table = browser.wait_text("NVIDIA H100", "index", "usable")
        assert f"Key\n{GPU_TABLE_KEY}" in table
        browser.screenshot("gpu-pool")
    finally:
        stop(up, grace=90)
