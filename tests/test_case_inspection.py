"""Case inspection on synthetic cases: good ones described, each broken kind refused precisely."""

from __future__ import annotations

import os
import pickle

import pydicom
import pytest

from config import DEFAULT_PATH, load_config
from demo.synthetic_case import BROKEN_KINDS, WAITING_KINDS, write_case
from flows.case_inspection import (
    CaseIncomplete,
    CaseRejected,
    content_signature,
    inspect_case,
    patient_hash,
    read_plan_info,
)

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


FIRST = "20250101120000" "00"  # the first delivery folder write_case makes
REASONS = {
    "no_plan": "no RT Ion Plan",
    "two_plans": "more than one RT plan",
    "unreadable_plan": "unreadable DICOM",
    "beam_count_mismatch": "3 treatment beam(s) (1 setup beam(s) excluded) but the case has "
                           "2 delivery folder(s)",
    "planinfo_mismatch": "belongs to another patient",
    "symlink_escape": "outside is a symbolic link (to outside the case folder)",
    "bad_case_id": "does not match cases.id_pattern",
    "empty_ptn": f"{FIRST}/PlanRange.txt row 1 (layer 1): the .ptn file it names is empty",
    "no_planrange": f"{FIRST}/PlanRange.txt is missing",
    "missing_ptn": f"{FIRST}/PlanRange.txt row 2 (layer 2): the .ptn file it names is missing",
    "missing_mgn": f"{FIRST}/PlanRange.txt row 2 (layer 2): the .mgn file it names is missing",
    "empty_mgn": f"{FIRST}/PlanRange.txt row 2 (layer 2): the .mgn file it names is empty",
}


def patient_ids(case) -> set[str]:
    """Every patient id the case's PlanInfo files hold (DICOM and TCSC)."""
    ids = set()
    for info_file in case.glob("*/PlanInfo.txt"):
        info = read_plan_info(info_file)
        ids |= {info["DICOM_PATIENT_ID"], info["TCSC_PATIENT_ID"]}
    return ids


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_every_broken_kind_is_refused_with_its_reason(tmp_path, kind):
    case = write_case(tmp_path, "case-1", broken=kind)
    before = {p: p.stat().st_mtime_ns for p in case.rglob("*") if not p.is_symlink()}
    with pytest.raises(CaseRejected) as info:
        inspect(case, scan_root=tmp_path)
    assert REASONS[kind] in info.value.reason
    # incomplete (may still arrive: the sensor waits) or refused for good, never both
    assert info.value.waiting is (kind in WAITING_KINDS)
    assert isinstance(info.value, CaseIncomplete) is (kind in WAITING_KINDS)
    # the run that is given such a case refuses it all the same
    assert "refused" in str(info.value)
    # no patient id in what is said, although the .ptn/.mgn names carry them
    ids = patient_ids(case)
    assert ids and not [i for i in ids if i in str(info.value)], str(info.value)
    assert {p: p.stat().st_mtime_ns for p in case.rglob("*") if not p.is_symlink()} == before
    # the kind survives the trip from the inspect task to the flow
    again = pickle.loads(pickle.dumps(info.value))
    assert (type(again), again.reason, again.waiting) == (type(info.value), info.value.reason,
                                                         info.value.waiting)


def test_missing_pieces_are_counted_and_a_refusal_wins_over_them(tmp_path):
    case = write_case(tmp_path, "case-1", beams=2, layers=3)
    folders = sorted(p for p in case.iterdir() if p.is_dir())
    away = tmp_path / "away"
    away.mkdir()
    for layer_file in sorted(folders[1].glob("*.mgn"))[1:]:
        layer_file.rename(away / layer_file.name)
    with pytest.raises(CaseIncomplete) as info:
        inspect(case)
    assert info.value.reason == (f"{folders[1].name}/PlanRange.txt row 2 (layer 2): the .mgn "
                                 f"file it names is missing (and 1 more missing or empty)")
    for layer_file in away.iterdir():  # the pieces arrive: complete
        layer_file.rename(folders[1] / layer_file.name)
    assert [b.layers for b in inspect(case).beams] == [3, 3]
    (folders[1] / "PlanInfo.txt").rename(away / "PlanInfo.txt")
    with pytest.raises(CaseIncomplete, match=f"{folders[1].name}/PlanInfo.txt is missing"):
        inspect(case)
    # something that can never heal is said, whatever else is missing
    text = (folders[0] / "PlanInfo.txt").read_text()
    (folders[0] / "PlanInfo.txt").write_text(text.replace("DICOM_BEAM_NUMBER,2",
                                                          "DICOM_BEAM_NUMBER,9"))
    with pytest.raises(CaseRejected, match="names beam 9") as refused:
        inspect(case)
    assert not refused.value.waiting


def test_a_planrange_that_can_never_be_right_is_refused(tmp_path):
    case = write_case(tmp_path, "case-1", beams=1, layers=2)
    folder = next(p for p in case.iterdir() if p.is_dir())
    plan_range = folder / "PlanRange.txt"
    rows = plan_range.read_text().splitlines()
    ptn = rows[1].split(",")[2]
    plan_range.write_text(rows[0].replace("PLAN_SCAN_OUT_FL_NM", "OTHER") + "\n")
    with pytest.raises(CaseRejected, match="has no PLAN_SCAN_OUT_FL_NM column") as info:
        inspect(case)
    assert not info.value.waiting
    plan_range.write_text(rows[0] + "\n")  # a header alone: the rows may still come
    with pytest.raises(CaseIncomplete, match="lists no energy layer yet"):
        inspect(case)
    plan_range.write_text("\n".join([rows[0], rows[1].replace(ptn, "../" + ptn), rows[2]]))
    with pytest.raises(CaseRejected, match="row 1 \\(layer 1\\): the .ptn file it names is "
                                           "not a plain file name") as info:
        inspect(case)
    assert ptn not in str(info.value)
    plan_range.write_text("\ufeff" + "\n".join(rows) + "\n")  # a BOM, as Windows writes
    assert inspect(case).beams[0].layers == 2
    (folder / ptn).unlink()
    (folder / ptn).mkdir()
    with pytest.raises(CaseRejected, match="row 1 \\(layer 1\\): the .ptn file it names is "
                                           "not a regular file"):
        inspect(case)


def test_a_link_to_a_spot_log_is_named_without_the_file_name(tmp_path):
    case = write_case(tmp_path, "case-1", beams=1, layers=2)
    folder = next(p for p in case.iterdir() if p.is_dir())
    ptn = sorted(folder.glob("*.ptn"))[1]
    target = tmp_path / "elsewhere.ptn"
    ptn.rename(target)
    ptn.symlink_to(target)
    with pytest.raises(CaseRejected) as info:
        inspect(case)
    assert info.value.reason == (f"{folder.name}: the .ptn file of layer 2 is a symbolic "
                                 f"link (to outside the case folder); links are not accepted")


def test_the_signature_follows_writes_not_reads(tmp_path):
    case = write_case(tmp_path, "case-1", beams=1, layers=2)
    first = content_signature(case, set())
    for path in case.rglob("*"):
        if path.is_file():
            path.read_bytes()
    inspect(case)
    assert content_signature(case, set()) == first  # reading changes nothing
    ptn = next(case.rglob("*.ptn"))
    moved = ptn.with_name("x" + ptn.name)
    ptn.rename(moved)  # same count, size and mtimes: the listing tells
    renamed = content_signature(case, set())
    assert renamed != first and renamed[:3] == first[:3]
    moved.chmod(0)  # made unreadable (and later readable): a change too
    assert content_signature(case, set()) != renamed
    os.utime(moved, ns=(0, moved.stat().st_mtime_ns))  # only the access time
    moved.chmod(0o644)
    assert content_signature(case, {"_R"}) == content_signature(case, set())


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
    with open(sorted(folder.glob("*.ptn"))[0], "ab") as fh:
        fh.write(b"\x00\x01\x02")
    with pytest.raises(CaseRejected, match="row 1 \\(layer 1\\): the .ptn file it names is "
                                           "not whole rows") as info:
        inspect(case)
    assert not info.value.waiting
    assert read_plan_info(folder / "PlanInfo.txt")["TCSC_PATIENT_ID"] not in str(info.value)
