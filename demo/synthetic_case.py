"""Synthetic cases shaped like the clinic's real ones, for tests, the demo and benchmarks.

A case is an RT Ion Plan written with pydicom (one SETUP photon beam plus N
TREATMENT proton beams) and one delivery folder per treatment beam with
PlanInfo.txt, PlanRange.txt, ``.ptn`` spot logs (big-endian uint16, 8 columns)
and ``.mgn`` monitor files. Patient data is made up and labelled SIMULATED.
``broken=`` writes each kind of broken case that inspection must refuse; the
``WAITING_KINDS`` among them lack a piece that may still arrive (inspection says
``CaseIncomplete``), the others can never start as they are.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import generate_uid

from demo.dicom import new_file

RT_ION_PLAN = "1.2.840.10008.5.1.4.1.1.481.8"
BROKEN_KINDS = (
    "no_plan",
    "two_plans",
    "unreadable_plan",
    "beam_count_mismatch",
    "planinfo_mismatch",
    "symlink_escape",
    "bad_case_id",
    "empty_ptn",
    "no_planrange",
    "missing_ptn",
    "missing_mgn",
    "empty_mgn",
)
# Broken in a way more arriving files would heal: incomplete, not refused for good.
WAITING_KINDS = frozenset({
    "beam_count_mismatch", "empty_ptn", "no_planrange", "missing_ptn", "missing_mgn",
    "empty_mgn"})
BROKEN_LAYER = 2  # the layer (or the last) of the first delivery folder missing_*/empty_mgn break
REFERENCE_KINDS = ("match", "other_grid", "shifted", "scaled", "scaled_far", "other_plan")
"""Reference RT Doses a case can carry (demo/dose_model.py makes them, SIMULATED):
match (what the simulated MOQUI computes: PASS), other_grid (the same dose on
another spacing and origin: PASS), shifted (3 mm along x: FAIL), scaled (+5 %:
REVIEW), scaled_far (+8 %: FAIL), other_plan (a match, but for another plan's
SOP Instance UID: refused)."""
_REFERENCE_CHANGES: dict[str, dict[str, object]] = {
    "match": {}, "other_grid": {}, "other_plan": {}, "shifted": {"shift_mm": (3.0, 0.0, 0.0)},
    "scaled": {"scale": 1.05}, "scaled_far": {"scale": 1.08}}
PLAN_REFERENCE = "plan"
"""The key of ``write_case(reference={...})`` for a plan-sum reference (DoseSummationType PLAN)."""


def _plan(case_id: str, patient_id: str, study_uid: str, beams: int, layers: int,
          machine: str) -> FileDataset:
    ds = new_file(RT_ION_PLAN, "RTPLAN")
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19000101"
    ds.StudyInstanceUID = study_uid
    ds.SeriesDescription = "SIMULATED plan for MQI Communicator"
    ds.RTPlanLabel = f"SIM_{case_id}"[:16]
    ds.RTPlanGeometry = "PATIENT"
    fraction = Dataset()
    fraction.FractionGroupNumber = 1
    fraction.NumberOfFractionsPlanned = 1
    fraction.NumberOfBeams = beams + 1  # setup beam included, as the clinic's plans do
    ds.FractionGroupSequence = [fraction]

    setup = Dataset()
    setup.BeamNumber = 1
    setup.BeamName = "SETUP"
    setup.TreatmentDeliveryType = "SETUP"
    setup.RadiationType = "PHOTON"
    setup.TreatmentMachineName = machine
    setup.NumberOfControlPoints = 2
    setup.IonControlPointSequence = [Dataset(), Dataset()]
    ion_beams = [setup]
    for b in range(beams):
        beam = Dataset()
        beam.BeamNumber = b + 2
        beam.BeamName = f"F{b + 1}"
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.RadiationType = "PROTON"
        beam.TreatmentMachineName = machine
        beam.NumberOfControlPoints = 2 * layers
        points = []
        for i in range(2 * layers):
            cp = Dataset()
            cp.ControlPointIndex = i
            cp.NominalBeamEnergy = round(150.0 - 2.5 * (i // 2), 2)
            points.append(cp)
        beam.IonControlPointSequence = points
        ion_beams.append(beam)
    ds.IonBeamSequence = ion_beams
    return ds


def write_case(
    scan_root: str | os.PathLike[str],
    case_id: str | None = None,
    *,
    beams: int = 3,
    layers: int = 4,
    spots_per_layer: int = 400,
    machine: str = "G1",
    broken: str | None = None,
    ready_marker: str | None = None,
    seed: int | None = None,
    reference: str | Mapping[int | str, str] | None = None,
) -> Path:
    """Write one case folder under ``scan_root`` and return its path.

    Args:
        scan_root: The folder the sensor watches.
        case_id: Folder name (default: a fresh DICOM UID, as the clinic uses).
        beams: Number of treatment beams (a SETUP beam is always added).
        layers: Energy layers per beam (one .ptn/.mgn pair each).
        spots_per_layer: Rows in each .ptn file (16 bytes a row).
        machine: Treatment machine name (G1 or G2: the gantry).
        broken: One of BROKEN_KINDS to write a case inspection must refuse.
        ready_marker: When given, a marker file of that name is written last.
        seed: Makes the spot data reproducible.
        reference: Reference RT Doses the case carries (``RD.<uid>.dcm``): one of
            ``REFERENCE_KINDS`` for every beam, or a mapping of beam number (or
            ``"plan"`` for the plan sum) to a kind; None: none.
    """
    if broken is not None and broken not in BROKEN_KINDS:
        raise ValueError(f"unknown broken kind {broken!r} (known: {', '.join(BROKEN_KINDS)})")
    rng = random.Random(seed)  # noqa: S311 - made-up test data, not secrets
    case_id = case_id or generate_uid(prefix="1.2.826.0.1.3680043.10.1234.")
    if broken == "bad_case_id":
        case_id = f"bad id;{case_id[:8]}"
    root = Path(scan_root) / case_id
    root.mkdir(parents=True, exist_ok=True)
    patient_id = f"SIM{rng.randrange(10**6):06d}"
    tcsc_patient_id = f"{rng.randrange(10**5):05d}"
    study_uid = generate_uid()
    plan = _plan(case_id, patient_id, study_uid, beams, layers, machine)
    plan_name = f"RP.{plan.SOPInstanceUID}.dcm"
    if broken != "no_plan":
        if broken == "unreadable_plan":
            (root / plan_name).write_bytes(b"not a DICOM file" * 10)
        else:
            plan.save_as(root / plan_name, enforce_file_format=True)
        if broken == "two_plans":
            second = _plan(case_id, patient_id, study_uid, beams, layers, machine)
            second.save_as(root / f"RP.{second.SOPInstanceUID}.dcm", enforce_file_format=True)

    start = datetime(2025, 1, 1, 12, 0, 0)
    delivered = beams - 1 if broken == "beam_count_mismatch" else beams
    for b in range(delivered):
        when = start + timedelta(minutes=5 * b)
        folder = root / (when.strftime("%Y%m%d%H%M%S") + "00")
        folder.mkdir(exist_ok=True)
        beam_number = b + 2
        info_patient = "SOMEONE_ELSE" if broken == "planinfo_mismatch" and b == 0 else patient_id
        (folder / "PlanInfo.txt").write_text(
            f"DICOM_PATIENT_ID,{info_patient}\n"
            f"DICOM_STUDY_INS_UID,{study_uid}\n"
            f"DICOM_BEAM_NUMBER,{beam_number}\n"
            f"TCSC_PATIENT_ID,{tcsc_patient_id}\n"
            f"TCSC_FIELD_NUMBER,{b + 1}\n"
            f"TCSC_IRRAD_DATETIME,{when:%Y/%m/%d %H:%M:%S}\n"
            f"TCSC_MACHINE,{machine}\n")
        rows = ["LAYER_NO,LAYER_ENERGY,SCAN_OUT_FL_NM,PLAN_SCAN_OUT_FL_NM"]
        for layer in range(1, layers + 1):
            energy = 150.0 - 2.5 * (layer - 1)
            stem_ptn = f"02_{tcsc_patient_id}_{beam_number:02d}_{b + 1:02d}_{layer:03d}"
            stem_mgn = f"02_{patient_id}_{beam_number:02d}_{b + 1:02d}_{layer:03d}"
            rows.append(f"{layer},{energy:.2f},{stem_ptn}.ptn,{stem_mgn}.mgn")
            spots = 0 if broken == "empty_ptn" and b == 0 and layer == 1 else spots_per_layer
            data = bytearray()
            for spot in range(spots):
                data += struct.pack(">8H", spot, rng.randrange(65536), rng.randrange(65536),
                                    rng.randrange(4096), rng.randrange(4096), layer,
                                    int(energy * 10), 0)
            hit = b == 0 and layer == min(BROKEN_LAYER, layers)
            if not (hit and broken == "missing_ptn"):
                (folder / f"{stem_ptn}.ptn").write_bytes(bytes(data))
            if not (hit and broken == "missing_mgn"):
                monitor = struct.pack(">4H", layer, int(energy * 10), spots, 0) * 64
                (folder / f"{stem_mgn}.mgn").write_bytes(
                    b"" if hit and broken == "empty_mgn" else monitor)
        if not (b == 0 and broken == "no_planrange"):
            (folder / "PlanRange.txt").write_text("\n".join(rows) + "\n")
    if broken == "symlink_escape":
        (root / "outside").symlink_to("/etc")
    if reference is not None and broken is None:
        _write_references(root, plan, reference, [b + 2 for b in range(beams)])
    if ready_marker:
        (root / ready_marker).write_text("")
    return root


def _write_references(root: Path, plan: FileDataset, reference: str | Mapping[int | str, str],
                      beam_numbers: list[int]) -> None:
    """The reference RT Doses, made from the simulators' dose model (SIMULATED)."""
    import numpy as np

    from demo.dose_model import OTHER_GRID, SIMULATOR_GRID, beam_dose, rt_dose

    wanted = dict.fromkeys(beam_numbers, reference) if isinstance(reference, str) \
        else dict(reference)
    for key, kind in wanted.items():
        if kind not in REFERENCE_KINDS:
            raise ValueError(f"unknown reference kind {kind!r} (known: "
                             f"{', '.join(REFERENCE_KINDS)})")
        grid = OTHER_GRID if kind == "other_grid" else SIMULATOR_GRID
        changes = _REFERENCE_CHANGES[kind]
        beams = beam_numbers if key == PLAN_REFERENCE else [int(key)]
        dose = np.sum([beam_dose(b, *grid.axes(), **changes) for b in beams],  # type: ignore[arg-type]
                      axis=0)
        ds = rt_dose(dose, grid, plan=plan, beam=None if key == PLAN_REFERENCE else int(key),
                     summation="PLAN" if key == PLAN_REFERENCE else "BEAM",
                     description=f"SIMULATED reference dose ({kind}), "
                                 f"{'plan' if key == PLAN_REFERENCE else f'beam {key}'}")
        if kind == "other_plan":
            ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = generate_uid()
        ds.save_as(root / f"RD.{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
