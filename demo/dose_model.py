"""The made-up dose of the simulators and of the synthetic reference RT Doses (SIMULATED).

The simulated MOQUI (demo/simulators/tps_env.py) samples ``beam_dose`` on its
grid; the synthetic case (demo/synthetic_case.py) samples the same function on
the reference's grid — the same one, another spacing and origin, shifted by a
few millimetres or scaled by a few percent — so that the dose QA has something
true to find: a match (PASS), a shift or a scale (REVIEW/FAIL). Coordinates are
DICOM patient millimetres; arrays are indexed (z, y, x) like an RT Dose's frames,
rows and columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import erf

RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_ION_PLAN = "1.2.840.10008.5.1.4.1.1.481.8"


@dataclass(frozen=True)
class Grid:
    """A dose grid: voxel counts (z, y, x), spacing (x, y, z) mm, first voxel (x, y, z) mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The z, y, x coordinates (mm) of the voxel centres."""
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        ox, oy, oz = self.origin
        return (oz + sz * np.arange(nz), oy + sy * np.arange(ny), ox + sx * np.arange(nx))


SIMULATOR_GRID = Grid(shape=(20, 24, 24), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
"""Where the simulated MOQUI scores dose (as MOQUI scores on the CT grid)."""
OTHER_GRID = Grid(shape=(17, 21, 21), spacing=(2.5, 2.5, 2.5), origin=(-2.5, -3.0, -1.5))
"""A reference grid as a planning system might choose it: other spacing and origin,
covering more than the simulator's grid."""


def _edge(a: np.ndarray, centre: float, half: float, sigma: float) -> np.ndarray:
    return 0.5 * (erf((a - centre + half) / sigma) - erf((a - centre - half) / sigma))


def beam_dose(beam: int, z: np.ndarray, y: np.ndarray, x: np.ndarray, *,
              shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
              scale: float = 1.0) -> np.ndarray:
    """The dose (Gy) of treatment beam ``beam`` at the mesh of axes z, y, x (mm).

    A box with soft (erf) edges, brighter with depth along y, placed a little
    differently per beam; ``shift_mm`` (x, y, z) moves it, ``scale`` multiplies it.
    """
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    cx = 23.0 + 2.0 * (beam % 3 - 1) + shift_mm[0]
    cy = 23.0 + shift_mm[1]
    cz = 19.0 + shift_mm[2]
    depth = 0.85 + 0.3 * np.clip((yy - cy + 8.0) / 16.0, 0.0, 1.0)
    dose = _edge(xx, cx, 8.0, 2.5) * _edge(yy, cy, 8.0, 2.5) * _edge(zz, cz, 7.0, 2.5) * depth
    return np.asarray(scale * (1.0 + 0.1 * beam) * dose)


def simulated_dose(beam: int, grid: Grid = SIMULATOR_GRID, noise: float = 0.003) -> np.ndarray:
    """What the simulated MOQUI scores: the beam's dose with a little Monte Carlo noise."""
    dose = beam_dose(beam, *grid.axes())
    rng = np.random.default_rng(beam)
    return np.asarray(np.clip(dose * (1 + noise * rng.standard_normal(dose.shape)), 0, None),
                      dtype=np.float32)


def rt_dose(dose: np.ndarray, grid: Grid, *, description: str, summation: str = "BEAM",
            plan: Any = None, beam: int | None = None) -> Any:
    """An RT Dose dataset (pydicom) of ``dose`` (z, y, x, Gy) on ``grid``, SIMULATED.

    With ``plan`` (the RT Ion Plan dataset) it references the plan, and ``beam``
    with it (ReferencedBeamNumber) for a BEAM dose; patient and study are the plan's.
    """
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from demo.dicom import new_file

    peak = float(dose.max()) or 1.0
    scaling = peak / 4.0e9  # 32-bit integers below 2**32: far finer than any dose test
    ds = new_file(RT_DOSE, "RTDOSE")
    ds.Manufacturer = "MQI Communicator (SIMULATED)"
    ds.SeriesDescription = description
    ds.StudyInstanceUID = str(plan.StudyInstanceUID) if plan is not None else generate_uid()
    if plan is not None:
        ds.PatientID = plan.PatientID
        ref = Dataset()
        ref.ReferencedSOPClassUID = RT_ION_PLAN
        ref.ReferencedSOPInstanceUID = plan.SOPInstanceUID
        if beam is not None:
            group = Dataset()
            group.ReferencedFractionGroupNumber = 1
            beam_ref = Dataset()
            beam_ref.ReferencedBeamNumber = beam
            group.ReferencedBeamSequence = [beam_ref]
            ref.ReferencedFractionGroupSequence = [group]
        ds.ReferencedRTPlanSequence = [ref]
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = summation
    ds.DoseGridScaling = f"{scaling:.10g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 32
    ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    nz, ny, nx = dose.shape
    ds.NumberOfFrames = nz
    ds.Rows = ny
    ds.Columns = nx
    sx, sy, sz = grid.spacing
    ds.PixelSpacing = [sy, sx]  # row spacing (between rows: y), then column spacing (x)
    ds.ImagePositionPatient = list(grid.origin)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.GridFrameOffsetVector = [i * sz for i in range(nz)]
    ds.FrameIncrementPointer = 0x3004000C
    ds.PixelData = np.round(dose / float(ds.DoseGridScaling)).astype("<u4").tobytes()
    return ds
