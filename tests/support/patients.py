"""The patient identifiers a synthetic case holds, for the tests that prove none leaks."""

from __future__ import annotations

from pathlib import Path

from flows.case_inspection import read_plan_info


def patient_ids(case: Path) -> set[str]:
    """Every patient id of the case as its own files hold them — PlanInfo's DICOM and
    TCSC ids, the plan's PatientID and PatientName — checked to be in its file names
    too (so a test searching for them can fail)."""
    import pydicom

    ids: set[str] = set()
    for info_file in case.glob("*/PlanInfo.txt"):
        info = read_plan_info(info_file)
        ids |= {info["DICOM_PATIENT_ID"], info["TCSC_PATIENT_ID"]}
    plan = pydicom.dcmread(next(case.glob("RP*.dcm")))
    ids |= {str(plan.PatientID), str(plan.PatientName)}
    names = {p.name.split("_")[1] for p in case.rglob("*.ptn")} | \
        {p.name.split("_")[1] for p in case.rglob("*.mgn")}
    assert names and names <= ids  # the file names do carry the ids
    return ids
