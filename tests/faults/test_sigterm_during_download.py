"""Fault 9: `mqi up` receives SIGTERM while a case's RT Dose is being downloaded.

It stops within its grace period (nothing needs a SIGKILL), no log shows an error
made by the shutdown itself, no half-written RT Dose is left under its real name,
and the next start resumes the case without simulating any beam again."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.conftest import (
    TERMINAL,
    drop_case,
    flow_runs,
    log_errors,
    sim_starts,
    state_of,
)
from tests.support.pipeline import Installation, stop, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.mark.scenario(budget=330)
def test_sigterm_during_download_stops_cleanly_and_the_next_start_resumes(
        up_inst: Installation, tmp_path):
    inst = up_inst
    inst.set_control(duration=0.5, batches=2, dose_padding_mb=40)
    up = inst.start_up()
    second = None
    try:
        drop_case(inst, tmp_path / "staging", "term-case", beams=2)
        dicom = inst.results / "term-case" / "dicom"
        wait_for(lambda: list(dicom.glob("*/.*.mqi-part")), 120,
                 "the download to be writing a part file", interval=0.02)
        asked = time.monotonic()
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        took = time.monotonic() - asked
        up_log = (inst.root / "up.log").read_text()
        assert "ignored SIGTERM" not in up_log, up_log[-3000:]  # none needed a SIGKILL
        assert log_errors(inst) == {}
        # nothing half-written under a real name: each RT Dose present is whole
        for dose in dicom.glob("*/*.dcm"):
            assert dose.stat().st_size > 40 * 1024 * 1024, dose
        before = sim_starts(inst)
        assert before == {"2": 1, "3": 1}

        second = inst.start_up()
        final = wait_for(lambda: (s := state_of(inst.api_url, "term-case")) in TERMINAL and s,
                         180, "the case to finish after the restart")
        assert final == "COMPLETED", flow_runs(inst.api_url, "term-case")
        assert len(flow_runs(inst.api_url, "term-case")) == 1
        assert sim_starts(inst) == before  # no beam was simulated again
        assert sorted(p.name for p in dicom.glob("*/*.dcm")) == ["RTDOSE_beam2.dcm",
                                                                "RTDOSE_beam3.dcm"]
        assert not list(dicom.glob("*/.*.mqi-part"))
        stop(second, grace=90)
        assert log_errors(inst) == {}
        print(f"\nSIGTERM during download: stopped in {took:.1f} s")
    finally:
        for proc in (up, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
