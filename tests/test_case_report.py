"""The case report's parts that need no server: its key, the rerun command, the page."""

from __future__ import annotations

import re

from flows.case_report import TAIL_LINES, CaseReport, rerun_command
from flows.naming import progress_artifact_key, report_artifact_key
from flows.outcomes import StageFailed


def test_a_key_safe_case_id_is_its_own_key_any_other_gets_a_stable_safe_form():
    assert report_artifact_key("e2e-three") == "case-e2e-three"
    assert progress_artifact_key("e2e-three", 2) == "case-e2e-three-beam-2"
    uid = report_artifact_key("1.2.840.113619.2.55.3")
    assert re.fullmatch(r"case-1-2-840-113619-2-55-3-[0-9a-f]{8}", uid)
    assert uid == report_artifact_key("1.2.840.113619.2.55.3")  # stable
    # ids that differ only in case or punctuation never share a key
    keys = {report_artifact_key(i) for i in ("DEMO-1", "demo-1", "demo.1", "demo_1")}
    assert len(keys) == 4 and all(re.fullmatch(r"[a-z0-9-]+", k) for k in keys)


def test_the_rerun_command_names_a_config_other_than_the_default_and_the_workflow():
    assert rerun_command("c1", "default_qa", None) == "mqi rerun c1"
    assert rerun_command("c1", "fast", "/etc/mqi dir/mqi.yaml") == \
        "mqi rerun --config '/etc/mqi dir/mqi.yaml' --workflow fast c1"


def test_a_failed_stage_shows_reason_log_path_tail_and_rerun(tmp_path):
    log = tmp_path / "run_moqui_sim-beam3.log"
    log.write_text("".join(f"line {i}\n" for i in range(50)) + "FATAL ERROR: diverged\n")
    report = CaseReport("c1", "default_qa", ["run_interpreter", "run_moqui_sim"],
                        simulated=True, flow_run_id=None, rerun="mqi rerun c1")
    report._record("run_moqui_sim", 3, StageFailed(
        "run_moqui_sim", "exit code 1: FATAL ERROR: diverged", beam=3, log_path=str(log)))
    report.status = "FAILED"
    page = report.render()
    assert "## run_moqui_sim [beam 3] FAILED" in page and "SIMULATED" in page
    assert f"Full log: `{log}`" in page and "mqi rerun c1" in page
    shown = page.split("````text\n")[1].split("\n````")[0].splitlines()
    assert shown == log.read_text().splitlines()[-TAIL_LINES:]
    assert "| upload | waiting |" in page and "| run_moqui_sim [each beam] |" in page


def test_a_case_stage_that_fails_for_one_beam_marks_its_own_row():
    report = CaseReport("c1", "default_qa", ["run_interpreter"], simulated=False,
                        flow_run_id=None, rerun="mqi rerun c1")
    report._record("verify", 2, StageFailed("verify", "no RT Dose in /r/c1/dicom/beam_2",
                                            beam=2))
    page = report.render()
    assert "## verify [beam 2] FAILED" in page
    assert "| verify | FAILED | verify [beam 2]: no RT Dose in /r/c1/dicom/beam_2 |" in page


def test_a_simulation_note_names_its_gpu_host_when_there_are_several() -> None:
    from flows.case_report import _note
    from flows.outcomes import SimulationOutcome

    one = SimulationOutcome(beam=2, gpu=1, seconds=30.04, waited=0.5)
    assert _note(one) == "GPU 1, 30.0 s (waited 0.5 s)"
    several = SimulationOutcome(beam=2, gpu=1, seconds=30.04, waited=0.5, host="gpu_b")
    assert _note(several) == "GPU 1 on gpu_b, 30.0 s (waited 0.5 s)"
