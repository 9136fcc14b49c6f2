"""One dose comparison: 3D gamma (pymedphys.gamma) of a recomputed dose against a reference.

The reference (the planning system's dose) is the grid gamma is computed on; the
recomputed dose is interpolated around each reference voxel, on its own grid
(pymedphys interpolates; nothing here assumes the grids are alike). Global
normalisation is the reference maximum; voxels below the lower cutoff of it are
not evaluated (AAPM TG-218).

Speed: pymedphys searches outward from each voxel in steps of
distance / ``interp_fraction`` until gamma is found or ``max_gamma`` is passed,
and evaluates a random subset of the voxels above the cutoff (``random_subset``);
a failing dose costs most (its voxels search furthest). Interpolation is
scipy's, so no JIT compiler (numba) is needed.

Reference voxels above the cutoff that lie outside the recomputed grid count as
failing: a recomputation that does not cover the dose cannot pass there.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
from pydantic import BaseModel

from config.models import DoseQaSettings
from flows.dose_geometry import DoseGrid
from flows.dose_plots import PlotData

Verdict = Literal["PASS", "REVIEW", "FAIL"]
SEVERITY: dict[str, int] = {"PASS": 0, "REVIEW": 1, "FAIL": 2}
HIGH_DOSE_PERCENT = 90.0
"""The high-dose region, for the mean dose difference: reference >= this % of its maximum."""


class CriterionResult(BaseModel):
    """Gamma results of one criterion."""

    dose_percent: float
    distance_mm: float
    decides: bool
    pass_rate: float
    """percent of the reference voxels above the cutoff with gamma < 1"""
    evaluated: int
    mean_gamma: float | None
    max_gamma: float | None
    capped: bool
    """max_gamma reached the search limit: the true maximum is at least that"""

    @property
    def label(self) -> str:
        return f"{self.dose_percent:g}%/{self.distance_mm:g}mm"


class Comparison(BaseModel):
    """One comparison (a beam, or the plan sum) and its verdict."""

    label: str
    """``beam 2`` or ``plan``"""
    reference_file: str
    recomputed_file: str
    verdict: Verdict
    why: str
    criteria: list[CriterionResult]
    reference_grid: str
    recomputed_grid: str
    reference_max: float
    recomputed_max: float
    units: str
    mean_difference_percent: float | None
    """mean (recomputed - reference) where reference >= HIGH_DOSE_PERCENT of its maximum,
    in percent of the reference maximum"""
    mean_difference: float | None
    """the same, in the dose units"""
    above_cutoff: int
    outside: int
    """reference voxels above the cutoff outside the recomputed grid (counted as failing)"""
    settings: str
    """what the gamma search used, said once"""
    seconds: float
    plot: str | None = None
    """the PNG, relative to the case's results folder"""


def settings_text(qa: DoseQaSettings) -> str:
    """The gamma settings as the report says them."""
    subset = (f"random subset of {qa.random_subset} voxels above the cutoff (seed "
              f"{qa.random_seed})" if qa.random_subset else "every voxel above the cutoff")
    return (f"pymedphys.gamma, {'local' if qa.local_gamma else 'global'} normalisation "
            f"(reference maximum), lower cutoff {qa.lower_cutoff_percent:g} %, "
            f"max_gamma {qa.max_gamma if qa.max_gamma is not None else 'none'}, "
            f"interp_fraction {qa.interp_fraction}, {subset}, scipy interpolation")


def judge(criteria: list[CriterionResult], qa: DoseQaSettings) -> tuple[Verdict, str]:
    """PASS when every deciding pass rate is at or above the tolerance, FAIL when one is
    below the action level, else REVIEW; with the reason in words."""
    deciding = [c for c in criteria if c.decides] or criteria
    worst = min(deciding, key=lambda c: c.pass_rate)
    said = f"{worst.label} pass rate {worst.pass_rate:.1f} %"
    if worst.pass_rate < qa.action_percent:
        return "FAIL", f"{said} < action level {qa.action_percent:g} %"
    if worst.pass_rate < qa.tolerance_percent:
        return "REVIEW", f"{said} < tolerance {qa.tolerance_percent:g} %"
    return "PASS", f"{said} ≥ tolerance {qa.tolerance_percent:g} %"


def _inside(axis: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    eps = 1e-6
    return (axis >= bounds[0] - eps) & (axis <= bounds[-1] + eps)


def _gamma(reference: DoseGrid, evaluation: DoseGrid, qa: DoseQaSettings,
           norm: float) -> dict[tuple[float, float], np.ndarray]:
    """pymedphys.gamma of the part of the reference inside the recomputed grid."""
    import pymedphys

    doses = sorted({c.dose_percent for c in qa.criteria})
    distances = sorted({c.distance_mm for c in qa.criteria})
    # pymedphys draws its random subset from numpy's global generator: seeded here for
    # a reproducible result, and given back as it was.
    state = np.random.get_state()
    np.random.seed(qa.random_seed)
    logger = logging.getLogger()
    level = logger.level
    try:
        logger.setLevel(max(level, logging.WARNING))  # it logs each step at INFO
        found = pymedphys.gamma(
            reference.axes, reference.dose, evaluation.axes, evaluation.dose,
            doses, distances, lower_percent_dose_cutoff=qa.lower_cutoff_percent,
            interp_fraction=qa.interp_fraction, max_gamma=qa.max_gamma,
            local_gamma=qa.local_gamma, global_normalisation=norm,
            random_subset=qa.random_subset, interp_algo="scipy")
    finally:
        logger.setLevel(level)
        np.random.set_state(state)
    if not isinstance(found, dict):  # one dose and one distance: the array itself
        found = {(doses[0], distances[0]): found}
    return {(float(d), float(m)): np.asarray(g) for (d, m), g in found.items()}


def _profiles(reference: DoseGrid, evaluation: DoseGrid) -> list[
        tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Profiles along x, y and z through the reference maximum, both doses."""
    from scipy.interpolate import RegularGridInterpolator

    iz, iy, ix = np.unravel_index(int(np.argmax(reference.dose)), reference.dose.shape)
    point = (reference.z[iz], reference.y[iy], reference.x[ix])
    interp = RegularGridInterpolator(evaluation.axes, evaluation.dose, bounds_error=False,
                                     fill_value=np.nan)
    out = []
    for dim, name, ref_line in ((2, "x", reference.dose[iz, iy, :]),
                                (1, "y", reference.dose[iz, :, ix]),
                                (0, "z", reference.dose[:, iy, ix])):
        along = evaluation.axes[dim]
        pts = np.tile(np.asarray(point, dtype=float), (len(along), 1))
        pts[:, dim] = along
        out.append((name, reference.axes[dim], ref_line, along, interp(pts)))
    return out


def compare(reference: DoseGrid, evaluation: DoseGrid, qa: DoseQaSettings, *,
            label: str, reference_file: str = "", recomputed_file: str = ""
            ) -> tuple[Comparison, PlotData]:
    """Gamma analysis of ``evaluation`` (recomputed) against ``reference``, judged."""
    from scipy.interpolate import RegularGridInterpolator

    started = time.monotonic()
    norm = float(np.max(reference.dose))
    cutoff = qa.lower_cutoff_percent / 100 * norm
    above = reference.dose >= cutoff if norm > 0 else np.zeros(reference.dose.shape, bool)
    keep = [_inside(r, e) for r, e in zip(reference.axes, evaluation.axes, strict=True)]
    inside = np.ix_(*keep)
    above_total = int(np.count_nonzero(above))
    above_inside = int(np.count_nonzero(above[inside]))
    outside = above_total - above_inside
    results: list[CriterionResult] = []
    gammas: dict[str, np.ndarray] = {}
    if above_inside and norm > 0:
        cropped = DoseGrid(z=reference.z[keep[0]], y=reference.y[keep[1]],
                           x=reference.x[keep[2]], dose=reference.dose[inside],
                           units=reference.units)
        found = _gamma(cropped, evaluation, qa, norm)
    else:
        found = {}
    for c in qa.criteria:
        g = found.get((c.dose_percent, c.distance_mm))
        values = g[np.isfinite(g)] if g is not None else np.array([])
        # A voxel the search could not reach (its whole neighbourhood outside the
        # recomputed grid) comes back NaN like a voxel not drawn: only the drawn
        # voxels inside count, and the ones outside count as failing.
        rate_inside = float(np.mean(values < 1)) if len(values) else 0.0
        rate = 100.0 * rate_inside * (above_inside / above_total) if above_total else 0.0
        top = float(np.max(values)) if len(values) else None
        results.append(CriterionResult(
            dose_percent=c.dose_percent, distance_mm=c.distance_mm, decides=c.decides,
            pass_rate=round(rate, 2), evaluated=len(values),
            mean_gamma=round(float(np.mean(values)), 3) if len(values) else None,
            max_gamma=round(top, 3) if top is not None else None,
            capped=bool(qa.max_gamma is not None and top is not None
                        and top >= qa.max_gamma - 1e-9)))
        gammas[results[-1].label] = values

    high = reference.dose >= HIGH_DOSE_PERCENT / 100 * norm
    mean_diff = None
    if norm > 0 and np.any(high):
        zz, yy, xx = np.meshgrid(*reference.axes, indexing="ij")
        interp = RegularGridInterpolator(evaluation.axes, evaluation.dose,
                                         bounds_error=False, fill_value=np.nan)
        there = interp(np.stack([zz[high], yy[high], xx[high]], axis=-1))
        diffs = there - reference.dose[high]
        diffs = diffs[np.isfinite(diffs)]
        mean_diff = float(np.mean(diffs)) if len(diffs) else None

    verdict, why = judge(results, qa)
    if not above_inside:
        verdict, why = "FAIL", ("the recomputed grid does not overlap the reference dose "
                                "above the cutoff" if above_total else
                                "the reference dose is empty")
    comparison = Comparison(
        label=label, reference_file=reference_file, recomputed_file=recomputed_file,
        verdict=verdict, why=why, criteria=results,
        reference_grid=reference.describe(), recomputed_grid=evaluation.describe(),
        reference_max=round(norm, 6), recomputed_max=round(float(np.max(evaluation.dose)), 6),
        units=reference.units,
        mean_difference_percent=round(100 * mean_diff / norm, 2) if mean_diff is not None
        else None,
        mean_difference=round(mean_diff, 6) if mean_diff is not None else None,
        above_cutoff=above_total, outside=outside, settings=settings_text(qa),
        seconds=round(time.monotonic() - started, 2))
    plot = PlotData(title=f"{label}: {verdict} — {why}",
                    profiles=_profiles(reference, evaluation) if norm > 0 else [],
                    gammas=gammas, max_gamma=qa.max_gamma, units=reference.units)
    return comparison, plot
