"""An RT Dose read with its real geometry: voxel coordinates in patient millimetres.

The coordinates come from pymedphys (``pymedphys.dicom.zyx_and_dose_from_dataset``:
ImagePositionPatient, ImageOrientationPatient, PixelSpacing, GridFrameOffsetVector,
and DoseGridScaling for the values), never from an assumption that two grids are
alike. Two things are settled here first, because pymedphys does not: a
GridFrameOffsetVector written as absolute z positions (DICOM allows both), and
axes that run backwards (a feet-first or flipped grid), which are turned to run
forwards with the dose flipped alike, as interpolation needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from config import MqiError


class DoseReadError(MqiError):
    """An RT Dose that cannot be compared: unreadable, or its geometry is not usable."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{Path(path).name}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class DoseGrid:
    """A dose on a rectilinear grid: ``dose[z, y, x]`` in ``units``, axes ascending (mm)."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    dose: np.ndarray
    units: str = "Gy"

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (self.z, self.y, self.x)

    def describe(self) -> str:
        """``nx×ny×nz at sx×sy×sz mm from (x, y, z)``: what a report says of a grid."""
        def step(a: np.ndarray) -> str:
            return f"{float(np.mean(np.diff(a))):g}" if len(a) > 1 else "-"

        return (f"{len(self.x)}×{len(self.y)}×{len(self.z)} voxels at "
                f"{step(self.x)}×{step(self.y)}×{step(self.z)} mm from "
                f"({self.x[0]:g}, {self.y[0]:g}, {self.z[0]:g}) mm")


def dose_from_dataset(ds: Any, where: Path | str = "RT Dose") -> DoseGrid:
    """The dose grid of an RT Dose dataset (pydicom), coordinates from pymedphys.

    Raises:
        DoseReadError: Not an RT Dose, or geometry or pixel data missing or inconsistent.
    """
    from pymedphys.dicom import zyx_and_dose_from_dataset

    if ds.get("Modality") != "RTDOSE":
        raise DoseReadError(where, f"not an RT Dose (Modality {ds.get('Modality')})")
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "GridFrameOffsetVector", "DoseGridScaling", "PixelData"):
        if key not in ds:
            raise DoseReadError(where, f"has no {key}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames < 2:
        raise DoseReadError(where, "has one frame: the comparison needs a 3D dose")
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    if len(offsets) != frames:
        raise DoseReadError(where, f"GridFrameOffsetVector has {len(offsets)} values for "
                                   f"{frames} frames")
    if offsets[0] != 0 and abs(offsets[0] - float(ds.ImagePositionPatient[2])) < 1e-3:
        # DICOM allows absolute z positions here (the first equals the position's z);
        # pymedphys adds the position to every offset, so make them relative first.
        ds.GridFrameOffsetVector = [v - offsets[0] for v in offsets]
    if getattr(ds, "file_meta", None) is not None and \
            ds.file_meta.get("TransferSyntaxUID") is not None and \
            ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            ds.decompress()
        except Exception as exc:  # noqa: BLE001 - any decoder problem, said with the file
            raise DoseReadError(where, f"compressed pixel data that cannot be decoded: "
                                       f"{exc}") from None
    try:
        (z, y, x), dose = zyx_and_dose_from_dataset(ds)
    except (ValueError, AttributeError, TypeError) as exc:
        raise DoseReadError(where, f"unusable geometry or pixel data: {exc}") from None
    dose = np.asarray(dose, dtype=np.float64).reshape(frames, int(ds.Rows), int(ds.Columns))
    axes = [np.asarray(a, dtype=np.float64) for a in (z, y, x)]
    for dim, axis in enumerate(axes):
        if len(axis) > 1 and axis[1] < axis[0]:
            axes[dim] = axis[::-1].copy()
            dose = np.flip(dose, axis=dim)
        if len(axis) > 1 and not np.all(np.diff(axes[dim]) > 0):
            raise DoseReadError(where, f"the {'zyx'[dim]} coordinates do not run one way")
    units = str(ds.get("DoseUnits", "GY")).upper()
    return DoseGrid(z=axes[0], y=axes[1], x=axes[2], dose=np.ascontiguousarray(dose),
                    units={"GY": "Gy", "RELATIVE": "relative"}.get(units, units))


def read_dose(path: Path) -> DoseGrid:
    """Read an RT Dose file with its geometry.

    Raises:
        DoseReadError: Unreadable or unusable, with the file's name and the reason.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DoseReadError(path, f"unreadable DICOM: {exc}") from None
    return dose_from_dataset(ds, path)


def resampled(grid: DoseGrid, onto: DoseGrid) -> np.ndarray:
    """``grid``'s dose at ``onto``'s voxels (linear; 0 outside ``grid``)."""
    from scipy.interpolate import RegularGridInterpolator

    if all(len(a) == len(b) and np.allclose(a, b) for a, b in zip(grid.axes, onto.axes,
                                                                   strict=True)):
        return grid.dose
    interp = RegularGridInterpolator(grid.axes, grid.dose, bounds_error=False, fill_value=0.0)
    zz, yy, xx = np.meshgrid(*onto.axes, indexing="ij")
    return np.asarray(interp(np.stack([zz, yy, xx], axis=-1)))
