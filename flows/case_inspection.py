"""Case inspection: is this folder a complete, consistent case, and what is in it?

Runs before anything leaves the machine. A case that fails here is refused with
one precise reason and is never uploaded. The description it returns holds no
patient name or id: only the case id and a short pseudonymous hash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pydicom
from pydantic import BaseModel
from pydicom.errors import InvalidDicomError

from blocks.manifest import sha256_file
from config import MqiError
from flows.commands import CaseIdError, validate_case_id

RT_ION_PLAN = "1.2.840.10008.5.1.4.1.1.481.8"
PTN_ROW_BYTES = 16  # 8 x big-endian uint16


class CaseRejected(MqiError):
    """The folder is not a processable case; ``reason`` says exactly why."""

    def __init__(self, case_dir: str | os.PathLike[str], reason: str) -> None:
        self.case_dir = str(case_dir)
        self.reason = reason
        super().__init__(f"case {Path(case_dir).name!r} refused: {reason}")

    def __reduce__(self) -> tuple[object, ...]:  # crosses from the task to the flow
        return (CaseRejected, (self.case_dir, self.reason))


class Beam(BaseModel):
    number: int
    name: str
    machine: str
    gantry_num: int | None
    control_points: int
    delivery_dir: str
    layers: int


class ManifestEntry(BaseModel):
    size: int
    sha256: str


class CaseInfo(BaseModel):
    """What inspection found. The manifest's file names can carry the patient id (the
    treatment system names files so): never show it in logs, artifacts or events."""

    case_id: str
    case_dir: str
    plan_file: str
    plan_label: str
    patient_hash: str
    beams: list[Beam]
    setup_beams: int
    manifest: dict[str, ManifestEntry]
    manifest_digest: str
    total_bytes: int


def patient_hash(patient_id: str) -> str:
    """A short pseudonym of a patient id for labels: never reversible to the id."""
    return "p-" + hashlib.sha256(f"mqi:{patient_id}".encode()).hexdigest()[:10]


def read_plan_info(path: Path) -> dict[str, str]:
    """Parse a PlanInfo.txt (``KEY,VALUE`` lines)."""
    info: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(",")
        if sep:
            info[key.strip()] = value.strip()
    return info


def manifest_digest(manifest: dict[str, ManifestEntry]) -> str:
    """One digest of a whole case's content: names, sizes and SHA-256 of every file."""
    h = hashlib.sha256()
    for rel in sorted(manifest):
        h.update(f"{rel}\0{manifest[rel].size}\0{manifest[rel].sha256}\n".encode())
    return h.hexdigest()


def content_signature(case_dir: str | os.PathLike[str], ignore: set[str]) -> tuple[int, int,
                                                                                   int]:
    """(files, bytes, newest mtime ns) of a case folder: cheap, changes when content does."""
    count = size = newest = 0
    for dirpath, _, filenames in os.walk(case_dir):
        for name in filenames:
            if Path(dirpath) == Path(case_dir) and name in ignore:
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            count += 1
            size += st.st_size
            newest = max(newest, st.st_mtime_ns)
    return count, size, newest


def content_digest(case_dir: str | os.PathLike[str], ignore: set[str]) -> str:
    """The manifest digest of whatever regular files a folder holds (links skipped).

    Unlike ``inspect_case`` this never refuses: it names the content of a case
    that may be broken, so that the same broken content is not submitted twice.
    """
    root = Path(case_dir)
    manifest = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            if (Path(dirpath) == root and name in ignore) or full.is_symlink() \
                    or not full.is_file():
                continue
            manifest[full.relative_to(root).as_posix()] = ManifestEntry(
                size=full.stat().st_size, sha256=sha256_file(full))
    return manifest_digest(manifest)


def _walk(case_dir: Path, ignore: set[str]) -> list[Path]:
    """Every regular file of the case; a link or an escape is a refusal."""
    files = []
    for dirpath, dirnames, filenames in os.walk(case_dir):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            if full.is_symlink():
                target = os.path.realpath(full)
                where = "outside the case folder" if not target.startswith(
                    str(case_dir) + os.sep) else "inside the case folder"
                raise CaseRejected(case_dir, f"{full.relative_to(case_dir)} is a symbolic link "
                                             f"(to {where}); links are not accepted")
        for name in filenames:
            if Path(dirpath) == case_dir and name in ignore:
                continue
            full = Path(dirpath) / name
            if not full.is_file():
                raise CaseRejected(case_dir, f"{full.relative_to(case_dir)} is not a regular file")
            files.append(full)
    return sorted(files)


def inspect_case(case_dir: str | os.PathLike[str], *, id_pattern: str,
                 scan_root: str | os.PathLike[str] | None = None,
                 gantry_numbers: dict[str, int] | None = None,
                 ignore: set[str] | None = None) -> CaseInfo:
    """Validate a case folder and describe it.

    Args:
        case_dir: The case folder; its name is the case id.
        id_pattern: ``cases.id_pattern``.
        scan_root: When given, the case folder must lie inside it (no link, no ``..``).
        gantry_numbers: Treatment machine name → MOQUI GantryNum.
        ignore: Top-level file names that are not case content (the ready marker).

    Raises:
        CaseRejected: With the precise reason.
    """
    raw = Path(case_dir)
    if scan_root is not None:
        root = Path(scan_root).resolve()
        if raw.is_symlink() or raw.resolve().parent != root:
            raise CaseRejected(raw, f"the case folder is not a folder directly inside the scan "
                                    f"root {root} (links and '..' are refused)")
    try:
        case_id = validate_case_id(raw.name, id_pattern)
    except CaseIdError as exc:
        raise CaseRejected(raw, str(exc)) from None
    case = raw.resolve()
    if not case.is_dir():
        raise CaseRejected(raw, "not a folder")
    files = _walk(case, ignore or set())

    plans = [f for f in files if f.parent == case and f.name.startswith("RP")
             and f.suffix.lower() == ".dcm"]
    if not plans:
        raise CaseRejected(case, "no RT Ion Plan (RP*.dcm) in the case folder")
    if len(plans) > 1:
        raise CaseRejected(case, "more than one RT plan: " + ", ".join(p.name for p in plans))
    try:
        plan = pydicom.dcmread(plans[0])
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise CaseRejected(case, f"unreadable DICOM {plans[0].name}: {exc}") from None
    if plan.get("SOPClassUID") != RT_ION_PLAN or "IonBeamSequence" not in plan:
        raise CaseRejected(case, f"{plans[0].name} is not an RT Ion Plan "
                                 f"(SOP class {plan.get('SOPClassUID', 'missing')})")

    treatment, setup = {}, 0
    for beam in plan.IonBeamSequence:
        if str(beam.get("TreatmentDeliveryType", "")).upper() == "TREATMENT":
            treatment[int(beam.BeamNumber)] = beam
        else:
            setup += 1
    if not treatment:
        raise CaseRejected(case, "the plan has no TREATMENT beam")
    folders = sorted(p for p in case.iterdir() if p.is_dir())
    if len(folders) != len(treatment):
        raise CaseRejected(case, f"the plan has {len(treatment)} treatment beam(s) "
                                 f"({setup} setup beam(s) excluded) but the case has "
                                 f"{len(folders)} delivery folder(s)")

    patient_id = str(plan.get("PatientID", ""))
    study_uid = str(plan.get("StudyInstanceUID", ""))
    beams: list[Beam] = []
    seen: dict[int, str] = {}
    for folder in folders:
        info_file = folder / "PlanInfo.txt"
        if not info_file.is_file():
            raise CaseRejected(case, f"{folder.name}/PlanInfo.txt is missing")
        info = read_plan_info(info_file)
        try:
            number = int(info.get("DICOM_BEAM_NUMBER", ""))
        except ValueError:
            raise CaseRejected(case, f"{folder.name}/PlanInfo.txt has no valid "
                                     f"DICOM_BEAM_NUMBER") from None
        if number not in treatment:
            raise CaseRejected(case, f"{folder.name}/PlanInfo.txt names beam {number}, which "
                                     f"is not a treatment beam of the plan "
                                     f"({', '.join(map(str, sorted(treatment)))})")
        if number in seen:
            raise CaseRejected(case, f"beam {number} is delivered twice ({seen[number]} and "
                                     f"{folder.name})")
        seen[number] = folder.name
        if info.get("DICOM_PATIENT_ID", patient_id) != patient_id:
            raise CaseRejected(case, f"{folder.name}/PlanInfo.txt belongs to another patient "
                                     f"than the plan (DICOM_PATIENT_ID differs)")
        if info.get("DICOM_STUDY_INS_UID", study_uid) != study_uid:
            raise CaseRejected(case, f"{folder.name}/PlanInfo.txt belongs to another study "
                                     f"than the plan (DICOM_STUDY_INS_UID differs)")
        ptns = sorted(folder.glob("*.ptn"))
        if not ptns:
            raise CaseRejected(case, f"{folder.name} has no .ptn spot log")
        for ptn in ptns:
            size = ptn.stat().st_size
            if size == 0:
                raise CaseRejected(case, f"{folder.name}/{ptn.name} is empty")
            if size % PTN_ROW_BYTES:
                raise CaseRejected(case, f"{folder.name}/{ptn.name} is not whole rows of "
                                         f"8 x uint16 ({size} bytes)")
        ds = treatment[number]
        machine = str(ds.get("TreatmentMachineName", ""))
        beams.append(Beam(
            number=number, name=str(ds.get("BeamName", f"beam {number}")), machine=machine,
            gantry_num=(gantry_numbers or {}).get(machine),
            control_points=int(ds.get("NumberOfControlPoints", 0)),
            delivery_dir=folder.name, layers=len(ptns)))

    manifest = {f.relative_to(case).as_posix(): ManifestEntry(size=f.stat().st_size,
                                                               sha256=sha256_file(f))
                for f in files}
    return CaseInfo(
        case_id=case_id, case_dir=str(case), plan_file=plans[0].name,
        plan_label=str(plan.get("RTPlanLabel", "")), patient_hash=patient_hash(patient_id),
        beams=sorted(beams, key=lambda b: b.number), setup_beams=setup, manifest=manifest,
        manifest_digest=manifest_digest(manifest),
        total_bytes=sum(e.size for e in manifest.values()))
