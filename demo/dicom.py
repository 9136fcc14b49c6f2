"""A new DICOM file, the way every synthetic or simulated one starts."""

from __future__ import annotations

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid


def new_file(sop_class: str, modality: str) -> FileDataset:
    """An empty ``sop_class`` file (explicit VR little endian) with fresh instance and
    series UIDs, for the made-up patient SIMULATED^PATIENT."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "SIMULATED^PATIENT"
    ds.SeriesInstanceUID = generate_uid()
    return ds
