"""Case inspection: is this folder a complete, consistent case, and what is in it?

Runs before anything leaves the machine. A case that fails here is refused with
one precise reason and is never uploaded. Two kinds of "no": ``CaseIncomplete``
(a piece is missing or empty: files may still be arriving, so the sensor keeps
waiting) and ``CaseRejected`` itself (the case can never start as it is). The
description it returns, and every reason, holds no patient name or id: a
``.ptn``/``.mgn`` file (whose name carries one) is named by its folder and its
PlanRange.txt row or layer, never by its name.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

import pydicom
from pydantic import BaseModel
from pydicom.errors import InvalidDicomError

from blocks.manifest import sha256_file
from config import MqiConfig, MqiError
from config.redaction import Redactor, redact
from flows.commands import CaseIdError, validate_case_id

RT_ION_PLAN = "1.2.840.10008.5.1.4.1.1.481.8"
PTN_ROW_BYTES = 16  # 8 x big-endian uint16
PLAN_RANGE = "PlanRange.txt"
# PlanRange.txt columns naming a layer's files, and what each file is called in reasons.
LAYER_FILES = {"SCAN_OUT_FL_NM": ".ptn", "PLAN_SCAN_OUT_FL_NM": ".mgn"}
ID_BEARING_SUFFIXES = (".ptn", ".mgn")  # the treatment system puts a patient id in these names


class CaseRejected(MqiError):
    """The folder is not a processable case as it is; ``reason`` says exactly why.

    ``waiting`` is False: nothing that may still arrive would make it processable
    (a bad id, a link, two plans, a PlanInfo naming a beam the plan lacks...).
    """

    waiting = False

    def __init__(self, case_dir: str | os.PathLike[str], reason: str) -> None:
        self.case_dir = str(case_dir)
        self.reason = redact(reason)
        super().__init__(f"case {Path(case_dir).name!r} refused: {self._what()}{reason}")

    def _what(self) -> str:
        return ""

    def __reduce__(self) -> tuple[object, ...]:  # crosses from the task to the flow
        return (type(self), (self.case_dir, self.reason))


class CaseIncomplete(CaseRejected):
    """A piece of the case is missing or empty: it may still arrive (``waiting`` is True).

    The sensor keeps waiting for such a case; a run given one refuses it all the same.
    """

    waiting = True

    def _what(self) -> str:
        return "not complete yet (files may still be arriving): "


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


class Signature(NamedTuple):
    """What a folder's listing says about its content, from stats alone (nothing is read).

    ``listing`` is a digest of every entry's relative name, type and mode, size,
    mtime and ctime: a file that arrives, grows, is renamed, rewritten, replaced or
    made readable changes it; reading a file does not.
    """

    files: int
    bytes: int
    newest_ns: int
    listing: str


def content_signature(case_dir: str | os.PathLike[str], ignore: set[str]) -> Signature:
    """The ``Signature`` of a case folder: cheap, and it changes when content does."""
    count = size = newest = 0
    entries: list[tuple[str, str, int, int, int, int]] = []
    root = os.fspath(case_dir)
    stack = [""]
    while stack:  # os.scandir: one stat per entry and no per-entry Path objects
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as listing:
            for entry in listing:
                if not rel and entry.name in ignore:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(os.path.join(rel, entry.name) if rel else entry.name)
                    entries.append((rel, entry.name, st.st_mode, 0, 0, 0))
                    continue
                count += 1
                size += st.st_size
                newest = max(newest, st.st_mtime_ns)
                entries.append((rel, entry.name, st.st_mode, st.st_size, st.st_mtime_ns,
                                st.st_ctime_ns))
    entries.sort()
    digest = hashlib.blake2b(repr(entries).encode(errors="surrogateescape"), digest_size=16)
    return Signature(count, size, newest, digest.hexdigest())


def folder_shape(case_dir: str | os.PathLike[str]) -> str:
    """A digest of the folder's directories alone: their names, mtimes and ctimes.

    Far cheaper than ``content_signature`` (no file is stat'ed): a file created,
    deleted or renamed anywhere changes it, a file rewritten in place does not.
    What a rescan compares for a folder already started, whose in-place writes
    the observer reports as they happen.
    """
    dirs: list[tuple[str, int, int]] = []
    root = os.fspath(case_dir)
    st = os.lstat(root)
    dirs.append(("", st.st_mtime_ns, st.st_ctime_ns))
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    sub = os.path.join(rel, entry.name) if rel else entry.name
                    with suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        dirs.append((sub, st.st_mtime_ns, st.st_ctime_ns))
                        stack.append(sub)
    dirs.sort()
    return hashlib.blake2b(repr(dirs).encode(errors="surrogateescape"),
                           digest_size=16).hexdigest()


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


def _layer_number(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def describe_file(rel: Path) -> str:
    """A file's path for a reason, without the patient id a ``.ptn``/``.mgn`` name carries.

    Such a file is named by its folder and the layer number that ends its name
    (``02_<id>_<plan>_<field>_<layer>.ptn``); any other path is shown as it is.
    """
    suffix = rel.suffix.lower()
    if suffix not in ID_BEARING_SUFFIXES:
        return rel.as_posix()
    layer = _layer_number(rel.stem.rpartition("_")[2])
    what = f"a {suffix} file" if layer is None else f"the {suffix} file of layer {layer}"
    return what if rel.parent == Path() else f"{rel.parent.as_posix()}: {what}"


def os_problem(case_dir: Path, exc: OSError) -> str:
    """An OS error about a case's file, without the patient id a file name may carry."""
    what = exc.strerror or type(exc).__name__
    if exc.filename is None:
        return what
    path = Path(os.fsdecode(exc.filename))
    for root in (case_dir, case_dir.resolve()):
        with suppress(ValueError):
            return f"{describe_file(path.relative_to(root))}: {what}"
    return what


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
                raise CaseRejected(case_dir, f"{describe_file(full.relative_to(case_dir))} is "
                                             f"a symbolic link (to {where}); links are not "
                                             f"accepted")
        for name in filenames:
            if Path(dirpath) == case_dir and name in ignore:
                continue
            full = Path(dirpath) / name
            if not full.is_file():
                raise CaseRejected(case_dir, f"{describe_file(full.relative_to(case_dir))} is "
                                             f"not a regular file")
            files.append(full)
    return sorted(files)


def _layer_file(case: Path, folder: Path, where: str, suffix: str, name: str | None) -> str | None:
    """Check one file a PlanRange.txt row names: None when it is there, regular and
    non-empty (and, for a spot log, whole rows); the waiting reason when it is missing
    or empty. Raises ``CaseRejected`` when it can never be right."""
    what = f"{where}: the {suffix} file it names"
    name = (name or "").strip()
    if not name:
        raise CaseRejected(case, f"{where} names no {suffix} file")
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise CaseRejected(case, f"{what} is not a plain file name in {folder.name}")
    try:
        st = os.lstat(folder / name)
    except FileNotFoundError:
        return f"{what} is missing"
    if not stat.S_ISREG(st.st_mode):
        raise CaseRejected(case, f"{what} is not a regular file")
    if st.st_size == 0:
        return f"{what} is empty"
    if suffix == ".ptn" and st.st_size % PTN_ROW_BYTES:
        raise CaseRejected(case, f"{what} is not whole rows of 8 x uint16 "
                                 f"({st.st_size} bytes)")
    return None


def _check_layers(case: Path, folder: Path) -> tuple[int, list[str]]:
    """The layers PlanRange.txt lists, and why they are not all there yet (empty when
    they are). Raises ``CaseRejected`` for a PlanRange.txt that can never be right."""
    path = folder / PLAN_RANGE
    where = f"{folder.name}/{PLAN_RANGE}"
    if not path.is_file():
        return 0, [f"{where} is missing"]
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        rows = list(csv.reader(fh))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        return 0, [f"{where} is empty"]
    header = [cell.strip().upper() for cell in rows[0]]
    missing_columns = [c for c in LAYER_FILES if c not in header]
    if missing_columns:
        raise CaseRejected(case, f"{where} has no {' or '.join(missing_columns)} column")
    if len(rows) == 1:
        return 0, [f"{where} lists no energy layer yet"]
    waiting = []
    for number, row in enumerate(rows[1:], start=1):
        cells = dict(zip(header, row, strict=False))
        layer = _layer_number(cells.get("LAYER_NO", ""))
        at = f"{where} row {number}" + ("" if layer is None else f" (layer {layer})")
        for column, suffix in LAYER_FILES.items():
            reason = _layer_file(case, folder, at, suffix, cells.get(column))
            if reason:
                waiting.append(reason)
    return len(rows) - 1, waiting


def _check_plan_info(case: Path, folder: Path, treatment: Mapping[int, object],
                     patient_id: str, study_uid: str) -> int | None:
    """The treatment beam a delivery folder's PlanInfo.txt names; None when the file is
    not there yet. Raises ``CaseRejected`` when it names no such beam or another patient
    or study than the plan's."""
    info_file = folder / "PlanInfo.txt"
    if not info_file.is_file():
        return None
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
    if info.get("DICOM_PATIENT_ID", patient_id) != patient_id:
        raise CaseRejected(case, f"{folder.name}/PlanInfo.txt belongs to another patient "
                                 f"than the plan (DICOM_PATIENT_ID differs)")
    if info.get("DICOM_STUDY_INS_UID", study_uid) != study_uid:
        raise CaseRejected(case, f"{folder.name}/PlanInfo.txt belongs to another study "
                                 f"than the plan (DICOM_STUDY_INS_UID differs)")
    return number


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
        CaseIncomplete: A piece is missing or empty (a delivery folder, PlanInfo.txt,
            PlanRange.txt, a file a PlanRange.txt row names): it may still arrive.
        CaseRejected: The case can never start as it is. Either way, with the reason.
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
    if len(folders) > len(treatment):
        raise CaseRejected(case, f"the plan has {len(treatment)} treatment beam(s) "
                                 f"({setup} setup beam(s) excluded) but the case has "
                                 f"{len(folders)} delivery folder(s)")
    # A refusal found anywhere wins over a missing piece: only a case that nothing
    # but arriving files can complete is "waiting".
    waiting = [] if len(folders) == len(treatment) else [
        f"the plan has {len(treatment)} treatment beam(s) ({setup} setup beam(s) excluded) "
        f"but the case has {len(folders)} delivery folder(s)"]

    patient_id = str(plan.get("PatientID", ""))
    study_uid = str(plan.get("StudyInstanceUID", ""))
    beams: list[Beam] = []
    seen: dict[int, str] = {}
    for folder in folders:
        number = _check_plan_info(case, folder, treatment, patient_id, study_uid)
        if number is None:
            waiting.append(f"{folder.name}/PlanInfo.txt is missing")
            continue
        if number in seen:
            raise CaseRejected(case, f"beam {number} is delivered twice ({seen[number]} and "
                                     f"{folder.name})")
        seen[number] = folder.name
        layers, missing = _check_layers(case, folder)
        waiting += missing
        ds = treatment[number]
        machine = str(ds.get("TreatmentMachineName", ""))
        beams.append(Beam(
            number=number, name=str(ds.get("BeamName", f"beam {number}")), machine=machine,
            gantry_num=(gantry_numbers or {}).get(machine),
            control_points=int(ds.get("NumberOfControlPoints", 0)),
            delivery_dir=folder.name, layers=layers))
    if waiting:
        more = f" (and {len(waiting) - 1} more missing or empty)" if len(waiting) > 1 else ""
        raise CaseIncomplete(case, waiting[0] + more)

    try:
        manifest = {f.relative_to(case).as_posix(): ManifestEntry(size=f.stat().st_size,
                                                                   sha256=sha256_file(f))
                    for f in files}
    except OSError as exc:  # never the file's own name: it can carry a patient id
        raise CaseIncomplete(case, f"cannot be read: {os_problem(case, exc)}") from None
    return CaseInfo(
        case_id=case_id, case_dir=str(case), plan_file=plans[0].name,
        plan_label=str(plan.get("RTPlanLabel", "")), patient_hash=patient_hash(patient_id),
        beams=sorted(beams, key=lambda b: b.number), setup_beams=setup, manifest=manifest,
        manifest_digest=manifest_digest(manifest),
        total_bytes=sum(e.size for e in manifest.values()))


def case_redactor(case_dir: str | os.PathLike[str], pseudonym: str | None = None) -> Redactor:
    """The ``Redactor`` for a case folder, from whatever of it can be read cheaply.

    Its identifiers: the plan's PatientID and PatientName (as stored and with spaces),
    every PlanInfo.txt's patient ids, and the id part of ``.ptn``/``.mgn`` file
    names (``02_<id>_<plan>_<field>_<layer>``). Reads no spot data, only the
    plan's two tags and the small PlanInfo files; a broken or partial case gives
    what it has. ``pseudonym``: what replaces them (default: the case's patient
    hash, from the DICOM PatientID or else the first id found).
    """
    root = Path(case_dir)
    ids: list[str] = []
    dicom_id = ""
    with suppress(OSError):
        for dirpath, _, filenames in os.walk(root):
            here = Path(dirpath)
            for name in filenames:
                lower = name.lower()
                if lower.endswith(ID_BEARING_SUFFIXES):
                    parts = name.rsplit(".", 1)[0].split("_")
                    if len(parts) >= 3:
                        ids.append(parts[1])
                elif name == "PlanInfo.txt":
                    with suppress(OSError, UnicodeError):
                        info = read_plan_info(here / name)
                        ids += [v for k, v in info.items() if "PATIENT" in k.upper() and v]
                elif here == root and name.startswith("RP") and lower.endswith(".dcm"):
                    with suppress(Exception):  # any broken plan: inspection says why
                        plan = pydicom.dcmread(here / name, specific_tags=[
                            "PatientID", "PatientName", "OtherPatientIDs"], force=True)
                        dicom_id = str(plan.get("PatientID", "") or "")
                        person = str(plan.get("PatientName", "") or "")
                        # The whole name, as stored and as written: its parts alone
                        # are common words ("SIMULATED", a first name) in messages.
                        ids += [dicom_id, person, " ".join(person.replace("^", " ").split())]
                        others = plan.get("OtherPatientIDs") or []
                        # one value is a str; several, a pydicom MultiValue (no list)
                        ids += [others] if isinstance(others, str) else \
                            [str(v) for v in others]
    if pseudonym is None:
        first = dicom_id or next((i for i in ids if len(i) >= 3), "")
        pseudonym = patient_hash(first) if first else "[patient]"
    return Redactor(ids, pseudonym)


def pseudonym(cfg: MqiConfig) -> str | None:
    """What replaces a patient id in messages: None (the case's own hash, the default
    ``cases.patient_id_in_logs: hash``), or ``[patient]`` for ``never``."""
    return None if cfg.cases.patient_id_in_logs == "hash" else "[patient]"
