"""Case inspection on synthetic cases: good ones described, each broken kind refused precisely."""

from __future__ import annotations

import pydicom
import pytest

from config import DEFAULT_PATH, load_config
from demo.synthetic_case import BROKEN_KINDS, write_case
from flows.case_inspection import CaseRejected, inspect_case, patient_hash, read_plan_info

CFG = load_config(DEFAULT_PATH)
PATTERN = CFG.cases.id_pattern


def inspect(path, **kw):
    return inspect_case(path, id_pattern=PATTERN, gantry_numbers=CFG.moqui.gantry_numbers, **kw)


def test_synthetic_case_has_the_real_structure(tmp_path):
    case = write_case(tmp_path, "case-1", beams=3, layers=5, machine="G2", seed=1)
    plan = pydicom.dcmread(next(case.glob("RP.*.dcm")))
    beams = plan.IonBeamSequence
    assert plan.Modality == "RTPLAN" and plan.FractionGroupSequence[0].NumberOfBeams == 4
    assert (beams[0].TreatmentDeliveryType, beams[0].RadiationType) == ("SETUP", "PHOTON")
    assert all(b.TreatmentDeliveryType == "TREATMENT" and b.RadiationType == "PROTON"
               for b in beams[1:])
    folders = sorted(p for p in case.iterdir() if p.is_dir())
    assert len(folders) == 3 and all(len(p.name) == 16 and p.name.isdigit() for p in folders)
    info = read_plan_info(folders[0] / "PlanInfo.txt")
    assert info["DICOM_BEAM_NUMBER"] == "2" and info["DICOM_PATIENT_ID"] == plan.PatientID
    ptn = sorted(folders[0].glob("*.ptn"))
    assert len(ptn) == 5 and ptn[0].stat().st_size == 400 * 16
    assert info["TCSC_PATIENT_ID"] in ptn[0].name and plan.PatientID in \
        sorted(folders[0].glob("*.mgn"))[0].name


def test_a_good_case_is_described(tmp_path):
    case = write_case(tmp_path, "case-1", beams=3, layers=4, machine="G2", ready_marker="_R")
    info = inspect(case, scan_root=tmp_path, ignore={"_R"})
    assert info.case_id == "case-1" and info.setup_beams == 1
    assert [(b.number, b.name, b.gantry_num, b.layers) for b in info.beams] == [
        (2, "F1", 2, 4), (3, "F2", 2, 4), (4, "F3", 2, 4)]
    assert "_R" not in info.manifest and len(info.manifest) == 1 + 3 * (2 + 2 * 4)
    plan = pydicom.dcmread(next(case.glob("RP.*.dcm")))
    assert info.patient_hash == patient_hash(plan.PatientID)
    # File names carry the patient id (as the clinic's do), so only the manifest may hold it.
    assert plan.PatientID not in info.model_dump_json(exclude={"manifest"})


def test_manifest_digest_follows_content(tmp_path):
    case = write_case(tmp_path, "case-1", seed=3)
    first = inspect(case).manifest_digest
    assert inspect(case).manifest_digest == first
    ptn = next(case.glob("*/*.ptn"))
    data = bytearray(ptn.read_bytes())
    data[0] ^= 1
    ptn.write_bytes(bytes(data))
    assert inspect(case).manifest_digest != first


REASONS = {
    "no_plan": "no RT Ion Plan",
    "two_plans": "more than one RT plan",
    "unreadable_plan": "unreadable DICOM",
    "beam_count_mismatch": "3 treatment beam(s) (1 setup beam(s) excluded) but the case has "
                           "2 delivery folder(s)",
    "planinfo_mismatch": "belongs to another patient",
    "symlink_escape": "outside is a symbolic link (to outside the case folder)",
    "bad_case_id": "does not match cases.id_pattern",
    "empty_ptn": ".ptn is empty",
}


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_every_broken_kind_is_refused_with_its_reason(tmp_path, kind):
    case = write_case(tmp_path, "case-1", broken=kind)
    before = {p: p.stat().st_mtime_ns for p in case.rglob("*") if not p.is_symlink()}
    with pytest.raises(CaseRejected) as info:
        inspect(case, scan_root=tmp_path)
    assert REASONS[kind] in info.value.reason
    assert {p: p.stat().st_mtime_ns for p in case.rglob("*") if not p.is_symlink()} == before


def test_a_case_folder_outside_the_scan_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    case = write_case(tmp_path, "elsewhere")
    (root / "elsewhere").symlink_to(case)
    with pytest.raises(CaseRejected, match="not a folder directly inside the scan root"):
        inspect(root / "elsewhere", scan_root=root)
    with pytest.raises(CaseRejected, match="not a folder directly inside the scan root"):
        inspect(root / ".." / "elsewhere", scan_root=root)


def test_planinfo_naming_a_setup_beam_and_a_ragged_ptn(tmp_path):
    case = write_case(tmp_path, "case-1", beams=2)
    folder = sorted(p for p in case.iterdir() if p.is_dir())[0]
    text = (folder / "PlanInfo.txt").read_text().replace("DICOM_BEAM_NUMBER,2",
                                                         "DICOM_BEAM_NUMBER,1")
    (folder / "PlanInfo.txt").write_text(text)
    with pytest.raises(CaseRejected, match="names beam 1, which is not a treatment beam"):
        inspect(case)
    (folder / "PlanInfo.txt").write_text(text.replace("DICOM_BEAM_NUMBER,1",
                                                      "DICOM_BEAM_NUMBER,2"))
    with open(next(folder.glob("*.ptn")), "ab") as fh:
        fh.write(b"\x00\x01\x02")
    with pytest.raises(CaseRejected, match="not whole rows"):
        inspect(case)
